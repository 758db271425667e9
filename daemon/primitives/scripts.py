"""The Lua scripts in ``daemon/lua``: read once, registered, loaded at start, called by SHA.

A script may begin with ``-- include: NAME`` lines; the named library files are prepended, so the
breaker's state machine is written once and used by both the breaker's scripts and the queue's cycle.

Billing (SPEC §5): Upstash bills every command a script runs, not just the EVALSHA. So every script is
wrapped (``_BILLED_HEAD``/``_BILLED_TAIL``): a local ``redis`` table shadows the global one and counts each
``redis.call``/``redis.pcall`` before passing it on, and the script's reply comes back as ``{calls, reply}``.
``Scripts.call`` adds ``calls`` to the calling client's ledger under its purpose and returns the reply alone,
so the count is exact (what the script did, not an estimate) and no script has to remember to count.
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
    "adaptive_take",
    "adaptive_sync",
)

# The shadowing table: a local named ``redis`` wins over the global for every line after it (the included
# libraries too). ``__index`` keeps every other field (``sha1hex``, ``error_reply``, ``status_reply``, ...).
_BILLED_HEAD: Final = """local __redis, __calls = redis, 0
local redis = setmetatable({
    call = function(...) __calls = __calls + 1; return __redis.call(...) end,
    pcall = function(...) __calls = __calls + 1; return __redis.pcall(...) end,
}, {__index = __redis})
local function __body()
"""
# A nil (or false) reply ends the Lua array after ``__calls``: the reader takes a missing second item as None.
_BILLED_TAIL: Final = """
end
local __reply = __body()
return {__calls, __reply}
"""

_INCLUDE = re.compile(r"^-- include: (\w+)\s*$", re.MULTILINE)


def source(name: str) -> str:
    """The full text of script ``name``: its includes prepended, the whole wrapped to count what it runs."""
    folder = resources.files("daemon.primitives") / "lua"
    text = (folder / f"{name}.lua").read_text(encoding="utf-8")
    parts = [(folder / f"{lib}.lua").read_text(encoding="utf-8") for lib in _INCLUDE.findall(text)]
    return _BILLED_HEAD + "\n".join([*parts, text]) + _BILLED_TAIL


def unwrap(reply: Any) -> tuple[int, Any]:
    """A wrapped script's ``{calls, reply}`` as ``(calls, reply)``."""
    calls = int(reply[0])
    return calls, (reply[1] if len(reply) > 1 else None)


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
        """Run script ``name`` (EVALSHA, loading it again on NOSCRIPT); bill the commands it ran to ``client``."""
        calls, reply = unwrap(await self._scripts[name](keys=list(keys), args=list(args), client=client))
        client.usage.add(client.purpose, calls)
        return reply

    async def call_json(self, name: str, keys: Sequence[str], args: Sequence[Any], client: CountingRedis) -> Any:
        """Call a script whose reply is a JSON document (cjson.encode) and decode it."""
        reply = await self.call(name, keys, args, client)
        return orjson.loads(reply)
