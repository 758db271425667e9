"""The health and metrics listener in-process on a loopback port (SPEC §9): routes, status codes, HTTP/1.1
framing, and clients that are malformed, oversized, slow, silent, half-closed or too many.

Raw clients are anyio socket streams in the same event loop as the server, so nothing here blocks it.
"""

from __future__ import annotations

import contextlib
import errno
import re
import time
from typing import TYPE_CHECKING, Any

import anyio
import h11
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.primitives.breaker import BreakerState
from daemon.primitives.queue import QueueStats
from daemon.runtime.health import MAX_REQUESTS_PER_CONNECTION, HealthServer
from daemon.runtime.metrics import Metrics
from daemon.runtime.report import HealthReport, iso

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import SocketStream

HOST = "127.0.0.1"
HEALTH_PATHS = ("/api/monitoring/health", "/health")
FAST_S = 0.5  # a normal GET must answer well within this, whatever else is going on


class Reporter:
    """A plain ``report`` callable whose status the test sets; a new body each call, as the daemon builds."""

    def __init__(self, status: str = "healthy") -> None:
        self.status = status
        self.calls = 0

    def __call__(self) -> HealthReport:
        self.calls += 1
        checks = {
            "database": {"status": "unhealthy" if self.status == "unhealthy" else "healthy", "connected": True},
            "circuit_breaker": {"status": "degraded" if self.status == "degraded" else "healthy", "state": "CLOSED"},
        }
        return HealthReport(self.status, {"timestamp": iso(time.time()), "status": self.status, "checks": checks})


def make_server(
    reporter: Reporter | None = None,
    metrics: Metrics | None = None,
    **kwargs: Any,
) -> HealthServer:
    return HealthServer(reporter or Reporter(), (metrics or Metrics()).exposition, **kwargs)


@contextlib.asynccontextmanager
async def running(server: HealthServer) -> AsyncIterator[int]:
    """Serve in a task group for the block; a crash of the server task fails the test that runs it."""
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(server.serve, HOST, 0)
        assert server.port == port
        yield port
        tg.cancel_scope.cancel()


