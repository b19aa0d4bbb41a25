"""Work done ahead in a thread (`beit.shared.prefetch`): the order holds, an error reaches the
caller, and closing stops the thread."""

import threading
import time

import pytest

from beit.shared.prefetch import ahead, prefetch


def test_ahead_keeps_the_order_and_works_in_another_thread():
    threads = set()

    def make(item):
        threads.add(threading.get_ident())
        time.sleep(0.001 * (item % 3))
        return item * item

    assert list(ahead(range(20), make, depth=3)) == [i * i for i in range(20)]
    assert threads and threading.get_ident() not in threads


def test_an_error_in_the_thread_is_raised_in_the_caller():
    def make(item):
        if item == 3:
            raise ValueError("image 3 is broken")
        return item

    results = []
    with pytest.raises(ValueError, match="image 3 is broken"):
        for value in ahead(range(10), make):
            results.append(value)
    assert results == [0, 1, 2]


def test_closing_stops_the_thread():
    made = []
    stream = prefetch(lambda step: made.append(step) or step, 5, depth=2)
    assert [next(stream) for _ in range(3)] == [5, 6, 7]
    stream.close()
    count = len(made)
    time.sleep(0.05)
    assert len(made) == count and count <= 3 + 2 + 1  # at most `depth` ahead, plus the one in hand


def test_closing_waits_a_bounded_time_for_a_thread_stuck_in_its_item(monkeypatch):
    """A thread stuck in an item (a read of failing storage, a loop stopped at exit) does not hold
    the caller: closing waits CLOSE_WAIT for it, then leaves the daemon thread to end by itself."""
    import beit.shared.prefetch as module

    monkeypatch.setattr(module, "CLOSE_WAIT", 0.3)
    release = threading.Event()
    started = threading.Event()

    def make(item):
        if item == 1:
            started.set()
            release.wait(60)
        return item

    items = ahead(range(5), make, depth=1)
    assert next(items) == 0
    assert started.wait(10)
    begin = time.monotonic()
    items.close()
    assert 0.3 <= time.monotonic() - begin < 5
    release.set()
