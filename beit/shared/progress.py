"""Progress bars: live on a terminal, a line every 10 seconds in logs (CI, nohup, tee)."""

from __future__ import annotations

import sys


def progress_bar(**kwargs):
    from tqdm import tqdm

    return tqdm(mininterval=0.1 if sys.stderr.isatty() else 10.0, **kwargs)
