"""Preemption: schedulers stop a job with a signal and a grace period (SLURM sends SIGTERM, or
with `--signal` a chosen one minutes ahead; Kubernetes and spot instances send SIGTERM). Every
long command catches SIGTERM and the config's `stop_signal` (SIGUSR1 by default) and stops
cleanly: a trainer finishes the step in flight, every rank agrees to stop at the same step, one
checkpoint is written there and the command exits with PREEMPTED (75, EX_TEMPFAIL: "try again");
stage 1 finishes the chunk in flight, which the store records as done. A second signal, more
than REPEAT seconds after the first, stops at once (the signal's own action; what was saved before
still resumes): one scheduler signal that reaches a rank twice, from the scheduler and forwarded by
torchrun, counts once.

    with StopSignals(cfg.stop_signal) as stops:   # handlers installed (main thread only)
        ... stops.received ...                     # the signal's name once one came, else None
    raise Preempted(...)                           # after the checkpoint; the CLI exits 75

A run folder stopped this way holds `preempted.json` (the signal, the step, the checkpoint) until
the run starts again, for scheduler scripts that cannot see the exit code (torchrun reports its
own).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

PREEMPTED = 75  # the exit code of a command stopped by a signal after saving: run it again to resume
MARKER = "preempted.json"
REPEAT = 2.0  # seconds: a signal again within this is the same one delivered twice


class Preempted(Exception):
    """Raised once the state at the step in flight is saved; the CLI prints it and exits PREEMPTED."""


def signal_number(name: str) -> signal.Signals | None:
    """The signal a `stop_signal` setting names ("SIGUSR1", "USR1", "usr1"; "none" or "": none)."""
    text = name.strip().upper()
    if text in ("", "NONE"):
        return None
    text = text if text.startswith("SIG") else f"SIG{text}"
    number = getattr(signal, text, None)
    if not isinstance(number, signal.Signals) or text in ("SIGKILL", "SIGSTOP") or text.startswith("SIG_"):
        raise ValueError(
            f"stop_signal {name!r} is not a signal this command can catch: use a name such as SIGUSR1, SIGUSR2 or "
            "SIGINT, or none (SIGTERM is always caught)."
        )
    return number


class StopSignals:
    """SIGTERM and `extra` caught while in use: the first sets `received`, a second one of them
    (REPEAT seconds later or more) stops the process at once. Handlers are installed only from the
    main thread (elsewhere Python cannot, and the command keeps the default actions)."""

    notice = "finishing the work in flight, saving it"  # what the command does now, in the message

    def __init__(self, extra: str = "SIGUSR1"):
        chosen = signal_number(extra)
        self.signals = [signal.SIGTERM] + ([chosen] if chosen not in (None, signal.SIGTERM) else [])
        self.received: str | None = None
        self.at = 0.0  # when the first came (time.monotonic)
        self.previous: dict[signal.Signals, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self.previous[number] = signal.signal(number, self._handle)
            _INSTALLED.append(self)
        return self

    def uninstall(self) -> None:
        for number, handler in reversed(self.previous.items()):
            signal.signal(number, handler)
        self.previous.clear()
        if self in _INSTALLED:
            _INSTALLED.remove(self)

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.received is not None:
            if time.monotonic() - self.at < REPEAT:  # the first one again (scheduler and torchrun)
                return
            self.uninstall()  # a second: the default action, now
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.received, self.at = name, time.monotonic()
        print(
            f"\nreceived {name}: {self.notice}, then exiting with code {PREEMPTED} (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


_INSTALLED: list[StopSignals] = []  # installed and not yet uninstalled, newest last


class OnePass(StopSignals):
    """A command that keeps nothing between runs (evaluate, probe, segment evaluate and predict):
    SIGTERM or SIGUSR1 ends it at the next batch (`stop_point`), with PREEMPTED and a sentence
    saying so, well inside a scheduler's grace period.

        with OnePass("beit evaluate"):
            for batch in ...:
                stop_point(f"at batch {i} of {n}")

    `stop_point` acts only inside such a command: a trainer's own evaluation goes on, and the
    trainer stops at the end of its step with its checkpoint."""

    notice = "stopping at the next batch"

    def __init__(self, command: str):
        super().__init__("SIGUSR1")
        self.command = command

    def install(self) -> OnePass:
        super().install()
        _PASSES.append(self)
        return self

    def uninstall(self) -> None:
        super().uninstall()
        if self in _PASSES:
            _PASSES.remove(self)


_PASSES: list[OnePass] = []


def stop_point(where: str) -> None:
    """Between two batches of a one-pass command: Preempted when a stop signal came (`OnePass`)."""
    if _PASSES and _PASSES[-1].received:
        stops = _PASSES[-1]
        raise Preempted(
            f"stopped by {stops.received} {where}; {stops.command} keeps nothing between runs: run the same command "
            "again."
        )


def release_all() -> None:
    """Give back every signal handler a command installed and did not uninstall (a command that
    ended with an error mid-run): the CLI calls it when a command ends, so that a process that runs
    commands in turn (a test, a notebook through the CLI's runner) keeps its own handlers."""
    while _INSTALLED:
        _INSTALLED[-1].uninstall()


def write_marker(folder: Path, **fields) -> None:
    """`preempted.json` in `folder`: what stopped the run and where it stands."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / MARKER).write_text(json.dumps({**fields, "exit_code": PREEMPTED}, indent=1) + "\n")


def clear_marker(folder: Path) -> None:
    (Path(folder) / MARKER).unlink(missing_ok=True)
