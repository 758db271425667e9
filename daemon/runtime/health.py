"""The health and metrics listener: serves what ``runtime.report`` builds from the monitor's snapshot.

``GET /api/monitoring/health`` (and ``/health``) answers from memory: the monitor probes Postgres
(``SELECT 1``) and Redis (``PING``, which Upstash does not bill) every few seconds, and everything else is
what the daemon last saw, with its age. So a probe costs no Redis command and answers in well under a
millisecond of work. ``GET /metrics`` is the Prometheus exposition. Anything else: 404; a method other than
GET or HEAD: 405.

HTTP parsing is h11's; every connection has a deadline per request, a header size limit and a share of a
bounded number of connection slots, so malformed, oversized, slow or half-closed clients cannot disturb the
daemon.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

import anyio
import h11
import orjson

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import SocketStream, TaskStatus

    from daemon.runtime.report import HealthReport

logger = logging.getLogger(__name__)

HEALTH_PATHS: Final = frozenset({"/api/monitoring/health", "/health"})
METRICS_PATH: Final = "/metrics"
MAX_HEADER_BYTES: Final = 16 * 1024
REQUEST_TIMEOUT_S: Final = 5.0
MAX_CONNECTIONS: Final = 64
MAX_REQUESTS_PER_CONNECTION: Final = 100


class HealthServer:
    """Serves ``report()`` and ``metrics()`` over HTTP/1.1 (h11)."""

    def __init__(
        self,
        report: Callable[[], HealthReport],
        metrics: Callable[[], bytes],
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.report = report
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.slots = anyio.Semaphore(max_connections)
        self.port: int | None = None
        self.served = 0

    async def serve(self, host: str, port: int, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind (a port in use fails here, at start) and serve until cancelled; reports the bound port."""
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
        except OSError as exc:
            error = OSError(f"health listener cannot bind {host}:{port}: {exc.strerror or exc}")
            error.errno = exc.errno
            raise error from exc
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._connection)

    async def _connection(self, stream: SocketStream) -> None:
        if self.slots.value == 0:
            # Too many connections at once: drop this one rather than queue it.
            await stream.aclose()
            return
        async with self.slots, stream:
            try:
                await self._serve_connection(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                pass
            except Exception:
                logger.exception("health listener: unexpected error on a connection")

    async def _serve_connection(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        for n in range(1, MAX_REQUESTS_PER_CONNECTION + 1):
            with anyio.move_on_after(self.request_timeout_s) as scope:
                try:
                    request = await self._read_request(conn, stream)
                except h11.RemoteProtocolError as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._send(conn, stream, exc.error_status_hint, b"bad request\n", "text/plain")
                    return
            if scope.cancelled_caught or request is None:
                return  # a slow or silent client: close
            # The last request a connection may carry says so, so a keep-alive client does not race the close.
            await self._respond(conn, stream, request, last=n == MAX_REQUESTS_PER_CONNECTION)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_request(self, conn: h11.Connection, stream: SocketStream) -> h11.Request | None:
        request: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(8192)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None
            # h11.Data (a body we ignore) loops on

    async def _respond(self, conn: h11.Connection, stream: SocketStream, request: h11.Request, *, last: bool) -> None:
        self.served += 1
        method = request.method.decode("ascii", "replace").upper()
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        extra = [("Connection", "close")] if last else []
        if method not in ("GET", "HEAD"):
            status, body, content_type = 405, b"method not allowed\n", "text/plain"
            extra.append(("Allow", "GET, HEAD"))
        elif path in HEALTH_PATHS:
            started = time.perf_counter()
            report = self.report()
            report.body["response_time_ms"] = round((time.perf_counter() - started) * 1000, 3)
            status, body, content_type = report.code, orjson.dumps(report.body) + b"\n", "application/json"
        elif path == METRICS_PATH:
            status, body, content_type = 200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8"
        else:
            status, body, content_type = 404, b"not found\n", "text/plain"
        await self._send(conn, stream, status, body, content_type, head=method == "HEAD", extra=extra)

    async def _send(
        self,
        conn: h11.Connection,
        stream: SocketStream,
        status: int,
        body: bytes,
        content_type: str,
        *,
        head: bool = False,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *(extra or []),
        ]
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if not head:
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        with anyio.move_on_after(self.request_timeout_s):
            await stream.send(data)
