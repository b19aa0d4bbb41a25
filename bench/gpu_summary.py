"""The short table a GPU window ends with: each figure the issue sets a bar for, read from the
JSON the call scripts wrote under OUT, beside its bar.

    python bench/gpu_summary.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict | None:
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rows(out: Path) -> list[tuple[str, str, str]]:
    table = []
    for name, compiled in (("train_step.json", ""), ("train_step_compiled.json", " compiled")):
        data = load(out, name)
        for row in (data or {}).get("results", []):
            if row["implementation"].startswith("beit"):
                mfu = f"{row['mfu'] * 100:.1f}% MFU, " if "mfu" in row else ""
                ratio = row.get("speed_vs_transformers")
                text = f"{mfu}{row['images_per_s']:.0f} img/s" + (f", {ratio:.2f}x transformers" if ratio else "")
                table.append((f"ViT-{row['model']} step{compiled}, batch {row['batch']}", text, ">= 40% MFU, >= 1x"))
    dvae = load(out, "dvae.json")
    if dvae:
        command = next((r for k, r in dvae["results"].items() if k == "beit tokenize default"), None)
        if command:
            policy = f"{command['body']}{' + tf32' if command['tf32'] else ''}"
            table.append(
                (
                    f"dVAE {policy}, batch {dvae['batch']}",
                    f"{command['views_per_s']:.0f} views/s, {command['agreement'] * 100:.2f}% agree",
                    ">= 8000, >= 99%",
                )
            )
    for name, compiled in (("pretrain_step.json", ""), ("pretrain_step_compiled.json", " compiled")):
        data = load(out, name)
        if data:
            table.append(
                (
                    f"step cached/online{compiled}, ViT-{data['model']}",
                    f"{data['cached_over_online']:.2f}x (bound {data['flop_bound']:.2f}x)",
                    ">= 1.4x",
                )
            )
    attention = load(out, "attention_kernels.json")
    for case in (attention or {}).get("cases", []):
        picked = case.get("profiled_fwd_bwd") or case.get("picked_fwd_bwd")
        table.append((f"SDPA kernel, {case['case']} (fwd+bwd)", str(picked), "not MATH"))
    tokenize = load(out, "tokenize.json")
    if tokenize:
        spent = tokenize.get("ours_time", {})
        where = ", ".join(f"{k} {v:.1f}s" for k, v in spent.items())
        text = f"{tokenize['ours_views_per_s']:.0f} views/s ({where})"
        measure = f"stage 1, V={tokenize['views']}, {tokenize['tokenizer']} dVAE"
        table.append((measure, text, ">= 4000, decode not bound"))
    pretrain = load(out, "pretrain.json")
    for preset, model in (pretrain or {}).get("models", {}).items():
        cached = model["cached"]
        table.append(
            (
                f"stage 2 ViT-{preset} cached/online",
                f"{model['ratio']:.2f}x, data wait {cached['data_wait'] * 100:.1f}%",
                ">= 1.4x, < 2%",
            )
        )
        pipeline = pretrain["pipeline_images_per_s"] / cached["images_per_s"]
        table.append((f"input pipeline / trainer, ViT-{preset}", f"{pipeline:.2f}x", ">= 2x"))
    return table


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu")
    steps = out / "steps.txt"
    if steps.exists():
        print(steps.read_text().rstrip())
    table = rows(out)
    if not table:
        print(f"no results under {out}")
        return
    width = max(len(r[0]) for r in table)
    print(f"{'measure':<{width}}  {'figure':<48}  bar")
    for measure, figure, bar in table:
        print(f"{measure:<{width}}  {figure:<48}  {bar}")


if __name__ == "__main__":
    main()
