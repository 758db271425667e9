"""The Lua scripts in ``daemon/lua``: read once, registered, loaded at start, called by SHA.

A script may begin with ``-- include: NAME`` lines; the named library files are prepended, so the
breaker's state machine is written once and used by both the breaker's scripts and the queue's cycle.
redis-py's ``register_script`` already calls EVALSHA and reloads on NOSCRIPT (Upstash drops its script
cache), so nothing here is hand-rolled beyond loading every script once at start, which makes a syntax
error fail start instead of the first tick.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import orjson

if TYPE_CHECKING:
    from collections.abc import Sequence

    from redis.commands.core import AsyncScript

    from daemon.primitives.clients import CountingRedis

SCRIPTS: Final = (
    "lock_acquire",
    "lock_release",
    "lock_status",
    "breaker_allow",
    "breaker_record",
    "breaker_status",
    "queue_enqueue",
    "queue_cycle",
    "queue_maintain",
    "queue_stats",
    "dlq_requeue",
    "usage_flush",
    "adaptive_take",
    "adaptive_sync",
)

_INCLUDE = re.compile(r"^-- include: (\w+)\s*$", re.MULTILINE)


def source(name: str) -> str:
    """The full text of script ``name`` with its includes prepended."""
    folder = resources.files("daemon.primitives") / "lua"
    text = (folder / f"{name}.lua").read_text(encoding="utf-8")
    parts = [(folder / f"{lib}.lua").read_text(encoding="utf-8") for lib in _INCLUDE.findall(text)]
    return "\n".join([*parts, text])


class Scripts:
    """Every script registered against one client; callers pass their own (counting) client per call."""

    def __init__(self, client: CountingRedis) -> None:
        self._scripts: dict[str, AsyncScript] = {name: client.register_script(source(name)) for name in SCRIPTS}

    async def load(self, client: CountingRedis) -> None:
        """SCRIPT LOAD each one; a script Redis cannot compile raises here, at start."""
        for name, script in self._scripts.items():
            sha = await client.script_load(script.script)
            if sha != script.sha:
                raise RuntimeError(f"script {name}: Redis computed SHA {sha}, expected {script.sha}")

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any], client: CountingRedis) -> Any:
        """Run script ``name`` (EVALSHA, loading it again on NOSCRIPT)."""
        return await self._scripts[name](keys=list(keys), args=list(args), client=client)

    async def call_json(self, name: str, keys: Sequence[str], args: Sequence[Any], client: CountingRedis) -> Any:
        """Call a script whose reply is a JSON document (cjson.encode) and decode it."""
        reply = await self.call(name, keys, args, client)
        return orjson.loads(reply)
