"""Object storage that fails: every read and write of an object (an image, a store chunk, a
listing) is tried again with exponential backoff while the server refuses connections, drops
them, answers 5xx or SlowDown, stalls or sends a body shorter than it announced, and stops by
count and by time with one sentence naming the URL, what failed and that running the same
command again resumes. A missing object or a denied one is an answer, not a fault: it is not
tried again.

One loop counts the tries, this module's (`retrying`, and `RetryingStore` for zarr); botocore's
and s3fs's own retries are turned off (`configure`), so the counts do not multiply. The
settings, from the environment of the command:

    BEIT_STORAGE_TRIES     8     tries of one read or write, the first included
    BEIT_STORAGE_WAIT      1     seconds before the second try, doubling up to 30 (+-25% jitter)
    BEIT_STORAGE_SECONDS   300   the most time one read or write may take, all its tries together
                                 (a listing's tries, each page bounded by the timeout, are not)
    BEIT_STORAGE_TIMEOUT   20    seconds a try waits to connect, or for the next bytes of an answer

The defaults wait out a server that is down for about 90 s (8 tries over 1+2+4+...+30 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
MAX_WAIT = 30.0  # seconds: the longest wait between two tries


class ObjectStorageError(ValueError):
    """A read or write of object storage that failed on every try; the message is one sentence."""


@dataclass(frozen=True)
class Retries:
    tries: int = 8
    wait: float = 1.0
    seconds: float = 300.0
    timeout: float = 20.0

    ENVIRONMENT = {
        "tries": "BEIT_STORAGE_TRIES",
        "wait": "BEIT_STORAGE_WAIT",
        "seconds": "BEIT_STORAGE_SECONDS",
        "timeout": "BEIT_STORAGE_TIMEOUT",
    }

    @classmethod
    def from_environment(cls) -> Retries:
        """The defaults, with each BEIT_STORAGE_* variable set in the environment in their place."""
        given = {}
        for name, variable in cls.ENVIRONMENT.items():
            text = os.environ.get(variable, "").strip()
            if not text:
                continue
            kind = int if name == "tries" else float
            try:
                value = kind(text)
            except ValueError:
                value = 0
            if value <= 0:
                raise ValueError(f"{variable}={text!r} is not a positive {kind.__name__}: set it to one, or unset it.")
            given[name] = value
        return cls(**given)

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before try `attempt` + 1: `wait` doubling up to 30 s, give or take a quarter."""
        return min(self.wait * 2 ** (attempt - 1), MAX_WAIT) * random.uniform(0.75, 1.25)


def configure() -> Retries:
    """The settings now, with s3fs (every S3FileSystem made from here on, through fsspec's
    config) set to make one request per try: no retries of its own or botocore's, and the
    settings' timeout to connect and between the bytes of an answer."""
    import fsspec.config

    retries = Retries.from_environment()
    try:
        import s3fs
    except ImportError:
        pass
    else:
        s3fs.S3FileSystem.retries = 1  # s3fs's loop: one call (a class setting, not an argument)
    s3 = dict(fsspec.config.conf.get("s3", {}))
    s3["config_kwargs"] = {
        **s3.get("config_kwargs", {}),
        "retries": {"total_max_attempts": 1, "mode": "standard"},  # botocore's loop: one request
        "connect_timeout": retries.timeout,
        "read_timeout": retries.timeout,
    }
    fsspec.config.conf["s3"] = s3
    return retries


def transient(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a fault of the server or the network that another
    try may not meet: a refused, reset or timed-out connection, a 5xx or throttling answer, a
    body shorter than announced. A missing or denied object is not."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (FileNotFoundError, PermissionError, ObjectStorageError)):
            return False
        if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError, ShortRead)):
            return True
        status, code = _answer(error)
        if status is not None:
            return status >= 500 or status in (408, 429) or code in ("SlowDown", "Throttling", "RequestTimeout")
        if type(error).__module__.split(".")[0] in ("aiohttp", "botocore", "urllib3") and _network(error):
            return True
        if type(error).__name__ == "FSTimeoutError":
            return True
        error = error.__cause__ or error.__context__
    return False


class ShortRead(OSError):
    """An object's bytes that came back fewer than its listed size."""