async def get(port: int, path: str = "/api/monitoring/health", method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.request(method, f"http://{HOST}:{port}{path}")


async def assert_answers(port: int) -> None:
    """A normal health GET on a fresh connection answers 200, fast."""
    started = time.perf_counter()
    response = await get(port)
    elapsed_s = time.perf_counter() - started
    assert response.status_code == 200
    assert response.json()["status"] == "healthy"
    assert elapsed_s < FAST_S, f"health took {elapsed_s:.3f}s"


async def read_until_closed(stream: SocketStream, timeout_s: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection; ``closed`` is False on timeout."""
    data = b""
    with anyio.move_on_after(timeout_s):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return data, True
    return data, False


async def h11_exchange(
    stream: SocketStream, client: h11.Connection, request: h11.Request
) -> tuple[h11.Response, bytes]:
    """Send one request on an existing connection and read its whole response."""
    await stream.send(client.send(request) + client.send(h11.EndOfMessage()))
    response: h11.Response | None = None
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive())
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, body
        else:
            raise AssertionError(f"unexpected {event!r}")


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key == name.lower()), None)


# -- routes and status codes ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", HEALTH_PATHS)
@pytest.mark.parametrize(("status", "code"), [("healthy", 200), ("degraded", 503), ("unhealthy", 500)])
async def test_health_code_follows_report_status(path: str, status: str, code: int) -> None:
    """Both health paths answer 200/503/500 for healthy/degraded/unhealthy with the documented JSON body."""
    reporter = Reporter(status)
    async with running(make_server(reporter)) as port:
        response = await get(port, path)
    assert response.status_code == code
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"timestamp", "status", "checks", "response_time_ms"}
    assert body["status"] == status
    assert body["timestamp"].endswith("Z")
    assert body["checks"]["database"]["connected"] is True
    assert isinstance(body["response_time_ms"], int | float)
    assert 0 <= body["response_time_ms"] < 100
    assert reporter.calls == 1


async def test_each_request_reads_a_fresh_report() -> None:
    """The listener calls ``report`` per request, so a status change shows on the next probe."""
    reporter = Reporter("healthy")
    async with running(make_server(reporter)) as port:
        first = await get(port)
        reporter.status = "degraded"
        second = await get(port)
    assert (first.status_code, second.status_code) == (200, 503)
    assert second.json()["status"] == "degraded"


@pytest.mark.parametrize("path", [*HEALTH_PATHS, "/metrics"])
async def test_head_has_get_status_and_headers_and_no_body(path: str) -> None:
    """HEAD answers with GET's status and headers (Content-Length included) and not one byte of body."""
    async with running(make_server(Reporter("degraded"))) as port:
        got = await get(port, path)
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            await stream.send(f"HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            raw, closed = await read_until_closed(stream, 3)
    assert closed
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw
    assert rest == b"", f"HEAD sent a body: {rest[:80]!r}"
    lines = head.decode().split("\r\n")
    assert lines[0].split(" ")[1] == str(got.status_code)
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == got.headers["content-type"]
    # Both bodies carry live figures (timings; the process's CPU time, memory and open files), so the two
    # lengths differ a little between two requests; what matters is that HEAD announces a GET-sized body.
    assert abs(int(headers["content-length"]) - int(got.headers["content-length"])) <= 64


@pytest.mark.parametrize("path", ["/api/monitoring/health?verbose=1&x=%20", "/health?", "/metrics?name[]=a"])
async def test_query_string_is_ignored(path: str) -> None:
    """A query string does not change the route: health and metrics still answer 200."""
    async with running(make_server()) as port:
        response = await get(port, path)
    assert response.status_code == 200
    if path.startswith("/metrics"):
        assert b"seatwatch_" in response.content
    else:
        assert response.json()["status"] == "healthy"


async def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    """Two requests, one after the other, are both answered on the same HTTP/1.1 connection."""
    async with running(make_server()) as port:
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            client = h11.Connection(h11.CLIENT)
            first, body1 = await h11_exchange(
                stream, client, h11.Request(method="GET", target="/health", headers=[("Host", "t")])
            )
            assert client.their_state is h11.DONE  # a complete response, connection kept
            client.start_next_cycle()
            second, body2 = await h11_exchange(
                stream, client, h11.Request(method="GET", target="/metrics", headers=[("Host", "t")])
            )
    assert (first.status_code, second.status_code) == (200, 200)
    assert orjson.loads(body1)["status"] == "healthy"
    assert b"seatwatch_sections_checked" in body2


async def test_pipelined_requests_are_answered_in_order() -> None:
    """Two requests sent in one write get two responses, in order, on the same connection."""
    async with running(make_server()) as port:
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            await stream.send(
                b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            raw, closed = await read_until_closed(stream, 3)
    assert closed
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"200", b"404"]


async def test_last_request_of_a_connection_announces_the_close() -> None:
    """The response after which the server closes a kept-alive connection says ``Connection: close``."""
    # Otherwise a keep-alive client races the close and its next request is reset (seen in bench/health.py).
    async with running(make_server()) as port:
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            client = h11.Connection(h11.CLIENT)
            response: h11.Response | None = None
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                response, _ = await h11_exchange(
                    stream, client, h11.Request(method="GET", target="/health", headers=[("Host", "t")])
                )
                assert response.status_code == 200
                if client.their_state is h11.MUST_CLOSE:
                    break
                client.start_next_cycle()
            _, closed = await read_until_closed(stream, 3)
    assert response is not None
    assert closed, "the server kept the connection open past its per-connection limit"
    assert header(response, b"connection") == b"close"


@pytest.mark.parametrize(
    "path", ["/", "/healthz", "/api/monitoring", "/api/monitoring/health/x", "/metrics/x", "/HEALTH"]
)
async def test_other_paths_are_404(path: str) -> None:
    """Any path other than the two health paths and /metrics is 404, for GET and HEAD alike."""
    async with running(make_server()) as port:
        response = await get(port, path)
        head = await get(port, path, method="HEAD")
    assert response.status_code == 404
    assert head.status_code == 404
    assert head.content == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/api/monitoring/health", "/metrics", "/elsewhere"])
async def test_other_methods_are_405_with_allow(method: str, path: str) -> None:
    """A method other than GET or HEAD is 405 with ``Allow: GET, HEAD``; a request body does not confuse it."""
    reporter = Reporter()
    async with running(make_server(reporter)) as port, httpx.AsyncClient(timeout=5) as client:
        response = await client.request(method, f"http://{HOST}:{port}{path}", content=b'{"x": 1}')
        after = await client.get(f"http://{HOST}:{port}/health")  # same connection: the body was consumed
    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert allowed == {"GET", "HEAD"}
    assert after.status_code == 200
    assert reporter.calls == 1  # the 405 never built a report


# -- robustness --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /health HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad chunk
        b"GET /health HTTP/1.1\r\nHost: t\r\nBad Header Line\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: -5\r\nHost: t\r\n\r\n",
        b"\x00\xff\xfe" * 300 + b"\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)),  # a TLS ClientHello
    ],
)
async def test_garbage_bytes_get_400_or_close(garbage: bytes) -> None:
    """Bytes that are not HTTP/1.1 are answered 400 or the connection is closed; the server keeps serving."""
    async with running(make_server(request_timeout_s=1.0)) as port:
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            await stream.send(garbage)
            raw, closed = await read_until_closed(stream, 3)
        assert closed
        assert raw == b"" or raw.startswith(b"HTTP/1.1 400 "), raw[:100]
        await assert_answers(port)


async def test_huge_header_gets_431_or_close() -> None:
    """A request head over 16 KiB is refused (431 or closed) without reading it whole; the server keeps serving."""
    async with running(make_server(request_timeout_s=2.0)) as port:
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (64 * 1024) + b"\r\n\r\n")
            raw, closed = await read_until_closed(stream, 3)
        assert closed
        assert raw == b"" or raw.startswith(b"HTTP/1.1 431 "), raw[:100]
        await assert_answers(port)


