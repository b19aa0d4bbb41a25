"""Runs `beit` command lines for the quality experiments (bench/quality/quality.py, ablation.py)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Runner:
    """`beit` command lines, --jobs at a time with the cores split between them; each one's
    output in WORK/logs/NAME.log, and what it printed in WORK/done/NAME.out once it succeeded (a
    step done is not run again)."""

    def __init__(self, work: Path, jobs: int, split_every_step: bool = True):
        # split_every_step: the cores are split for every command (as the ablation table was
        # measured), else only for those run with `threads` (quality.py's pools)
        self.work, self.jobs, self.split_every_step = work, jobs, split_every_step
        self.threads = max(1, (os.cpu_count() or 2) // jobs)
        self.times: dict[str, float] = {}
        for folder in ("logs", "done"):
            (work / folder).mkdir(parents=True, exist_ok=True)

    def beit(self, name: str, line: str, threads: bool = False) -> str:
        done = self.work / "done" / f"{name}.out"
        if done.is_file():
            return done.read_text()
        env = dict(os.environ)
        if self.jobs > 1 and (threads or self.split_every_step):
            env["OMP_NUM_THREADS"] = str(self.threads)
            if threads:
                line += f" --set threads={self.threads}"
        command = [sys.executable, "-m", "beit", *shlex.split(line)]
        log = self.work / "logs" / f"{name}.log"
        start = time.perf_counter()
        with open(log, "w") as handle:
            handle.write(shlex.join(command) + "\n")
            handle.flush()
            run = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=handle, text=True)
        self.times[name] = time.perf_counter() - start
        if run.returncode:
            raise SystemExit(f"{name} failed (exit {run.returncode}): see {log}")
        last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        print(f"  {name}: {self.times[name]:.0f} s  {last}", flush=True)
        done.write_text(run.stdout)
        return run.stdout

    def pool(self, jobs: list[tuple[str, str, bool]]) -> list[str]:
        with ThreadPoolExecutor(self.jobs) as executor:
            futures = [executor.submit(self.beit, name, line, threads) for name, line, threads in jobs]
            return [future.result() for future in futures]
