"""Which scaled_dot_product_attention kernel runs BEiT's attention with its float relative position bias,
and what each kernel costs and how far it is from exact (issue 13).

    python bench/speed/attention_kernels.py --json out.json                  # GPU: ViT-B/16 at 224 px, batch 256, bf16
    python bench/speed/attention_kernels.py --model-block --json out.json    # also the real `Attention` module
    python bench/speed/attention_kernels.py --device cpu --batch 2 --dtype float32 --reps 2   # CPU rehearsal

The inputs are made the way `beit.train.model.Attention.forward` makes them: q, k and v are strided views
of one [B, N, 3 * width] projection (packed layout: strides (N*3*width, head_dim, 3*width, 1)), and the bias
is a [heads, N, N] tensor in q's dtype passed as `attn_mask=bias.unsqueeze(0)`, broadcast over the batch.
Three cases:

- train: pre-training. The shared table's bias (contiguous, `RelativePositionBias`) requires grad.
- frozen: the same bias needing no grad: what the fused kernels could do if it were fixed.
- finetune: each block's own table (`Attention.own_bias`): a permuted view, strides (1, N*heads, heads).

For each SDPBackend forced with `sdpa_kernel`, the default dispatcher and flex attention (bias added in a
score_mod; compiled on a GPU, eager on the CPU): the forward as in evaluation (no_grad, bias without grad)
and forward+backward as in training; whether each runs (and PyTorch's reasons when not), median time,
peak memory (GPU), and the max abs difference of the output and of the gradients (of the qkv projection
and the bias) from the MATH backend run in float32 on the same values. The dispatcher's pick is read from
`torch._fused_sdp_choice` and from the op and kernel names the profiler sees.
On the CPU, EFFICIENT and CUDNN do not exist and flex attention has no backward. A GPU run of the
defaults should take a few minutes (not yet measured), most of it compiling flex attention.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from beit.train.model import Attention, RelativePositionBias

BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
CASES = ["train", "frozen", "finetune"]
# substrings of profiler op and kernel names that belong to attention
ATTENTION_NAMES = ("attention", "attn", "fmha", "flash", "cudnn", "sdpa", "softmax", "flex", "triton_tem")


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, N, 3 * width] -> q, k, v [B, heads, N, head_dim], the same strided views as the model's."""
    batch, n, _ = qkv.shape
    return qkv.view(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def forced(backend: str):
    """A context factory that allows SDPA only this backend."""
    return partial(sdpa_kernel, [getattr(SDPBackend, backend)])


def sdpa_attention(qkv: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = split_heads(qkv, heads)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))


def flex_attention_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    def attention(qkv: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
        q, k, v = split_heads(qkv, heads)

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]

        return flex_attention(q, k, v, score_mod=add_bias)

    return torch.compile(attention, dynamic=False) if compiled else attention


def model_bias(case: str, grid: tuple[int, int], heads: int, dtype, device) -> torch.Tensor:
    """The [heads, N, N] bias exactly as the model builds it (random table values, trained-bias scale),
    cast to q's dtype as `Attention.forward` does: contiguous for the shared table, a permuted view for
    a block's own table."""
    generator = torch.Generator().manual_seed(1)
    if case == "finetune":
        module = Attention(heads * 8, heads, grid)
        table = module.relative_position_bias_table
        make = module.own_bias
    else:
        module = RelativePositionBias(grid, heads)
        table = module.relative_position_bias_table
        make = module
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=generator))
        return make().to(device=device, dtype=dtype)  # .to keeps a permuted view's strides


def attempt(run):
    """(result, None), or (None, the error's first line and PyTorch's warnings about why)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return run(), None
        except Exception as error:  # a backend that refuses these inputs, or runs out of memory
            lines = [str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__]
            for warning in caught:
                reason = str(warning.message).split(" (Triggered internally")[0].strip()
                if reason and reason not in lines:
                    lines.append(reason)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None, " | ".join(lines)[:1500]


def median_ms(run, reps: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            run()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def peak_mib(run, cuda: bool) -> float | None:
    """Memory allocated above what was held before one call, at its peak."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def max_diff(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.float() - reference).abs().max().item()


def attention_names(run, cuda: bool) -> dict[str, list[str]]:
    """The attention ops (CPU side) and kernels (GPU side) the profiler sees during one call."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run()
        if cuda:
            torch.cuda.synchronize()
    ops, kernels = [], []
    for event in profile.events():
        if not any(key in event.name.lower() for key in ATTENTION_NAMES):
            continue
        names = kernels if event.device_type == torch.autograd.DeviceType.CUDA else ops
        if event.name[:160] not in names:
            names.append(event.name[:160])
    return {"ops": ops, "kernels": kernels}


def backend_in(ops: list[str]) -> str:
    """Which SDPA backend ran, named from the profiler's op names."""
    for key, name in (
        ("flash_attention", "FLASH"),
        ("efficient_attention", "EFFICIENT"),
        ("cudnn_attention", "CUDNN"),
        ("attention_math", "MATH"),
        ("flex_attention", "FLEX"),
    ):
        if any(key in op for op in ops):
            return name
    return "no SDPA op"


