"""kill -9 at every step: a real daemon SIGKILLed exactly at each point of the pipeline and of the outbox,
restarted, and the email ledger checked: every owed email delivered exactly once, none to ineligible users.

The daemon dies by its own SIGKILL at a named fault point (``daemon/faults.py``, armed by
``SEATWATCH_FAULT_POINT``), or, for "request sent, no reply yet", by the test's SIGKILL while the stand-in
Resend holds its answer. The restart uses the same consumer name, as systemd's restart of the same unit does.
"""

from __future__ import annotations

import asyncio
import collections
import signal
from typing import TYPE_CHECKING

import pytest

from daemon import faults
from tests.support.ledger import settled
from tests.support.procs import DaemonProcess, Daemons, daemon_env, quiet_cron
from tests.support.seed import add_legacy_state, add_user, add_watch, clear
from tests.support.stubs import Reply, ResendStub, ScraperStub
from tests.support.wait import while_running

if TYPE_CHECKING:
    import asyncpg

    from daemon.primitives.queue import Queue

pytestmark = pytest.mark.slow

TERM = "2261"
SECTIONS = ("13400", "13401")


async def owed_and_ineligible(pool: asyncpg.Pool) -> tuple[list[str], list[str]]:
    """Two full sections about to open: two eligible watchers each, and watchers who must get nothing."""
    await clear(pool)
    owed, ineligible = [], []
    for class_nbr in SECTIONS:
        for i in range(2):
            email = f"k{class_nbr}-{i}@example.edu"
            await add_watch(pool, await add_user(pool, email), TERM, class_nbr)
            owed.append(email)
        await add_legacy_state(pool, TERM, class_nbr, seats=0)
    for email, flags in (
        ("off@example.edu", {"notifications_enabled": False}),
        ("bounced@example.edu", {"email_bounced": True}),
        ("disabled@example.edu", {"is_disabled": True}),
    ):
        await add_watch(pool, await add_user(pool, email, **flags), TERM, SECTIONS[0])
        ineligible.append(email)
    await add_watch(pool, await add_user(pool, "otherterm@example.edu"), "2264", SECTIONS[0])
    ineligible.append("otherterm@example.edu")
    return sorted(owed), ineligible


async def restart_and_check_ledger(
    first: DaemonProcess, pool: asyncpg.Pool, queue: Queue, resend: ResendStub, owed: list[str], bad: list[str]
) -> DaemonProcess:
    again = DaemonProcess(first.env).start()
    await while_running(lambda: settled(pool, queue, resend, len(owed)), again, "the ledger settled")
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    delivered = collections.Counter(resend.delivered_to())
    assert delivered == collections.Counter(owed), f"{delivered}\n{first.logs()}\n{again.logs()}"
    assert not set(bad) & set(delivered)
    claimed = await pool.fetchval("SELECT count(*) FROM notifications_sent")
    assert claimed == len(owed)
    return again


@pytest.mark.parametrize("point", sorted(faults.POINTS))
async def test_sigkill_at_a_fault_point_then_restart_delivers_each_owed_email_once(
    point: str,
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    queue: Queue,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """SIGKILL exactly at the point, restart: each owed email once, nothing to ineligible watchers."""
    owed, bad = await owed_and_ineligible(pool)
    for class_nbr in SECTIONS:
        scraper.set(TERM, class_nbr, seats=2)
    env = daemon_env(
        redis_url=redis_url,
        database_url=database_url,
        prefix=prefix,
        scraper_url=scraper.url,
        resend_url=resend.url,
        health_port=None,
        SEATWATCH_FAULT_POINT=point,
        **quiet_cron(),
    )
    proc = daemons.start(env)
    proc.wait_healthy()
    await queue.enqueue([(TERM, c) for c in SECTIONS])
    assert proc.wait(30) == -signal.SIGKILL
    assert f"fault point {point} reached" in proc.logs()

    restart_env = {k: v for k, v in env.items() if k != "SEATWATCH_FAULT_POINT"}
    proc.env = restart_env
    again = await restart_and_check_ledger(proc, pool, queue, resend, owed, bad)
    daemons.started.append(again)
    assert again.stop() == 0


@pytest.mark.parametrize("delivered", [True, False], ids=["resend-delivered", "resend-not-yet"])
async def test_sigkill_while_the_batch_request_has_no_reply_then_restart_delivers_once(
    delivered: bool,
    pool: asyncpg.Pool,
    redis_url: str,
    database_url: str,
    prefix: str,
    queue: Queue,
    scraper: ScraperStub,
    resend: ResendStub,
    daemons: Daemons,
) -> None:
    """SIGKILL while Resend holds the batch's answer (having delivered it, or not yet): the restart resends the
    same batch under the same key, and each owed email is delivered exactly once."""
    owed, bad = await owed_and_ineligible(pool)
    for class_nbr in SECTIONS:
        scraper.set(TERM, class_nbr, seats=2)
    if delivered:
        resend.script(Reply(200, None, {"X-Stub-Deliver": "1"}, delay_s=5))
    else:
        resend.script(Reply(503, {"name": "internal_server_error", "message": "slow"}, delay_s=5))
    env = daemon_env(
        redis_url=redis_url,
        database_url=database_url,
        prefix=prefix,
        scraper_url=scraper.url,
        resend_url=resend.url,
        health_port=None,
        **quiet_cron(),
    )
    proc = daemons.start(env)
    proc.wait_healthy()
    await queue.enqueue([(TERM, c) for c in SECTIONS])
    await while_running(lambda: resend.requests, proc, "the batch request", timeout_s=20)
    proc.kill()
    assert len(resend.deliveries) == (len(resend.requests[0].json()) if delivered else 0)
    again = await restart_and_check_ledger(proc, pool, queue, resend, owed, bad)
    daemons.started.append(again)
    assert len({r.headers["Idempotency-Key"] for r in resend.requests}) <= 2
    assert again.stop() == 0
