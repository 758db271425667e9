"""A TCP proxy that can cut a dependency off and bring it back, to play outages against real servers.

The shared Redis and Postgres of the machine stay up for everyone else; only connections made through the
proxy see the outage: ``cut()`` closes every proxied connection and refuses new ones, ``restore()`` accepts
again on the same port.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit, urlunsplit

from daemon.commands.embedded import free_port


@dataclass
class Cut:
    """Cut one proxied connection at the worst moment, ``times`` times.

    ``mode="reply"``: the client's request containing ``pattern`` reaches the server (which runs it) and the
    server's reply is dropped with the connection. ``mode="request"``: the request is dropped with the
    connection, so the server only sees the client vanish (mid-transaction: a rollback). With ``after``, only
    a connection that has already sent ``after`` (e.g. the claim of a section's transaction) is cut.
    """

    pattern: bytes
    mode: str = "reply"
    times: int = 1
    after: bytes | None = None
    fired: int = 0


class TcpProxy:
    def __init__(self, target: tuple[str, int] | str, port: int | None = None) -> None:
        self.target = target  # (host, port) or a Unix socket path
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepting = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._cuts: list[Cut] = []

    def arm(self, cut: Cut) -> Cut:
        """Cut the next connection(s) that send ``cut.pattern`` (see ``Cut``); returns it to read ``fired``."""
        with self._lock:
            self._cuts.append(cut)
        return cut

    def _match(self, data: bytes, seen: set[bytes]) -> Cut | None:
        with self._lock:
            for cut in self._cuts:
                if cut.after is not None and cut.after in data:
                    seen.add(cut.after)
            for cut in self._cuts:
                if cut.fired >= cut.times or cut.pattern not in data:
                    continue
                if cut.after is not None and cut.after not in seen:
                    continue
                cut.fired += 1
                return cut
        return None

    def start(self) -> TcpProxy:
        self._listen()
        self._thread.start()
        return self

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Right after a cut, the old listener may live on for one accept timeout (the accept thread's poll
        # holds it in the kernel after close): try again for a moment.
        deadline = time.monotonic() + 2
        while True:
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.01)
        sock.listen(64)
        sock.settimeout(0.05)
        self._listener = sock
        self._accepting.set()

    def cut(self) -> None:
        """Close every proxied connection and stop accepting: the dependency is gone."""
        self._accepting.clear()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def restore(self) -> None:
        with self._lock:
            self._listen()

    def stop(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not self._accepting.wait(0.05):
                continue
            listener = self._listener
            if listener is None:
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.target, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.target)
            return sock
        return socket.create_connection(self.target, timeout=5)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        seen: set[bytes] = set()  # the ``Cut.after`` patterns this client has sent
        drop_reply = False
        try:
            # Inside the try: a cut() between accept and this thread's start has closed both sockets already.
            a.settimeout(None)
            b.settimeout(None)
            while True:
                readable, _, _ = select.select([a, b], [], [], 0.5)
                if self._stop.is_set():
                    return
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is a and self._cuts:
                        cut = self._match(data, seen)
                        if cut is not None and cut.mode == "request":
                            return  # the server never sees it; the finally closes both ends
                        drop_reply = drop_reply or cut is not None
                    elif src is b and drop_reply:
                        return  # the server ran it; its reply is lost with the connection
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


def redis_proxy(redis_url: str) -> tuple[TcpProxy, str]:
    """A proxy in front of ``redis_url`` and the URL that goes through it."""
    parts = urlsplit(redis_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379)).start()
    netloc = f"127.0.0.1:{proxy.port}"
    if parts.username or parts.password:
        netloc = f"{parts.username or ''}:{parts.password or ''}@{netloc}"
    return proxy, urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def postgres_proxy(database_url: str) -> tuple[TcpProxy, str]:
    """A proxy in front of ``database_url`` (TCP or a Unix socket DSN) and the TCP URL through it."""
    parts = urlsplit(database_url)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    target: tuple[str, int] | str
    if socket_dir.startswith("/"):
        target = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}"
    else:
        target = (parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy = TcpProxy(target).start()
    user = parts.username or "postgres"
    auth = f"{user}:{parts.password}@" if parts.password else f"{user}@"
    return proxy, f"postgresql://{auth}127.0.0.1:{proxy.port}{parts.path}"