async def test_headers_below_the_limit_are_served() -> None:
    """A request with 8 KiB of headers (big cookies) is still an ordinary request."""
    async with running(make_server()) as port, httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://{HOST}:{port}/health", headers={"Cookie": "c=" + "x" * 8192})
    assert response.status_code == 200


@pytest.mark.slow
async def test_slow_client_is_closed_after_the_request_timeout() -> None:
    """A client sending one byte per 0.5 s is cut off at the request timeout; others are served meanwhile."""
    timeout_s = 1.5
    request = b"GET /api/monitoring/health HTTP/1.1\r\nHost: t\r\n\r\n"
    async with running(make_server(request_timeout_s=timeout_s)) as port:
        stream = await anyio.connect_tcp(HOST, port)
        started = time.monotonic()
        closed_after_s: float | None = None
        sent = 0
        async with stream:
            for byte in request:
                try:
                    await stream.send(bytes([byte]))
                except (anyio.BrokenResourceError, OSError):
                    closed_after_s = time.monotonic() - started
                    break
                sent += 1
                raw, closed = await read_until_closed(stream, 0.5)
                if closed:
                    closed_after_s = time.monotonic() - started
                    assert raw == b"" or raw.startswith(b"HTTP/1.1 408 "), raw[:100]
                    break
                if sent == 2:
                    await assert_answers(port)  # the trickle does not hold up anyone else
        assert closed_after_s is not None, "the slow client was served the whole request"
        assert timeout_s - 0.2 <= closed_after_s <= timeout_s + 1.0
        assert sent < len(request)
        await assert_answers(port)


@pytest.mark.slow
async def test_silent_client_is_closed_after_the_request_timeout() -> None:
    """A client that connects and sends nothing is closed at the request timeout and blocks nobody."""
    timeout_s = 1.0
    async with running(make_server(request_timeout_s=timeout_s)) as port:
        stream = await anyio.connect_tcp(HOST, port)
        started = time.monotonic()
        async with stream:
            await assert_answers(port)
            raw, closed = await read_until_closed(stream, timeout_s + 2)
        elapsed_s = time.monotonic() - started
        assert closed
        assert raw == b"" or raw.startswith(b"HTTP/1.1 408 "), raw[:100]
        assert timeout_s - 0.2 <= elapsed_s <= timeout_s + 1.0
        await assert_answers(port)


