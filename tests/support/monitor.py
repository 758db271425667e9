"""Redis's ``MONITOR`` on a raw connection, read by a thread: the commands a server runs, timed.

Upstash bills every command a Lua script runs (client ``lua`` in MONITOR) as well as the script call itself,
so ``commands`` counts them by default (all-in, as billed); ``top_level=True`` gives the calls a client sent,
for the side-by-side figure. ``billable`` leaves out what Upstash does not bill (``FREE_COMMANDS``).
"""

from __future__ import annotations

import collections
import re
import socket
import threading
import time

from daemon.primitives.clients import FREE_COMMANDS

LINE = re.compile(r'^\d+\.\d+ \[\d+ (?P<client>[^\]]+)\] "(?P<cmd>[^"]+)"')


class Monitor:
    """``MONITOR`` on its own connection; ``lines`` holds (arrival time, COMMAND, run by a script) of each."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.lines: list[tuple[float, str, bool]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buffer = b""
        self.sock.settimeout(0.5)
        while not self.stop.is_set():
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            buffer += chunk
            *complete, buffer = buffer.split(b"\r\n")
            for raw in complete:
                match = LINE.match(raw.decode(errors="replace").lstrip("+"))
                if match:
                    self.lines.append((time.time(), match["cmd"].upper(), match["client"] == "lua"))

    def commands(
        self, since: float = 0.0, until: float = float("inf"), *, top_level: bool = False
    ) -> collections.Counter[str]:
        """Commands seen between ``since`` and ``until`` (wall-clock seconds), by name; all-in unless
        ``top_level`` (then those a script ran are left out)."""
        return collections.Counter(
            cmd for at, cmd, inner in self.lines if since <= at < until and not (top_level and inner)
        )

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def billable(counter: collections.Counter[str]) -> int:
    """The commands in ``counter`` that Upstash bills."""
    return sum(n for cmd, n in counter.items() if cmd not in FREE_COMMANDS)
