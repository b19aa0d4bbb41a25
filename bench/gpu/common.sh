# Sourced by bench/gpu/call1.sh and bench/gpu/call3.sh (bench/gpu/GPU.md), after they set $call (a name)
# and $budget (seconds: the call's timeout_s less 30). It sets
#   $py    python3 (the GPU machine's), or $PYTHON
#   $work  /tmp/gpu-window/$call, emptied: the call's logs and JSON, outside $OUT
#   $out   $OUT, the folder that comes back; after every step it holds exactly four files, each
#          written whole (temporary name, then renamed): steps.txt (each step's status),
#          results.json (every JSON under $work so far), summary.txt (the table so far) and
#          logs.tar.gz (all of $work)
# and defines
#   step NAME LIMIT COMMAND...  one step, cut at LIMIT seconds or at what is left of $budget,
#          whichever comes first (SIGTERM, SIGKILL 5 s later); its output goes to $work/NAME.log.
#          A step never stops the call. With GPU_PLAN=1 it only prints "NAME LIMIT" (what the
#          rehearsal sums against the call's timeout_s).
# It exports PYTHONUNBUFFERED=1 (a cut step's output is all in its log) and the checkout on PYTHONPATH.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
out=${OUT:-bench/results/gpu}
work=/tmp/gpu-window/$call
if [ -z "${GPU_PLAN:-}" ]; then
  rm -rf "$work" && mkdir -p "$work" "$out"
  : > "$out/steps.txt"
fi

collect() {
  $py bench/gpu/summary.py collect "$work" "$out" 2>> "$work/collect.log"
  tar czf "$out/.logs.tar.gz.part" -C "$work" . 2> /dev/null && mv -f "$out/.logs.tar.gz.part" "$out/logs.tar.gz"
}

step() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${GPU_PLAN:-}" ]; then
    echo "$name $limit"
    return 0
  fi
  local left=$((budget - SECONDS))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 5)); then
    echo "$name: not run, the call's budget of $budget s is spent" | tee -a "$out/steps.txt"
    collect
    return 0
  fi
  local start=$SECONDS rc
  timeout -k 5 "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$?
  local note=""
  if ((rc == 124 || rc == 137)); then note=", cut at its limit"; fi
  echo "$name: rc $rc in $((SECONDS - start)) s (limit $limit s)$note" | tee -a "$out/steps.txt"
  collect
}
