"""The spread over seeds of the linear probe that tests/test_finetune.py checks (issue 11):
`test_linear_probe_reports_every_layer`'s data and command, with the stand-in "pre-trained"
model initialised from seed S instead of 0.

    python bench/probe_seeds.py [--seeds 0-7]

Prints, per seed, the probe's top-1 for each block and their maximum (what the test checks),
then min / median / max of that maximum.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODEL_ARGS = ["--model", "tiny", "--set", "model.image_size=64", "--set", "model.width=96"]
MODEL_ARGS += ["--set", "model.heads=3", "--set", "model.depth=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-7", help="'0-7' or '0,3,5'")
    args = parser.parse_args()

    import numpy as np
    import test_finetune
    from photos import beit

    first, _, last = args.seeds.partition("-")
    seeds = list(range(int(first), int(last) + 1)) if last else [int(s) for s in args.seeds.split(",")]
    best = []
    with tempfile.TemporaryDirectory() as tmp:
        print("seed  top-1 per block  max")
        for seed in seeds:
            folder, pretrained = test_finetune.write_data(Path(tmp) / f"s{seed}", init_seed=seed)
            result = beit("probe", folder, "--init", pretrained, *MODEL_ARGS, "--all-layers", "--epochs", "100")
            assert result.returncode == 0, result.stderr[-3000:]
            lines = [line for line in result.stdout.splitlines() if "block" in line]
            accuracies = [float(line.split("top-1")[1].strip(" %")) for line in lines]
            best.append(max(accuracies))
            print(f"{seed:4d}  {accuracies}  {best[-1]:.1f}", flush=True)
    print(f"max top-1 over {len(best)} seeds: min {min(best):.1f}, median {np.median(best):.1f}, max {max(best):.1f}")


if __name__ == "__main__":
    main()
