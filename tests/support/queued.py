"""What the queue holds, read as sections: the stream's batch entries and the delayed set's batch members.

The queue keeps no per-section keys (every command Redis runs is billed): a section is queued when a
stream entry's batch or a delayed member's batch names it. Tests read both layouts (the old one, a
section per entry or member, is what an upgrade finds).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from daemon.keys import Keys


def entry_sections(fields: dict[str, str]) -> list[tuple[str, int]]:
    """(job id, attempts) of each section of a stream entry's fields, either layout."""
    if "batch" in fields:
        return [(f"{s[0]}-{s[1]}", int(s[2])) for s in json.loads(fields["batch"])]
    return [(fields.get("id", ""), int(fields.get("attempts", "0") or 0))]


async def stream_sections(r: aioredis.Redis, keys: Keys) -> list[tuple[str, str, int]]:
    """(entry id, job id, attempts) of every section in the stream, in stream order."""
    entries: Any = await r.xrange(keys.stream)
    return [(eid, job, attempts) for eid, fields in entries for job, attempts in entry_sections(dict(fields))]


async def delayed_sections(r: aioredis.Redis, keys: Keys) -> dict[str, tuple[float, int]]:
    """Job id -> (due ms, attempts) of every section in the delayed set."""
    members: Any = await r.zrange(keys.delayed, 0, -1, withscores=True)
    found: dict[str, tuple[float, int]] = {}
    for member, score in members:
        if member.startswith("{"):
            for s in json.loads(member)["b"]:
                found[f"{s[0]}-{s[1]}"] = (score, int(s[2]))
        else:
            found[member] = (score, -1)
    return found


async def queued_ids(r: aioredis.Redis, keys: Keys) -> set[str]:
    """Every job id waiting, running or delayed."""
    return {job for _eid, job, _a in await stream_sections(r, keys)} | set(await delayed_sections(r, keys))
