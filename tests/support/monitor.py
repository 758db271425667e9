"""Redis's ``MONITOR`` on a raw connection, read by a thread: the top-level commands a server runs, timed.

Commands a Lua script runs inside the server (client ``lua``) are not top-level and are left out: Upstash bills
a script call once. ``billable`` leaves out what Upstash does not bill either (``FREE_COMMANDS``).
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
    """``MONITOR`` on its own connection; ``lines`` holds (arrival time, COMMAND) of each top-level command."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.lines: list[tuple[float, str]] = []
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
                if match and match["client"] != "lua":
                    self.lines.append((time.time(), match["cmd"].upper()))

    def commands(self, since: float = 0.0, until: float = float("inf")) -> collections.Counter[str]:
        """Commands seen between ``since`` and ``until`` (wall-clock seconds), by name."""
        return collections.Counter(cmd for at, cmd in self.lines if since <= at < until)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def billable(counter: collections.Counter[str]) -> int:
    """The commands in ``counter`` that Upstash bills."""
    return sum(n for cmd, n in counter.items() if cmd not in FREE_COMMANDS)