def dispatcher_choice(qkv: torch.Tensor, bias: torch.Tensor, heads: int, training: bool) -> str:
    """The backend SDPA's dispatcher picks for these tensors (a private PyTorch function)."""
    q, k, v = split_heads(qkv, heads)
    with torch.set_grad_enabled(training):
        choice = attempt(lambda: torch._fused_sdp_choice(q, k, v, bias.unsqueeze(0)))
    return SDPBackend(choice[0]).name if choice[1] is None else f"unknown ({choice[1]})"


def measure(name, attention, context, qkv, bias, heads, bias_grad, reference, args, cuda) -> dict:
    """Forward (evaluation) and forward+backward (training) of one attention implementation."""
    row = {"backend": name}

    def forward():
        with context(), torch.no_grad():
            return attention(qkv, bias, heads)

    out, row["fwd_error"] = attempt(forward)
    row["fwd_runs"] = out is not None
    if out is not None:
        row["ms_fwd"] = median_ms(forward, args.reps, args.warmup, cuda)
        row["out_diff"] = max_diff(out, reference["out"])

    qkv_leaf = qkv.detach().requires_grad_()
    bias_leaf = bias.detach().requires_grad_(bias_grad)
    leaves = [qkv_leaf, bias_leaf] if bias_grad else [qkv_leaf]
    grad_out = reference["grad_out"]

    def step():
        with context():
            out = attention(qkv_leaf, bias_leaf, heads)
        return out, torch.autograd.grad(out, leaves, grad_out)

    result, row["fwd_bwd_error"] = attempt(step)
    row["fwd_bwd_runs"] = result is not None
    if result is not None:
        out, grads = result
        row["ms_fwd_bwd"] = median_ms(step, args.reps, args.warmup, cuda)
        row["peak_mib_fwd_bwd"] = peak_mib(step, cuda)
        row["train_out_diff"] = max_diff(out, reference["out"])
        row["grad_qkv_diff"] = max_diff(grads[0], reference["grad_qkv"])
        if bias_grad:
            row["grad_bias_diff"] = max_diff(grads[1], reference["grad_bias"])
        row["grad_diff"] = max(row["grad_qkv_diff"], row.get("grad_bias_diff", 0.0))
    return row


def float32_reference(qkv, bias, heads, grad_out, bias_grad) -> dict:
    """The MATH backend in float32 on the same values (TF32 off): the exact answer to compare with."""
    qkv_ref = qkv.detach().float().requires_grad_()
    bias_ref = bias.detach().float().requires_grad_(bias_grad)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with sdpa_kernel([SDPBackend.MATH]):
        out = sdpa_attention(qkv_ref, bias_ref, heads)
        grads = torch.autograd.grad(out, [qkv_ref, bias_ref] if bias_grad else [qkv_ref], grad_out.float())
    torch.backends.cuda.matmul.allow_tf32 = tf32
    reference = {"out": out.detach(), "grad_qkv": grads[0], "grad_out": grad_out}
    if bias_grad:
        reference["grad_bias"] = grads[1]
    return reference