async def test_half_closed_partial_request_is_closed_at_once() -> None:
    """A client that shuts down its sending side mid-request is closed at once, not at the request timeout."""
    async with running(make_server(request_timeout_s=5.0)) as port:
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            await stream.send(b"GET /api/monitoring/health HTTP/1.1\r\nHost: t\r\n")
            await stream.send_eof()
            started = time.monotonic()
            raw, closed = await read_until_closed(stream, 3)
        assert closed
        assert time.monotonic() - started < 1.0
        assert raw == b"" or raw.startswith(b"HTTP/1.1 400 "), raw[:100]
        await assert_answers(port)


async def test_half_closed_after_a_whole_request_still_gets_the_answer() -> None:
    """A whole request followed by shutdown(SHUT_WR), as `printf ... | nc` does, is answered, then closed."""
    async with running(make_server(request_timeout_s=5.0)) as port:
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            await stream.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            await stream.send_eof()
            raw, closed = await read_until_closed(stream, 3)
    assert closed
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert orjson.loads(raw.partition(b"\r\n\r\n")[2])["status"] == "healthy"


async def open_idle(port: int, n: int) -> list[SocketStream]:
    streams: list[SocketStream] = []

    async def one() -> None:
        streams.append(await anyio.connect_tcp(HOST, port))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return streams


async def closed_by_server(streams: list[SocketStream], within_s: float) -> int:
    """How many of these connections the server closes within the time."""
    closed = 0

    async def check(stream: SocketStream) -> None:
        nonlocal closed
        _, was_closed = await read_until_closed(stream, within_s)
        closed += was_closed

    async with anyio.create_task_group() as tg:
        for stream in streams:
            tg.start_soon(check, stream)
    return closed


@pytest.mark.slow
async def test_idle_connection_flood_is_bounded_and_expires() -> None:
    """Idle connections beyond ``max_connections`` are closed at once, the rest at the request timeout."""
    max_connections, timeout_s, flood = 8, 1.5, 150
    async with running(make_server(max_connections=max_connections, request_timeout_s=timeout_s)) as port:
        streams = await open_idle(port, flood)
        try:
            dropped = await closed_by_server(streams, 0.5)
            assert flood - max_connections <= dropped < flood
            expired = await closed_by_server(streams, timeout_s + 1.0)
            assert expired == flood  # every connection is closed now, held ones by the timeout
        finally:
            for stream in streams:
                await stream.aclose()
        await assert_answers(port)


async def test_slots_come_back_when_idle_clients_leave() -> None:
    """When connections holding every slot go away, the next GET is served at once, not after a timeout."""
    max_connections = 8
    async with running(make_server(max_connections=max_connections, request_timeout_s=30.0)) as port:
        streams = await open_idle(port, 120)
        await anyio.sleep(0.3)  # let the server accept them all
        for stream in streams:
            await stream.aclose()
        await anyio.sleep(0.1)
        await assert_answers(port)


async def test_failing_report_does_not_stop_the_server() -> None:
    """A ``report`` that raises costs that one request (500 or closed), and the next request is served."""
    reporter = Reporter()

    def report() -> HealthReport:
        if reporter.status == "broken":
            raise RuntimeError("report broke")
        return reporter()

    server = HealthServer(report, Metrics().exposition)
    async with running(server) as port:
        reporter.status = "broken"
        try:
            broken = await get(port)
        except httpx.RemoteProtocolError:
            pass
        else:
            assert broken.status_code == 500
        reporter.status = "healthy"
        await assert_answers(port)


async def test_port_in_use_fails_at_start_with_a_clear_message() -> None:
    """A second listener on a bound port raises OSError(EADDRINUSE) from ``tg.start``, naming host and port."""
    async with running(make_server()) as port:
        second = make_server()
        async with anyio.create_task_group() as tg:
            with pytest.raises(OSError, match=rf"cannot bind {HOST}:{port}") as caught:
                await tg.start(second.serve, HOST, port)
        assert caught.value.errno == errno.EADDRINUSE
        await assert_answers(port)  # the first one is untouched


# -- metrics -----------------------------------------------------------------------------------------------


