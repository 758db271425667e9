"""Real HTTP servers on loopback standing in for the scraper and for Resend, speaking their wire formats.

Both run a stdlib ``ThreadingHTTPServer`` in a thread, so they serve the daemon whether it runs in the test's
event loop or in another process, and they record every request for assertions.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import orjson

SCRAPER_TOKEN = "test-scraper-token-4f1d"
RESEND_KEY = "re_test_key_9a8b7c"


@dataclass
class Reply:
    """One scripted HTTP answer. ``body`` bytes are sent as they are; anything else as JSON."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False  # close the connection without answering (an answer lost after the work was done)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return orjson.loads(self.body)


def section_data(
    *,
    seats: int | None = 0,
    capacity: int | None = 30,
    non_reserved: int | None = None,
    instructor: str = "Staff",
    subject: str = "CSE",
    catalog_nbr: str = "240",
    title: str | None = "Introduction to Programming Languages",
    location: str | None = "Tempe - COOR 170",
    meeting_times: str | None = "MWF 9:05AM-9:55AM",
) -> dict[str, Any]:
    """A scraper ``data`` object; ``None`` seat values are left out, as the scraper does when unparsed."""
    data: dict[str, Any] = {
        "subject": subject,
        "catalog_nbr": catalog_nbr,
        "title": title,
        "instructor": instructor,
        "non_reserved_seats": non_reserved,
        "location": location,
        "meeting_times": meeting_times,
    }
    if seats is not None:
        data["seats_available"] = seats
    if capacity is not None:
        data["seats_capacity"] = capacity
    return data


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        stub = self

        class Bound(handler):  # type: ignore[valid-type, misc]
            owner = stub

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Bound)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> Self:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def record(self, path: str, headers: dict[str, str], body: bytes) -> None:
        with self.lock:
            self.requests.append(Recorded(path, headers, body, time.time()))


class _Handler(BaseHTTPRequestHandler):
    owner: Any
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes; without this, Nagle's algorithm and delayed ACKs add
        # 40 ms to every answer, and a benchmark measures the stub.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _read(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, reply: Reply) -> None:
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.drop:
            self.close_connection = True
            return
        payload = reply.body if isinstance(reply.body, bytes) else orjson.dumps(reply.body)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)


# -- the scraper ---------------------------------------------------------------------------------------------


