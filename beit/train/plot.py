"""`beit plot RUN_DIR -o curves.png`: the curves of a run's metrics.jsonl (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("loss", "loss"),
    ("mim_accuracy", "masked-token accuracy"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("psnr", "reconstruction PSNR (dB)"),
    ("perplexity", "code perplexity"),
    ("images_per_s", "images/s"),
    ("data_wait", "data-wait fraction"),
]


def plot_run(runs: list[Path], out: Path) -> list[str]:
    """Draw every metric present in the runs' metrics.jsonl, one panel each, runs overlaid.
    Returns the metric names drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("beit plot needs matplotlib: pip install 'beit[plot]' (or matplotlib).") from None
    series = {}
    for run in runs:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise ValueError(f"{run} has no metrics.jsonl: pass a run folder written by `beit pretrain` or `finetune`.")
        series[str(run)] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    present = [(k, title) for k, title in PANELS if any(k in row for rows in series.values() for row in rows)]
    columns = 3
    rows_n = (len(present) + columns - 1) // columns
    figure, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 3.2 * rows_n), squeeze=False)
    for axis, (key, title) in zip(axes.flat, present, strict=False):
        for name, rows in series.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            axis.plot([p[0] for p in points], [p[1] for p in points], label=Path(name).name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if key == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for axis in list(axes.flat)[len(present) :]:
        axis.axis("off")
    if len(series) > 1:
        axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return [k for k, _ in present]