def populated_metrics() -> Metrics:
    """A real Metrics with every labelled family moved through its own methods."""
    metrics = Metrics()
    for result in ("changed", "unchanged", "not_found", "failed"):
        metrics.sections.labels(result).inc()
    metrics.scrape_seconds.observe(0.3)
    metrics.scrape_seconds.observe(4.0)
    for kind in ("seat_available", "instructor_assigned"):
        metrics.notifications.labels(kind).inc(2)
        metrics.emails.labels(kind, "sent").inc(2)
        metrics.emails.labels(kind, "failed").inc()
    metrics.refresh(
        queue=QueueStats(waiting=7, pending=3, delayed=2, dead_letters=1),
        breaker=BreakerState(
            state="HALF_OPEN",
            failures=10,
            successes=1,
            last_failure_ms=1_700_000_000_000,
            last_change_ms=1_700_000_100_000,
            in_flight=1,
            retry_after_s=0.0,
        ),
        outbox={"pending": 5, "failed": 2},
        redis_commands={"queue": 40, "breaker": 12, "lock": 4, "startup": 9},
        ages={"queue": 1.5, "breaker": 1.5, "database": 0.2},
    )
    return metrics


def samples(families: dict[str, Any], family: str, sample: str) -> dict[tuple[tuple[str, str], ...], float]:
    assert family in families, f"no family {family}; have {sorted(families)}"
    return {tuple(sorted(s.labels.items())): s.value for s in families[family].samples if s.name == sample}


async def test_metrics_exposition_has_the_spec_families() -> None:
    """/metrics is Prometheus text that parses, with every family SPEC §9 lists, labelled as documented."""
    async with running(make_server(metrics=populated_metrics())) as port:
        response = await get(port, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}

    checked = samples(families, "seatwatch_sections_checked", "seatwatch_sections_checked_total")
    assert {labels[0][1] for labels in checked} == {"changed", "unchanged", "not_found", "failed"}
    assert families["seatwatch_scrape_duration_seconds"].type == "histogram"
    assert samples(families, "seatwatch_scrape_duration_seconds", "seatwatch_scrape_duration_seconds_count") == {
        (): 2.0
    }
    queued = samples(families, "seatwatch_notifications_queued", "seatwatch_notifications_queued_total")
    assert queued == {(("type", "seat_available"),): 2.0, (("type", "instructor_assigned"),): 2.0}
    emails = samples(families, "seatwatch_emails", "seatwatch_emails_total")
    for kind in ("seat_available", "instructor_assigned"):
        assert emails[(("outcome", "sent"), ("type", kind))] == 2.0
        assert emails[(("outcome", "failed"), ("type", kind))] == 1.0
    depth = samples(families, "seatwatch_queue_jobs", "seatwatch_queue_jobs")
    assert depth[(("state", "waiting"),)] == 7.0
    assert depth[(("state", "pending"),)] == 3.0
    assert samples(families, "seatwatch_queue_dead_letters", "seatwatch_queue_dead_letters") == {(): 1.0}
    outbox = samples(families, "seatwatch_outbox_rows", "seatwatch_outbox_rows")
    assert outbox == {(("status", "pending"),): 5.0, (("status", "failed"),): 2.0, (("status", "suppressed"),): 0.0}
    breaker = samples(families, "seatwatch_breaker_state", "seatwatch_breaker_state")
    assert breaker == {(("state", "CLOSED"),): 0.0, (("state", "HALF_OPEN"),): 1.0, (("state", "OPEN"),): 0.0}
    commands = samples(families, "seatwatch_redis_commands", "seatwatch_redis_commands")
    assert commands[(("purpose", "queue"),)] == 40.0
    assert commands[(("purpose", "breaker"),)] == 12.0


async def test_metrics_are_generated_per_scrape() -> None:
    """Each /metrics request renders the registry anew, so a counter moved between scrapes shows at once."""
    metrics = Metrics()
    async with running(make_server(metrics=metrics)) as port:
        before = await get(port, "/metrics")
        metrics.sections.labels("changed").inc(3)
        after = await get(port, "/metrics")

    def changed(text: str) -> float | None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "seatwatch_sections_checked_total" and sample.labels == {"result": "changed"}:
                    return float(sample.value)
        return None

    assert changed(before.text) is None
    assert changed(after.text) == 3.0