def _answer(error: BaseException) -> tuple[int | None, str]:
    """(HTTP status, error code) of a botocore ClientError; (None, "") for anything else."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict) or "ResponseMetadata" not in response:
        return None, ""
    status = response["ResponseMetadata"].get("HTTPStatusCode")
    return (int(status) if status else None), str(response.get("Error", {}).get("Code", ""))


def _network(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(
        names
        & {
            "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ClientOSError",
            "ServerTimeoutError", "HTTPClientError", "ConnectionError", "ConnectionClosedError",
            "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "IncompleteReadError",
            "ResponseStreamingError", "ProtocolError",
        }
    )  # fmt: skip


def describe(error: BaseException) -> str:
    """What went wrong, in a few words: '503 SlowDown', 'connection refused', 'the body ended early'."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for each in chain:
        status, code = _answer(each)
        if status is not None:  # an answer without a body (HEAD) has only its status for a code
            return f"{status} {code}" if code and code != str(status) else f"HTTP {status}"
    for each in chain:
        text = str(each)
        if isinstance(each, ConnectionRefusedError) or "refused" in text.lower():
            return "connection refused"
        if isinstance(each, ShortRead):
            return text
        if type(each).__name__ == "ClientPayloadError" or "content length" in text.lower():
            return "the answer ended before its announced length"
        if isinstance(each, ConnectionResetError) or "reset" in text.lower():
            return "connection reset"
        if isinstance(each, (TimeoutError, asyncio.TimeoutError)) or "timeout" in type(each).__name__.lower():
            return "no answer in time"
        if "disconnected" in text.lower() or "closed" in text.lower():
            return "connection closed"
    first = chain[0]
    return f"{type(first).__name__}: {first}"[:200]


def sentence(url: str, doing: str, error: BaseException, tries: int, seconds: float) -> str:
    """The one sentence for `doing` at `url` that failed on every try."""
    return (
        f"{url}: {doing} failed ({describe(error)}) on {tries} {'try' if tries == 1 else 'tries'} over "
        f"{seconds:.{0 if seconds >= 10 else 1}f} s: the object storage is failing; run the same command again "
        "once it answers, and it resumes where it stopped (BEIT_STORAGE_TRIES and BEIT_STORAGE_SECONDS say how "
        "long to wait)."
    )


def retrying(
    url: str | Callable[[], str], doing: str, action: Callable[[float], T], retries: Retries | None = None
) -> T:
    """`action(seconds left)`, tried again after a transient fault until it succeeds, or until the
    tries or the time run out: then `ObjectStorageError` naming `url` (or what `url()` names
    then). Other errors are raised as they are."""
    retries = retries or configure()
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return action(max(retries.seconds - (time.monotonic() - start), 0.001))
        except Exception as error:
            if not transient(error):
                raise
            wait, spent = retries.wait_before(attempt), time.monotonic() - start
            if attempt >= retries.tries or spent + wait >= retries.seconds:
                where = url() if callable(url) else url
                raise ObjectStorageError(sentence(where, doing, error, attempt, spent)) from None
        time.sleep(wait)


async def retrying_async(url: str, doing: str, action: Callable[[], Awaitable[T]], retries: Retries) -> T:
    """`retrying` in an event loop: each try also stops at the time left."""
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            left = max(retries.seconds - (time.monotonic() - start), 0.001)
            return await asyncio.wait_for(action(), left)
        except Exception as error:
            if not transient(error):
                raise
            wait, spent = retries.wait_before(attempt), time.monotonic() - start
            if attempt >= retries.tries or spent + wait >= retries.seconds:
                raise ObjectStorageError(sentence(url, doing, error, attempt, spent)) from None
        await asyncio.sleep(wait)


def retrying_store(url: str, read_only: bool):
    """A zarr store of the objects under `url` whose every read and write is `retrying_async`."""
    configure()
    return _store_class().from_url(url, read_only=read_only)


RetryingStore = None  # zarr's FsspecStore with every read and write tried again (made on first use)


def _store_class():
    global RetryingStore
    if RetryingStore is not None:
        return RetryingStore
    from zarr.storage import FsspecStore

    class Store(FsspecStore):
        async def get(self, key, prototype, byte_range=None):
            call = super().get
            return await self._retry(key, "reading", lambda: call(key, prototype, byte_range))

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            call = super().get_partial_values
            first = key_ranges[0][0] if key_ranges else ""
            return await self._retry(first, "reading", lambda: call(prototype, key_ranges))

        async def set(self, key, value, byte_range=None):
            call = super().set
            return await self._retry(key, "writing", lambda: call(key, value, byte_range))

        async def delete(self, key):
            call = super().delete
            return await self._retry(key, "deleting", lambda: call(key))

        async def delete_dir(self, prefix):
            call = super().delete_dir
            return await self._retry(prefix, "deleting", lambda: call(prefix))

        async def exists(self, key):
            call = super().exists
            return await self._retry(key, "looking for", lambda: call(key))

        async def getsize(self, key):
            call = super().getsize
            return await self._retry(key, "reading the size of", lambda: call(key))

        async def list_dir(self, prefix):
            listed = await self._retry(prefix, "listing", lambda: _collect(FsspecStore.list_dir(self, prefix)))
            for name in listed:
                yield name

        async def list_prefix(self, prefix):
            listed = await self._retry(prefix, "listing", lambda: _collect(FsspecStore.list_prefix(self, prefix)))
            for name in listed:
                yield name

        async def _retry(self, key: str, doing: str, action):
            where = f"{self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol}://{self.path}"
            where = f"{where}/{key}" if key else where
            return await retrying_async(where, f"{doing} it", action, Retries.from_environment())

    Store.__name__ = Store.__qualname__ = "RetryingStore"  # pickled by reference, as this module's
    RetryingStore = Store
    return Store


async def _collect(names) -> list[str]:
    return [name async for name in names]
