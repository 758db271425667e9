"""sd_notify over a real datagram socket, watchdog settings, the Progress promises, systemd timespans."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from daemon.runtime.systemd import Notifier, Progress, parse_timespan_s

if TYPE_CHECKING:
    from collections.abc import Iterator


class Listener:
    """A bound AF_UNIX SOCK_DGRAM socket standing in for systemd's notify socket."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2)
        self.env_value = env_value

    def receive(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return True
        finally:
            self.sock.settimeout(2)
        return False


@pytest.fixture
def path_listener() -> Iterator[Listener]:
    # A short directory: AF_UNIX paths are limited to ~108 bytes.
    with tempfile.TemporaryDirectory(prefix="swn-") as folder:
        path = str(Path(folder) / "notify")
        listener = Listener(path, path)
        try:
            yield listener
        finally:
            listener.sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"seatwatch-test-{uuid.uuid4().hex}"
    listener = Listener(b"\0" + name.encode(), f"@{name}")
    try:
        yield listener
    finally:
        listener.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    fixture = "path_listener" if request.param == "path" else "abstract_listener"
    found: Listener = request.getfixturevalue(fixture)
    return found


# -- Notifier ------------------------------------------------------------------------------------------------


def test_ready_datagram(listener: Listener) -> None:
    """ready() sends READY=1 and STATUS= in one datagram (path and abstract sockets)."""
    notifier = Notifier({"NOTIFY_SOCKET": listener.env_value})
    try:
        assert notifier.enabled
        notifier.ready("watching 120 sections")
        assert listener.receive() == ["READY=1", "STATUS=watching 120 sections"]
    finally:
        notifier.close()


def test_status_watchdog_stopping(listener: Listener) -> None:
    """status(), watchdog() and stopping() send STATUS=, WATCHDOG=1 and STOPPING=1."""
    notifier = Notifier({"NOTIFY_SOCKET": listener.env_value})
    try:
        notifier.status("tick 2025-01-15T17:30Z: 40 enqueued")
        assert listener.receive() == ["STATUS=tick 2025-01-15T17:30Z: 40 enqueued"]
        notifier.watchdog()
        assert listener.receive() == ["WATCHDOG=1"]
        notifier.stopping()
        assert listener.receive() == ["STOPPING=1", "STATUS=draining"]
        notifier.stopping("shutting down")
        assert listener.receive() == ["STOPPING=1", "STATUS=shutting down"]
    finally:
        notifier.close()


def test_notify_returns_true_when_sent(path_listener: Listener) -> None:
    """notify() reports success, and several datagrams arrive in order."""
    notifier = Notifier({"NOTIFY_SOCKET": path_listener.env_value})
    try:
        assert notifier.notify("STATUS=a")
        assert notifier.notify("STATUS=b", "EXTEND_TIMEOUT_USEC=1000000")
        assert path_listener.receive() == ["STATUS=a"]
        assert path_listener.receive() == ["STATUS=b", "EXTEND_TIMEOUT_USEC=1000000"]
    finally:
        notifier.close()


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}])
def test_no_notify_socket_is_noop(env: dict[str, str]) -> None:
    """Without a usable NOTIFY_SOCKET the notifier is disabled and every call does nothing."""
    notifier = Notifier(env)
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    notifier.ready("x")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()


def test_unreachable_socket_logs_and_continues(caplog: pytest.LogCaptureFixture) -> None:
    """A notify socket that is gone is logged as a warning and reported False, never raised."""
    with tempfile.TemporaryDirectory(prefix="swn-") as folder:
        notifier = Notifier({"NOTIFY_SOCKET": str(Path(folder) / "gone")})
        try:
            with caplog.at_level(logging.WARNING, logger="daemon.runtime.systemd"):
                assert notifier.notify("WATCHDOG=1") is False
            assert any("sd_notify failed" in r.getMessage() for r in caplog.records)
        finally:
            notifier.close()


