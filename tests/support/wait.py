"""One way for a test to wait for something: ``eventually``, a condition polled until it holds or time runs out."""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable


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
