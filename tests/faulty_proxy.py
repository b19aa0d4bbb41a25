"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a real server (moto), for tests: it
passes every request on, and while a fault is set answers the requests it matches with it:

    refuse     from the first matching request (reset), nothing listens on the port (connections
               refused) for `seconds`
    reset      the answer's head and half its body, then a TCP reset
    slowdown   503 with S3's SlowDown error
    internal   500 with S3's InternalError
    slow       the answer's body trickled out in 20 pieces over about `trickle` seconds
    truncate   the answer's head (its full Content-Length) and half its body, then the
               connection closed

A fault lasts for the next `times` matching requests, or for `seconds`; `method` and `path` (a
regular expression searched in the request's path) choose the requests it matches. Plain
standard library, a thread per connection, HTTP/1.1 keep-alive on both sides.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("refuse", "reset", "slowdown", "internal", "slow", "truncate")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Fault:
    kind: str
    method: str | None = None
    path: str | None = None
    times: int | None = None  # the next `times` matching requests
    until: float | None = None  # or every matching request until then (time.monotonic)
    trickle: float = 0.4
    after: str | None = None  # armed by the first request whose "METHOD /path" matches (that one passes)
    seconds: float | None = None  # an armed fault lasts this long from then

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return self.path is None or re.search(self.path, path) is not None


class FaultyProxy:
    """The proxy: `start()` gives its endpoint; `inject(...)` sets a fault; `hits` counts the
    requests answered with the last fault; `requests` lists them all."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.port = 0
        self.fault: Fault | None = None
        self.hits = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request passed on or faulted
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.connections: set[socket.socket] = set()

    def start(self) -> str:
        self._listen()
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):  # a connection the fault cut: nothing to report
                pass

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def _stop_listening(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self.lock:
            open_connections = list(self.connections)
        for connection in open_connections:  # kept-alive connections go too: the next request reconnects
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def inject(
        self,
        kind: str,
        times: int | None = None,
        seconds: float | None = None,
        method: str | None = None,
        path: str | None = None,
        trickle: float = 0.4,
        after: str | None = None,
    ) -> None:
        """Answer the next `times` requests matching `method` and `path` (or all of them for
        `seconds`) with the fault `kind`; with `after` (a pattern of "METHOD /path"), from the
        request after the first one it matches on (`seconds` counted from there). `refuse` takes
        `seconds` only: the port is closed that long from the first request it matches."""
        assert kind in KINDS, kind
        self.hits = 0
        if after is not None:
            assert kind != "refuse"
            with self.lock:
                self.fault = Fault(kind, method, path, times, None, trickle, after=after, seconds=seconds)
            return
        if kind == "refuse":
            assert seconds is not None and times is None
            with self.lock:
                self.fault = Fault(kind, method, path, times=1, trickle=seconds)
            return
        until = time.monotonic() + seconds if seconds is not None else None
        with self.lock:
            self.fault = Fault(kind, method, path, times, until, trickle)

    def refuse(self, seconds: float) -> None:
        """Close the port (and every open connection) for `seconds`."""
        self._stop_listening()
        threading.Timer(seconds, self._listen).start()

    def clear(self) -> None:
        with self.lock:
            self.fault = None

    def take(self, method: str, path: str) -> Fault | None:
        """The fault for this request, if one applies (a `times` fault counted down)."""
        with self.lock:
            self.requests.append((method, path))
            fault = self.fault
            if fault is not None and fault.after is not None:
                if re.search(fault.after, f"{method} {path}"):
                    fault.after = None
                    fault.until = time.monotonic() + fault.seconds if fault.seconds is not None else None
                return None
            if fault is None or not fault.matches(method, path):
                return None
            if fault.until is not None and time.monotonic() > fault.until:
                self.fault = None
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.fault = None
            self.hits += 1
            return fault

    def close(self) -> None:
        self.clear()
        self._stop_listening()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultyProxy

    def setup(self) -> None:
        super().setup()
        with self.owner.lock:
            self.owner.connections.add(self.connection)
        self.upstream_connection: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        with self.owner.lock:
            self.owner.connections.discard(self.connection)
        if self.upstream_connection is not None:
            self.upstream_connection.close()
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_request(self) -> None:
        body = self._body()
        fault = self.owner.take(self.command, urlsplit(self.path).path)
        if fault is not None and fault.kind in ERRORS:
            return self._error(*ERRORS[fault.kind])
        if fault is not None and fault.kind == "refuse":
            threading.Thread(target=self.owner.refuse, args=(fault.trickle,)).start()
            return self._reset()
        status, reason, headers, answer = self._forward(body)
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if self.command == "HEAD" or not answer:
            if fault is not None and fault.kind == "reset":
                self._reset()
            return None
        if fault is None:
            self.wfile.write(answer)
        elif fault.kind == "slow":
            piece = max(1, len(answer) // 20)
            for start in range(0, len(answer), piece):
                self.wfile.write(answer[start : start + piece])
                self.wfile.flush()
                time.sleep(fault.trickle / 20)
        elif fault.kind in ("reset", "truncate"):
            self.wfile.write(answer[: len(answer) // 2])
            self.wfile.flush()
            if fault.kind == "reset":
                self._reset()
            else:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_WR)
        return None

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_request

    def _body(self) -> bytes:
        """The request's body: by its Content-Length, or its chunks put together."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """The upstream server's answer to this request: (status, reason, headers, body)."""
        for attempt in range(2):  # a kept-alive upstream connection may have closed: once more on a new one
            if self.upstream_connection is None:
                self.upstream_connection = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
            connection = self.upstream_connection
            try:
                connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        connection.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body or None)
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self.upstream_connection = None
                if attempt:
                    raise
                continue
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
            return response.status, response.reason, headers, answer
        raise AssertionError("unreachable")

    def _error(self, status: int, code: str, message: str) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{self.path}</Resource><RequestId>faulty-proxy</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """End the connection with a TCP reset (RST), not a close."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