class _ScraperHandler(_Handler):
    def do_GET(self) -> None:
        self._reply(Reply(200, {"status": "ok"}) if self.path == "/health" else Reply(404, {"error": "not found"}))

    def do_POST(self) -> None:
        body = self._read()
        stub: ScraperStub = self.owner
        stub.record(self.path, dict(self.headers.items()), body)
        if self.path != "/scrape":
            self._reply(Reply(404, {"error": "not found"}))
            return
        if self.headers.get("Authorization") != f"Bearer {SCRAPER_TOKEN}":
            self._reply(Reply(401, {"error": "invalid token"}))
            return
        try:
            request = orjson.loads(body)
            key = (str(request["term"]), str(request["sectionNumber"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._reply(Reply(400, {"success": False, "error": "sectionNumber and term are required"}))
            return
        self._reply(stub.next_reply(key))


class ScraperStub(_Server):
    """``POST /scrape``: per (term, class_nbr), scripted replies are used in order, the last one sticks.

    ``set(term, class_nbr, **section_data)`` is the common case: a 200 with that data from now on.
    """

    def __init__(self) -> None:
        super().__init__(_ScraperHandler)
        self.scripts: dict[tuple[str, str], list[Reply]] = {}
        self.default: Reply | None = None

    def set(self, term: str, class_nbr: str, **data: Any) -> None:
        self.script(term, class_nbr, Reply(200, {"success": True, "data": section_data(**data)}))

    def script(self, term: str, class_nbr: str, *replies: Reply) -> None:
        with self.lock:
            self.scripts[(term, class_nbr)] = list(replies)

    def next_reply(self, key: tuple[str, str]) -> Reply:
        with self.lock:
            queue = self.scripts.get(key)
            if not queue:
                if self.default is not None:
                    return self.default
                return Reply(500, {"success": False, "error": f"Section {key[1]} not found for term {key[0]}"})
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def calls(self, term: str, class_nbr: str) -> int:
        with self.lock:
            return sum(
                1
                for r in self.requests
                if r.path == "/scrape" and r.json() == {"sectionNumber": class_nbr, "term": term}
            )


# -- Resend --------------------------------------------------------------------------------------------------


class _ResendHandler(_Handler):
    def do_POST(self) -> None:
        body = self._read()
        stub: ResendStub = self.owner
        stub.record(self.path, dict(self.headers.items()), body)
        self._reply(stub.handle(self.path, dict(self.headers.items()), body))


@dataclass
class Delivery:
    """One email Resend actually accepted for delivery."""

    id: str
    key: str
    message: dict[str, Any]


class ResendStub(_Server):
    """``POST /emails/batch`` with Resend's idempotency semantics.

    A key seen before with the same body replays the first answer and delivers nothing; with another body
    it answers 409 ``invalid_idempotent_request``. ``script(...)`` queues answers for the next requests:
    a ``Reply`` with ``deliver=True`` in ``headers`` (``X-Stub-Deliver: 1``) delivers before answering
    (an answer lost after delivery).

    ``quota_left`` (None: no quota): how many more emails the account may send; a batch that does not fit
    is answered 429 ``daily_quota_exceeded`` (``quota_name`` picks ``monthly_quota_exceeded``), as Resend does.
    """

    def __init__(self) -> None:
        super().__init__(_ResendHandler)
        self.replies: list[Reply] = []
        self.deliveries: list[Delivery] = []
        self.keys: dict[str, tuple[str, Reply]] = {}
        self.quota_left: int | None = None
        self.quota_name = "daily_quota_exceeded"

    def script(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path != "/emails/batch":
            return Reply(404, {"name": "not_found", "message": "not found"})
        if headers.get("Authorization") != f"Bearer {RESEND_KEY}":
            return Reply(401, {"name": "missing_api_key", "message": "invalid key"})
        key = headers.get("Idempotency-Key", "")
        digest = hashlib.sha256(body).hexdigest()
        with self.lock:
            if key and key in self.keys:
                seen_digest, seen_reply = self.keys[key]
                if seen_digest != digest:
                    return Reply(409, {"name": "invalid_idempotent_request", "message": "key reused with another body"})
                if seen_reply.status < 300:
                    return seen_reply
            scripted = self.replies.pop(0) if self.replies else None
            deliver_anyway = scripted is not None and scripted.headers.pop("X-Stub-Deliver", "") == "1"
            if scripted is not None and scripted.status >= 300 and not deliver_anyway:
                return scripted
            try:
                messages = orjson.loads(body)
            except orjson.JSONDecodeError:
                return Reply(400, {"name": "validation_error", "message": "invalid JSON"})
            if not isinstance(messages, list) or not 1 <= len(messages) <= 100:
                return Reply(422, {"name": "validation_error", "message": "1 to 100 emails per batch"})
            if self.quota_left is not None:
                if len(messages) > self.quota_left:
                    return Reply(429, {"name": self.quota_name, "message": "You have reached your email quota."})
                self.quota_left -= len(messages)
            ids = []
            for message in messages:
                delivery = Delivery(str(uuid.uuid4()), key, message)
                self.deliveries.append(delivery)
                ids.append({"id": delivery.id})
            ok = Reply(200, {"data": ids})
            if key:
                self.keys[key] = (digest, ok)
            return scripted if deliver_anyway and scripted is not None else ok

    def delivered_to(self) -> list[str]:
        with self.lock:
            return sorted(addr for d in self.deliveries for addr in d.message["to"])
