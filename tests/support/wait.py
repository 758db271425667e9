"""One way for a test to wait for something: ``eventually``, a condition polled until it holds or time runs out."""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.support.procs import DaemonProcess


async def eventually(
    check: Callable[[], Any], timeout_s: float = 10, what: str = "condition", *, interval_s: float = 0.02
) -> None:
    """Wait until ``check()`` (sync, or returning an awaitable) is truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await anyio.sleep(interval_s)


async def while_running(check: Callable[[], Any], proc: DaemonProcess, what: str, timeout_s: float = 30) -> None:
    """``eventually``, for a condition a daemon process brings about: fails at once if the process has died,
    and with its log when time runs out."""

    async def holds() -> bool:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if not result:
            proc.assert_running()
        return bool(result)

    try:
        await eventually(holds, timeout_s, what, interval_s=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{proc.logs()}") from None
