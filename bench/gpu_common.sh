# Sourced by bench/gpu_call1.sh .. gpu_call3.sh: the project importable from the checkout, $out for
# the results, $py, $peer (--no-peer without transformers) and run NAME LIMIT COMMAND...: one step
# under its own time limit, logged under $out, its status noted in $out/steps.txt; never stops the call.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
peer=()
$py -c "import transformers" 2>/dev/null || peer=(--no-peer)
run() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
