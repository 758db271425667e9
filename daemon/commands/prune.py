"""``seatwatch prune [--dry-run]``: delete what the privacy policy says is kept no longer (``store.prune_queries``).

The dry run deletes nothing and prints, per table, how many rows a prune would delete now.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.errors import Exit
from daemon.store import prune_queries
from daemon.store.pool import connect

if TYPE_CHECKING:
    from daemon.settings.config import Settings
    from daemon.store.prune_queries import Rule


async def prune(settings: Settings, *, dry_run: bool) -> int:
    """Prune (or, with ``dry_run``, count) and print a line per table."""
    conn = await connect(settings.database_url.reveal())
    try:
        if dry_run:
            found = await prune_queries.count(conn)
            print("dry run: nothing deleted; a prune now would delete")
        else:
            found = await prune_queries.delete(conn)
            print("deleted")
    finally:
        await conn.close()
    print(table(found))
    return Exit.OK


def table(found: list[tuple[Rule, int]]) -> str:
    """One line per rule: table, rows, which rows."""
    width = max(len(rule.table) for rule, _ in found)
    return "\n".join(f"  {rule.table.ljust(width)}  {n:>7}  {rule.what}" for rule, n in found)
