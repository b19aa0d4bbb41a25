"""Work done ahead in a thread while the caller uses what came before: decoding the next batches
while a model runs on this one (DALI, numpy and torch release the GIL while they work)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

CLOSE_WAIT = 10.0  # seconds a closed generator waits for its thread's item in flight


def ahead(items: Iterable, make: Callable, depth: int = 2) -> Iterator:
    """make(item) for each of `items`, in order, computed up to `depth` ahead in a thread; an
    error in the thread is raised in the caller. Closing the generator stops the thread: it waits
    up to `CLOSE_WAIT` seconds for the item in flight, then leaves a thread still busy (one waiting
    out failing object storage, say, while the caller stops on an error) to end by itself, a
    daemon that does not hold the process open."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                out.put((True, make(item)))
            out.put((True, end))
        except BaseException as error:
            out.put((False, error))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            ok, value = out.get()
            if not ok:
                raise value
            if value is end:
                return
            yield value
    finally:
        stop.set()
        deadline = time.monotonic() + CLOSE_WAIT
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def prefetch(make: Callable[[int], object], start_step: int, depth: int = 2) -> Iterator:
    """make(start_step), make(start_step + 1), ... without end, computed `depth` ahead in a thread."""
    return ahead(itertools.count(start_step), make, depth)
