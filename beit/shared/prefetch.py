"""Work done ahead in a thread while the caller uses what came before: decoding the next batches
while a model runs on this one (DALI, numpy and torch release the GIL while they work)."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator


def ahead(items: Iterable, make: Callable, depth: int = 2) -> Iterator:
    """make(item) for each of `items`, in order, computed up to `depth` ahead in a thread; an
    error in the thread is raised in the caller. Closing the generator stops the thread."""
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
        while thread.is_alive():
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def prefetch(make: Callable[[int], object], start_step: int, depth: int = 2) -> Iterator:
    """make(start_step), make(start_step + 1), ... without end, computed `depth` ahead in a thread."""
    return ahead(itertools.count(start_step), make, depth)
