"""The spread over seeds of the pre-training run that tests/test_pretrain.py checks (issue 11):
`test_a_few_hundred_steps_lower_the_loss_and_beat_the_majority_token`'s store and command,
with `--seed S` added, one run after another.

    python bench/pretrain_seeds.py [--seeds 0-7]
    python bench/pretrain_seeds.py --ablation="--targets online"    (test_every_ablation_runs_and_its_loss_falls)

Prints, per seed, the last logged MIM accuracy minus the majority-token rate, the last loss
against ln(128) and against the first logged loss (the test's three quantities), then
min / median / max of each. With --ablation, the ablation test's run instead (25 epochs, log
every 10 steps, the flag added), whose test checks last / first loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-7", help="'0-7' or '0,3,5'")
    parser.add_argument("--json", type=Path, help="append one JSON line per seed here")
    parser.add_argument("--ablation", help="the ablation test's run with this flag: --ablation='--mask random'")
    args = parser.parse_args()

    import numpy as np
    import test_pretrain
    from photos import beit

    from beit.train.pretrain.data import PretrainData

    first, _, last = args.seeds.partition("-")
    seeds = list(range(int(first), int(last) + 1)) if last else [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        location, _ = test_pretrain.write_store(Path(tmp))
        tokens = PretrainData(str(location), batch_size=8, seed=0).tokens
        majority = np.bincount(tokens.ravel()).max() / tokens.size
        print(f"majority-token rate {majority:.4f}")
        print("seed  accuracy  accuracy-majority  last-loss/ln128  last/first-loss")
        table = []
        for seed in seeds:
            run = Path(tmp) / f"run{seed}"
            command = ["pretrain", location, "--out", run, *test_pretrain.TINY]
            if args.ablation:
                command += [*args.ablation.split(), "--epochs", "25", "--set", "log_every=10"]
            else:
                command += ["--epochs", "150", "--set", "log_every=50"]
            result = beit(*command, "--seed", seed)
            assert result.returncode == 0, result.stderr[-3000:]
            rows = test_pretrain.metrics(run)
            accuracy = rows[-1].get("mim_accuracy", float("nan"))  # none with --targets pixels
            row = (
                accuracy,
                accuracy - majority,
                rows[-1]["loss"] / np.log(128),
                rows[-1]["loss"] / rows[0]["loss"],
            )
            table.append(row)
            print(f"{seed:4d}  {row[0]:.4f}  {row[1]:17.4f}  {row[2]:15.3f}  {row[3]:15.3f}", flush=True)
            if args.json:
                with args.json.open("a") as f:
                    record = {"seed": seed, "ablation": args.ablation, "majority": majority}
                    f.write(json.dumps({**record, "rows": [rows[0], rows[-1]]}) + "\n")
        names = ("accuracy-majority", "last-loss/ln128", "last/first-loss")
        for name, column in zip(names, list(zip(*table, strict=True))[1:], strict=True):
            low, middle, high = min(column), np.median(column), max(column)
            print(f"{name} over {len(column)} seeds: min {low:.4f}, median {middle:.4f}, max {high:.4f}")


if __name__ == "__main__":
    main()
