"""A GPU window's results: what comes back from each call, and the short table it ends with.

    python bench/gpu/summary.py collect WORK OUT   # after each step: OUT/results.json and OUT/summary.txt
    python bench/gpu/summary.py WORK_OR_OUT        # the table: each figure beside its bar

`collect` merges every JSON file under WORK (the call's own folder, bench/gpu/common.sh) into
OUT/results.json, keyed by file name, and writes the table to OUT/summary.txt; both are written
under a temporary name and renamed, so a call cut at any moment leaves whole files. The table
reads either a WORK folder or a results.json that came back. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def load_results(where: Path) -> dict[str, dict]:
    """{file name: its JSON} from a folder of JSON files, or from the results.json in it."""
    files = [path for path in sorted(where.glob("*.json")) if path.name != "results.json"]
    if not files and (where / "results.json").exists():  # what came back from a call
        try:
            return json.loads((where / "results.json").read_text())
        except ValueError:
            return {}
    results = {}
    for path in files:
        try:
            results[path.name] = json.loads(path.read_text())
        except ValueError:  # a file being written when the step was cut
            continue
    return results


def percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def rows(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    table = []
    device = results.get("device.json")
    if device:
        table.append(("device", f"{device.get('device')}, torch {device.get('torch')}", ""))
    for row in results.get("train_step.json", {}).get("results", []):
        if row["implementation"].startswith("beit"):
            mfu = f"{percent(row['mfu'])} MFU, " if "mfu" in row else ""
            ratio = row.get("speed_vs_transformers")
            text = f"{mfu}{row['images_per_s']:.0f} img/s" + (f", {ratio:.2f}x transformers" if ratio else "")
            compiled = " compiled" if row.get("compiled") else " eager"
            table.append((f"ViT-{row['model']} step{compiled}, batch {row['batch']}", text, ">= 40% MFU, >= 1x"))
    dvae = results.get("dvae.json")
    if dvae:
        for label, row in dvae["results"].items():
            if not label.startswith("beit tokenize default"):
                continue
            policy = f"{row['body']}{' + tf32' if row['tf32'] else ''}"
            extra = ""
            if "same_tokens_as_default" in row:
                policy += " + cudnn.benchmark"
                extra = f", {percent(row['same_tokens_as_default'])} same tokens"
            text = f"{row['views_per_s']:.0f} views/s, {percent(row['agreement'])} agree{extra}"
            table.append((f"dVAE {policy}, batch {dvae['batch']}", text, ">= 8000, >= 99%"))
    step = results.get("pretrain_step.json")
    for mode, run in (step or {}).get("runs", {}).items():
        table.append(
            (
                f"step cached/online {mode}, ViT-{step['model']}",
                f"{run['cached_over_online']:.2f}x (FLOP bound {step['flop_bound']:.2f}x)",
                ">= 1.4x",
            )
        )
    attention = results.get("attention_kernels.json")
    for case in (attention or {}).get("cases", []):
        picked = case.get("profiled_fwd_bwd") or case.get("picked_fwd_bwd")
        table.append((f"SDPA kernel, {case['case']} (fwd+bwd)", str(picked), "not MATH"))
    for name in ("decode.json", "decode_dali.json"):
        for decoder, row in results.get(name, {}).get("decoders", {}).items():
            text = row.get("error") or f"{row['images_per_s']:.0f} images/s ({row['megapixels_per_s']:.0f} MP/s)"
            table.append((f"JPEG decode, {decoder}", text[:60], "(compare)"))
    tokenize = results.get("tokenize.json")
    if tokenize and "ours_views_per_s" in tokenize:
        steady = tokenize.get("ours_steady_views_per_s")
        text = f"{steady or 0:.0f} views/s steady, {tokenize['ours_views_per_s']:.0f} end to end"
        text += f" (set-up {percent(tokenize['ours_setup_share'])})"
        measure = f"stage 1, V={tokenize['views']}, {tokenize['tokenizer']} dVAE, {tokenize['images']} images"
        table.append((measure, text, ">= 4000 (set-up < 10%)"))
        if "ratio" in tokenize:
            table.append(("stage 1 / released approach", f"{tokenize['ratio']:.2f}x", "(compare)"))
    pretrain = results.get("pretrain.json")
    for preset, model in (pretrain or {}).get("models", {}).items():
        cached = model.get("cached")
        if "ratio" in model:
            text = f"{model['ratio']:.2f}x, data wait {percent(cached['data_wait'])}"
            table.append((f"stage 2 ViT-{preset} cached/online", text, ">= 1.4x, < 2%"))
        if cached:
            pipeline = pretrain["pipeline_images_per_s"] / cached["images_per_s"]
            table.append((f"input pipeline / trainer, ViT-{preset}", f"{pipeline:.2f}x", ">= 2x"))
    return table


def render(results: dict[str, dict], steps: str = "") -> str:
    lines = [steps.rstrip()] if steps.strip() else []
    table = rows(results)
    if not table:
        return "\n".join([*lines, "no results yet"]) + "\n"
    width = max(len(r[0]) for r in table)
    lines.append(f"{'measure':<{width}}  {'figure':<60}  bar")
    lines += [f"{measure:<{width}}  {figure:<60}  {bar}" for measure, figure, bar in table]
    return "\n".join(lines) + "\n"


def write_whole(path: Path, text: str) -> None:
    part = path.with_name(f".{path.name}.part")
    part.write_text(text)
    os.replace(part, path)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "collect":
        work, out = Path(sys.argv[2]), Path(sys.argv[3])
        results = load_results(work)
        write_whole(out / "results.json", json.dumps(results, indent=1) + "\n")
        steps = out / "steps.txt"
        write_whole(out / "summary.txt", render(results, steps.read_text() if steps.exists() else ""))
        return
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    where = Path(sys.argv[1])
    steps = where / "steps.txt"
    print(render(load_results(where), steps.read_text() if steps.exists() else ""), end="")


if __name__ == "__main__":
    main()