def bench_case(case: str, args, device: torch.device, dtype, run_flex: bool) -> dict:
    cuda = device.type == "cuda"
    grid, heads = (args.image_size // 16,) * 2, args.heads
    n, width = grid[0] * grid[1] + 1, heads * args.head_dim
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(args.batch, n, 3 * width, generator=generator).to(device=device, dtype=dtype)
    bias = model_bias(case, grid, heads, dtype, device)
    grad_out = torch.randn(args.batch, heads, n, args.head_dim, generator=generator).to(device=device, dtype=dtype)
    bias_grad = case != "frozen"
    reference = float32_reference(qkv, bias, heads, grad_out, bias_grad)
    q, _, _ = split_heads(qkv, heads)
    train_qkv = qkv.detach().requires_grad_()
    train_bias = bias.detach().requires_grad_(bias_grad)
    result = {
        "case": case,
        "q_shape": list(q.shape),
        "q_strides": list(q.stride()),
        "bias_shape": [1, *bias.shape],
        "bias_strides": [0, *bias.stride()],
        "bias_dtype": str(bias.dtype),
        "bias_requires_grad_in_training": bias_grad,
        "reference_max_abs": {key: value.abs().max().item() for key, value in reference.items()},
        "picked_fwd": dispatcher_choice(qkv, bias, heads, training=False),
        "picked_fwd_bwd": dispatcher_choice(train_qkv, train_bias, heads, training=True),
    }

    def train_step():
        out = sdpa_attention(train_qkv, train_bias, heads)
        torch.autograd.grad(out, [train_qkv, train_bias] if bias_grad else [train_qkv], grad_out)

    def evaluation():
        with torch.no_grad():
            sdpa_attention(qkv, bias, heads)

    result["profiler_fwd"] = attention_names(evaluation, cuda)
    result["profiler_fwd_bwd"] = attention_names(train_step, cuda)
    result["profiled_fwd"] = backend_in(result["profiler_fwd"]["ops"])
    result["profiled_fwd_bwd"] = backend_in(result["profiler_fwd_bwd"]["ops"])

    inputs = (qkv, bias, heads, bias_grad, reference, args, cuda)
    rows = []
    for name in BACKENDS:
        rows.append(measure(name, sdpa_attention, forced(name), *inputs))
    picks = dict.fromkeys(result[key].removesuffix("_ATTENTION") for key in ("picked_fwd", "picked_fwd_bwd"))
    rows.append(measure(f"default ({'/'.join(picks)})", sdpa_attention, nullcontext, *inputs))
    if run_flex:
        flex, error = attempt(lambda: flex_attention_fn(compiled=cuda))
        if flex is None:
            rows.append({"backend": "flex", "fwd_runs": False, "fwd_error": error, "fwd_bwd_runs": False})
        else:
            rows.append(measure("flex (compiled)" if cuda else "flex (eager)", flex, nullcontext, *inputs))
    result["rows"] = rows
    return result


def bench_model_block(layout: str, args, device: torch.device, dtype, use_compile: bool) -> list[dict]:
    """`beit.train.model.Attention` forward+backward as training runs it (autocast to `dtype` when it is
    not float32), with each backend forced, the default, and optionally the default under torch.compile."""
    cuda = device.type == "cuda"
    grid, heads = (args.image_size // 16,) * 2, args.heads
    n, width = grid[0] * grid[1] + 1, heads * args.head_dim
    torch.manual_seed(0)
    attention = Attention(width, heads, grid if layout == "finetune" else None).to(device)
    shared = RelativePositionBias(grid, heads).to(device) if layout == "pretrain" else None
    with torch.no_grad():
        for module in (attention, shared):
            if module is not None and module.relative_position_bias_table is not None:
                module.relative_position_bias_table.normal_()
    x = torch.randn(args.batch, n, width, device=device, requires_grad=True)
    grad = torch.randn(args.batch, n, width, device=device)
    parameters = [x] + list(attention.parameters()) + (list(shared.parameters()) if shared else [])

    def step(module, autocast_dtype, context):
        with context(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            out = module(x, shared() if shared is not None else None)
        return out, torch.autograd.grad(out.float(), parameters, grad)

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_out, ref_grads = step(attention, torch.float32, lambda: sdpa_kernel([SDPBackend.MATH]))
    torch.backends.cuda.matmul.allow_tf32 = tf32

    variants = [(name, attention, forced(name)) for name in BACKENDS]
    variants.append(("default", attention, nullcontext))
    if use_compile:
        variants.append(("default, compiled", torch.compile(attention), nullcontext))
    rows = []
    for name, module, context in variants:
        row = {"layout": layout, "backend": name}
        result, row["fwd_bwd_error"] = attempt(lambda m=module, c=context: step(m, dtype, c))
        row["fwd_bwd_runs"] = result is not None
        if result is not None:
            out, grads = result
            run = lambda m=module, c=context: step(m, dtype, c)  # noqa: E731
            row["ms_fwd_bwd"] = median_ms(run, args.reps, args.warmup, cuda)
            row["peak_mib_fwd_bwd"] = peak_mib(run, cuda)
            row["out_diff"] = max_diff(out, ref_out.float())
            row["grad_diff"] = max(max_diff(g, r) for g, r in zip(grads, ref_grads, strict=True))
            if name.startswith("default"):
                row["profiler"] = attention_names(run, cuda)
                row["backend"] = f"{name} ({backend_in(row['profiler']['ops'])})"
        rows.append(row)
    return rows


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (
            f"{torch.cuda.get_device_name(device)} (sm{major}{minor}), CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(cases: list[dict], blocks: list[dict]) -> None:
    header = (
        f"{'case':<15} {'backend':<26} {'fwd':>4} {'bwd':>4} {'ms fwd':>9} {'ms fwd+bwd':>11} "
        f"{'peak MiB':>9} {'out diff':>9} {'grad diff':>10}"
    )
    print(header)
    for case in cases:
        for row in case["rows"]:
            print(
                f"{case['case']:<15} {row['backend']:<26} {'yes' if row['fwd_runs'] else 'no':>4} "
                f"{'yes' if row['fwd_bwd_runs'] else 'no':>4} {number(row.get('ms_fwd'), '.3f'):>9} "
                f"{number(row.get('ms_fwd_bwd'), '.3f'):>11} {number(row.get('peak_mib_fwd_bwd'), '.0f'):>9} "
                f"{number(row.get('out_diff'), '.1e'):>9} {number(row.get('grad_diff'), '.1e'):>10}"
            )
    for row in blocks:
        print(
            f"{'block/' + row['layout']:<15} {row['backend']:<26} {'-':>4} {'yes' if row['fwd_bwd_runs'] else 'no':>4} "
            f"{'-':>9} {number(row.get('ms_fwd_bwd'), '.3f'):>11} {number(row.get('peak_mib_fwd_bwd'), '.0f'):>9} "
            f"{number(row.get('out_diff'), '.1e'):>9} {number(row.get('grad_diff'), '.1e'):>10}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="", help="bfloat16, float16 or float32 (default: bfloat16 GPU, float32 CPU)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="16 px patches: 224 gives 197 tokens")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--flex-cases", default="train", help="cases to run flex attention on ('' for none)")
    parser.add_argument("--model-block", action="store_true", help="also time beit's Attention module")
    parser.add_argument("--compile", action="store_true", help="with --model-block: also the compiled module")
    parser.add_argument("--reps", type=int, default=0, help="timed calls (default 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls first (default 3 GPU, 1 CPU)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.reps = args.reps or (20 if cuda else 3)
    args.warmup = args.warmup or (3 if cuda else 1)
    cases = [c for c in args.cases.split(",") if c]
    flex_cases = [c for c in args.flex_cases.split(",") if c]
    unknown = sorted(set(cases + flex_cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}: use {', '.join(CASES)}")
    machine = describe_device(device)
    tokens = (args.image_size // 16) ** 2 + 1
    print(
        f"device: {machine}; torch {torch.__version__}; batch {args.batch}, {args.heads} heads, {tokens} tokens, "
        f"head dim {args.head_dim}, {str(dtype).removeprefix('torch.')}",
        flush=True,
    )

    results, blocks = [], []

    def write() -> None:
        """The JSON so far: rewritten after each case, so a run cut by a time limit keeps them."""
        if not args.json:
            return
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": machine,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "batch": args.batch,
            "heads": args.heads,
            "tokens": tokens,
            "head_dim": args.head_dim,
            "dtype": str(dtype),
            "reps": args.reps,
            "warmup": args.warmup,
            "cases": results,
            "model_block": blocks,
        }
        args.json.write_text(json.dumps(payload, indent=2))

    for case in cases:
        result = bench_case(case, args, device, dtype, run_flex=case in flex_cases)
        results.append(result)
        write()
        print(
            f"\n{case}: bias {result['bias_shape']} strides {result['bias_strides']} {result['bias_dtype']}, "
            f"requires grad in training: {result['bias_requires_grad_in_training']}; q strides {result['q_strides']}"
        )
        print(
            f"  dispatcher picks: forward {result['picked_fwd']}, forward+backward {result['picked_fwd_bwd']} "
            f"(profiler saw {result['profiled_fwd']}, {result['profiled_fwd_bwd']})"
        )
        for mode in ("fwd", "fwd_bwd"):
            seen = result[f"profiler_{mode}"]
            print(f"  profiler, default {mode}: ops {seen['ops']}")
            if seen["kernels"]:
                print(f"  profiler, default {mode}: kernels {seen['kernels']}")
        for row in result["rows"]:
            for key in ("fwd_error", "fwd_bwd_error"):
                if row.get(key):
                    print(f"  {row['backend']} {key.removesuffix('_error')}: {row[key][:400]}")
    by_case = {result["case"]: {row["backend"]: row for row in result["rows"]} for result in results}
    for name in BACKENDS if {"train", "frozen"} <= by_case.keys() else []:
        if not by_case["train"][name]["fwd_bwd_runs"] and by_case["frozen"][name]["fwd_bwd_runs"]:
            print(f"{name} trains only with a bias that needs no grad: it refuses the model's learned bias.")
    if args.model_block:
        for layout in ("pretrain", "finetune"):
            blocks.extend(bench_model_block(layout, args, device, dtype, args.compile))
            write()
        for row in blocks:
            if row.get("fwd_bwd_error"):
                print(f"  block/{row['layout']} {row['backend']}: {row['fwd_bwd_error'][:400]}")
            if row.get("profiler"):
                print(f"  block/{row['layout']} default, profiler: {row['profiler']}")

    write()
    print("\nms: median; diffs: max abs vs the MATH backend in float32; grad diff over d(qkv) and d(bias)")
    print_table(results, blocks)


if __name__ == "__main__":
    main()
