"""A loopback scraper with a fixed capacity: at most ``slots`` scrapes served at once, each taking
``service_s``; the rest wait their turn inside it, as a real scraper's browser pool makes them.

Every request is recorded (arrival, start of service, end) so tests and the bench can see how long requests
waited for a slot, how many scrapes fell in any window, and how close two checks of one section came.
Seats come from ``seats(term, class_nbr, now)``: 0 unless the caller scripts openings.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Self

import orjson

from tests.support.stubs import SCRAPER_TOKEN, section_data

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass(frozen=True)
class Served:
    term: str
    class_nbr: str
    arrived: float
    started: float
    finished: float

    @property
    def waited_s(self) -> float:
        return self.started - self.arrived


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


class CapacityScraper:
    def __init__(
        self,
        *,
        slots: int,
        service_s: float,
        seats: Callable[[str, str, float], int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.slots = threading.BoundedSemaphore(slots)
        self.service_s = service_s
        self.seats = seats or (lambda term, class_nbr, now: 0)
        self.clock = clock
        self.served: list[Served] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                self._send(200, {"status": "ok"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Authorization") != f"Bearer {SCRAPER_TOKEN}":
                    self._send(401, {"error": "invalid token"})
                    return
                request = orjson.loads(body)
                self._send(200, owner.serve(str(request["term"]), str(request["sectionNumber"])))

            def _send(self, status: int, payload: Any) -> None:
                data = orjson.dumps(payload)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
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

    def serve(self, term: str, class_nbr: str) -> dict[str, Any]:
        arrived = self.clock()
        with self.slots:
            started = self.clock()
            time.sleep(self.service_s)
            seats = self.seats(term, class_nbr, started)
            finished = self.clock()
        with self.lock:
            self.served.append(Served(term, class_nbr, arrived, started, finished))
        return {"success": True, "data": section_data(seats=seats)}

    # -- what tests and the bench look at ----------------------------------------------------------------

    def snapshot(self) -> list[Served]:
        with self.lock:
            return list(self.served)

    def min_gap_s(self) -> float | None:
        """The shortest time between two arrivals for one section."""
        by: dict[tuple[str, str], list[float]] = {}
        for s in self.snapshot():
            by.setdefault((s.term, s.class_nbr), []).append(s.arrived)
        gaps = [b - a for times in by.values() for a, b in zip(sorted(times), sorted(times)[1:], strict=False)]
        return min(gaps) if gaps else None

    def max_in_window(self, window_s: float, *, since: float = 0.0) -> int:
        """The most arrivals in any window of ``window_s`` (sliding)."""
        times = sorted(s.arrived for s in self.snapshot() if s.arrived >= since)
        best, j = 0, 0
        for i, t in enumerate(times):
            while times[j] < t - window_s:
                j += 1
            best = max(best, i - j + 1)
        return best