def test_close_then_send_again(path_listener: Listener) -> None:
    """After close() the notifier opens a new socket on the next send."""
    notifier = Notifier({"NOTIFY_SOCKET": path_listener.env_value})
    try:
        notifier.watchdog()
        notifier.close()
        notifier.watchdog()
        assert path_listener.receive() == ["WATCHDOG=1"]
        assert path_listener.receive() == ["WATCHDOG=1"]
        assert path_listener.nothing_pending()
    finally:
        notifier.close()


@pytest.mark.parametrize(
    ("env", "watchdog_s"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_settings(env: dict[str, str], watchdog_s: float | None) -> None:
    """WATCHDOG_USEC gives the watchdog interval, only for this process when WATCHDOG_PID names one."""
    assert Notifier(env).watchdog_s == watchdog_s


# -- Progress ------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_overdue_only_after_deadline() -> None:
    """A loop is overdue only once the clock passes its promised time."""
    clock = Clock()
    progress = Progress(clock)
    progress.expect("scheduler", 60)
    assert progress.overdue() == []
    clock.now += 60
    assert progress.overdue() == []
    clock.now += 0.001
    assert progress.overdue() == ["scheduler"]


def test_progress_renewed_promise() -> None:
    """Coming back around (a new expect) moves the deadline forward."""
    clock = Clock()
    progress = Progress(clock)
    progress.expect("reader", 10)
    clock.now += 9
    progress.expect("reader", 10)
    clock.now += 9
    assert progress.overdue() == []


def test_progress_done_stops_watching() -> None:
    """done(name) removes the promise; an unknown name is fine."""
    clock = Clock()
    progress = Progress(clock)
    progress.expect("outbox", 5)
    progress.done("outbox")
    progress.done("never-promised")
    clock.now += 100
    assert progress.overdue() == []


def test_progress_lists_every_overdue_loop_sorted() -> None:
    """Every overdue loop is listed, sorted; loops within their promise are not."""
    clock = Clock()
    progress = Progress(clock)
    progress.expect("scheduler", 5)
    progress.expect("outbox", 5)
    progress.expect("reader", 500)
    clock.now += 10
    assert progress.overdue() == ["outbox", "scheduler"]


# -- timespans -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1min 30s", 90.0),
        ("90s", 90.0),
        ("500ms", 0.5),
        ("2min", 120.0),
        ("1h 1min 1s", 3661.0),
        ("1d", 86400.0),
        ("250us", 0.00025),
        ("1.5s", 1.5),
        ("1min 30.500000s", 90.5),
    ],
)
def test_parse_timespan(text: str, seconds: float) -> None:
    """systemd timespans as systemctl show prints them are read in seconds."""
    result = parse_timespan_s(text)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["infinity", "", "soon", "  infinity  "])
def test_parse_timespan_none(text: str) -> None:
    """'infinity' and nonsense give None (no known stop timeout)."""
    assert parse_timespan_s(text) is None


def test_a_unit_files_stop_timeout_is_read_as_systemd_reads_it(tmp_path: Path) -> None:
    """TimeoutStopSec= (else TimeoutSec=, else 90 s) from [Service], last one winning, timespans and bare seconds."""
    from daemon.runtime.systemd import unit_file_timeout_stop_s

    unit = tmp_path / "x.service"
    unit.write_text("[Unit]\nTimeoutStopSec=5\n[Service]\nTimeoutStopSec=30\nTimeoutStopSec=1min 30s\n")
    assert unit_file_timeout_stop_s(unit) == 90
    unit.write_text("[Service]\nTimeoutSec=45\n")
    assert unit_file_timeout_stop_s(unit) == 45
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    assert unit_file_timeout_stop_s(unit) == 90
    unit.write_text("[Service]\nTimeoutStopSec=infinity\n")
    assert unit_file_timeout_stop_s(unit) is None
    assert unit_file_timeout_stop_s(tmp_path / "absent.service") is None
    repo_unit = Path(__file__).resolve().parents[2] / "seatwatch.service"
    assert unit_file_timeout_stop_s(repo_unit) == 90
