"""Retention's SQL (``seatwatch prune``): what the privacy policy promises, as one rule per table.

Each rule names a table and the rows of it that no longer matter. None touches a row the web app still shows
(a watched section's state, a claim younger than a year) or one seatwatch still needs (a claim an owed email
rests on, this month's sent emails that the quota counts, an outbox row not yet sent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncpg


@dataclass(frozen=True)
class Rule:
    """The rows of ``table`` (alias ``t``) that ``where`` selects are deleted; ``what`` says which, for people."""

    table: str
    what: str
    where: str


def _outbox_expired(o: str) -> str:
    """Outbox rows (alias ``o``) done over 30 days ago, and before this month (the monthly quota counts those)."""
    return (
        f"{o}.status IN ('sent', 'failed') AND coalesce({o}.sent_at, {o}.created_at) "
        "< least(now() - interval '30 days', date_trunc('month', now(), 'UTC'))"
    )


RULES: Final = (
    Rule(
        "notifications_sent",
        "claims made over a year ago, expired, with no email still owed on them",
        "t.sent_at < now() - interval '1 year' AND t.expires_at < now() AND NOT EXISTS ("
        " SELECT 1 FROM seatwatch_outbox o WHERE o.class_watch_id = t.class_watch_id"
        " AND o.notification_type = t.notification_type AND o.status = 'pending')",
    ),
    Rule(
        "class_states",
        "states of sections nobody watches (in any term), unchecked for six months",
        "t.last_checked_at < now() - interval '6 months'"
        " AND NOT EXISTS (SELECT 1 FROM class_watches w WHERE w.class_nbr = t.class_nbr)",
    ),
    Rule(
        "seatwatch_section_states",
        "seatwatch's states of sections nobody watches, unchecked for six months",
        "t.last_checked_at < now() - interval '6 months'"
        " AND NOT EXISTS (SELECT 1 FROM class_watches w WHERE w.term = t.term AND w.class_nbr = t.class_nbr)",
    ),
    Rule(
        "seatwatch_outbox",
        "emails sent or failed over 30 days ago (and before this month)",
        _outbox_expired("t"),
    ),
    Rule(
        "seatwatch_outbox_batches",
        "batches done over 30 days ago with no email left in them",
        "t.status IN ('sent', 'failed') AND t.created_at < now() - interval '30 days' AND NOT EXISTS ("
        f" SELECT 1 FROM seatwatch_outbox o WHERE o.batch_key = t.key AND NOT ({_outbox_expired('o')}))",
    ),
    Rule(
        "seatwatch_outbox_suppressed",
        "emails kept back over 30 days ago",
        "t.suppressed_at < now() - interval '30 days'",
    ),
)


async def count(conn: asyncpg.Connection | asyncpg.Pool) -> list[tuple[Rule, int]]:
    """How many rows each rule would delete now."""
    return [
        (rule, int(await conn.fetchval(f"SELECT count(*) FROM {rule.table} t WHERE {rule.where}"))) for rule in RULES
    ]


async def delete(conn: asyncpg.Connection) -> list[tuple[Rule, int]]:
    """Delete what each rule selects, a rule at a time (each its own statement); how many rows each deleted."""
    deleted = []
    for rule in RULES:
        status = await conn.execute(f"DELETE FROM {rule.table} t WHERE {rule.where}")
        deleted.append((rule, int(status.split()[-1])))
    return deleted
