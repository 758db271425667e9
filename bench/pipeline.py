"""Sections per second through the whole pipeline with an instant scraper, and what each section costs.

    .venv/bin/python bench/pipeline.py [--sections 2000]

In one process: the real Queue, Consumer, breaker and Pipeline against a private redis-server and a scratch
database on the local Postgres; the scraper is a loopback stub in another process that answers at once.
Every section has one watcher and a legacy class_states row saying it is full, so the first pass finds every
section opening (claims, rendering, outbox rows); the later passes find nothing changed (the common case).
Reported per pass: sections/s, Redis commands per section (queue + breaker, all-in as Upstash bills: the daemon's own
counter), Postgres statements per section (asyncpg's count on every pooled connection), emails queued.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would come first on sys.path, and bench/queue.py would shadow the
# standard library's queue module; the project root goes there instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

import argparse
import asyncio
import multiprocessing
import resource
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from daemon.checks.consumer import Consumer
from daemon.checks.pipeline import Pipeline
from daemon.commands.embedded import RedisServer
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig
from daemon.primitives.clients import RedisClients
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import Scripts
from daemon.runtime.metrics import Metrics
from daemon.store.pool import connect, create_pool
from daemon.upstream.render import Renderer
from daemon.upstream.scraper import Scraper
from tests.support.scratch import drop_database, migrated_database
from tests.support.stubs import SCRAPER_TOKEN, Reply, ScraperStub, section_data

if TYPE_CHECKING:
    import asyncpg


def serve_scraper(port_queue: Any, seats: Any) -> None:
    stub = ScraperStub().start()
    stub.default = Reply(200, {"success": True, "data": section_data(seats=3, non_reserved=3)})
    port_queue.put(stub.url)
    while True:
        time.sleep(3600)


async def scratch_database(sections: int) -> str:
    url = await migrated_database("bench_pipeline")
    conn = await connect(url)
    users = [uuid.uuid4() for _ in range(sections)]
    await conn.executemany(
        "INSERT INTO auth.users (id, email) VALUES ($1, $2)", [(u, f"u{i}@example.edu") for i, u in enumerate(users)]
    )
    await conn.executemany(
        "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) "
        "VALUES ($1, '2261', 'CSE', '240', $2)",
        [(u, str(30000 + i)) for i, u in enumerate(users)],
    )
    await conn.executemany(
        "INSERT INTO class_states (term, subject, catalog_nbr, class_nbr, instructor_name, seats_available, "
        "seats_capacity, non_reserved_seats) VALUES ('2261', 'CSE', '240', $1, 'Staff', 0, 30, 0)",
        [(str(30000 + i),) for i in range(sections)],
    )
    await conn.close()
    return url


def statements(pool: asyncpg.Pool) -> int:
    """Statements sent on every connection the pool holds (asyncpg's own per-connection counter)."""
    total = 0
    for holder in pool._holders:  # no public API for this; fine for a benchmark
        if holder._con is not None:
            total += holder._con._protocol.queries_count
    return total


async def one_pass(
    label: str,
    clients: RedisClients,
    scripts: Scripts,
    keys: Keys,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    scraper_url: str,
    sections: int,
    concurrency: int,
) -> str:
    queue = Queue(
        clients.client("queue"),
        clients.client("queue", blocking=True),
        keys,
        scripts,
        consumer="bench",
        visibility_timeout_s=300,
        breaker=BreakerConfig(),
    )
    metrics = Metrics()
    pipeline = Pipeline(
        pool,
        Scraper(http, scraper_url, SCRAPER_TOKEN, timeout_s=10),
        Renderer("https://pickmyclass.app", "notifications@pickmyclass.app", "bench-key"),
        metrics,
    )
    consumer = Consumer(queue, pipeline, concurrency=concurrency, idle_block_s=5, idle_maintenance_s=60)
    before_redis = dict(clients.usage.total)
    before_pg = statements(pool)
    before_outbox = await pool.fetchval("SELECT count(*) FROM seatwatch_outbox")
    stopping = anyio.Event()
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run, stopping)
        await queue.enqueue([("2261", str(30000 + i)) for i in range(sections)])
        while consumer.state.completed < sections:  # noqa: ASYNC110 - polling a counter is the measurement
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - started
        stopping.set()
    after = clients.usage.total
    redis_cmds = sum(after[k] - before_redis.get(k, 0) for k in after)
    pg = statements(pool) - before_pg
    emails = await pool.fetchval("SELECT count(*) FROM seatwatch_outbox") - before_outbox
    return (
        f"{label:<22} {concurrency:>4} {sections:>6} {elapsed:>7.2f} {sections / elapsed:>9.0f} "
        f"{redis_cmds / sections:>10.3f} {pg / sections:>8.2f} {emails:>7}"
    )


async def run(sections: int, scraper_url: str, redis_url: str, database_url: str) -> list[str]:
    clients = RedisClients(redis_url)
    scripts = Scripts(clients.client("startup"))
    await scripts.load(clients.client("startup"))
    keys = Keys(f"bench{uuid.uuid4().hex[:6]}")
    pool = await create_pool(database_url, min_size=4, max_size=20)
    rows = []
    try:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=40)) as http:
            args = (clients, scripts, keys, pool, http, scraper_url, sections)
            rows.append(await one_pass("every section opens", *args, concurrency=4))
            rows.append(await one_pass("no change", *args, concurrency=4))
            rows.append(await one_pass("no change", *args, concurrency=16))
    finally:
        await pool.close()
        await clients.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", type=int, default=2000)
    args = parser.parse_args()
    ports: Any = multiprocessing.Queue()
    scraper = multiprocessing.Process(target=serve_scraper, args=(ports, None), daemon=True)
    scraper.start()
    scraper_url = ports.get(timeout=10)
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="bench-pipeline-"))).start()
    database_url = asyncio.run(scratch_database(args.sections))
    try:
        rows = anyio.run(run, args.sections, scraper_url, redis.url, database_url)
    finally:
        redis.stop()
        scraper.terminate()
        asyncio.run(drop_database(database_url))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("full pipeline (scrape -> one transaction -> outbox rows -> ack), instant loopback scraper")
    header = ("pass", "conc", "jobs", "secs", "sections/s", "redis/sec", "pg/sec", "emails")
    print("{:<22} {:>4} {:>6} {:>7} {:>9} {:>10} {:>8} {:>7}".format(*header))
    for row in rows:
        print(row)
    print(f"peak RSS of this process (consumer, pipeline, pool): {peak_mb:.1f} MB")


if __name__ == "__main__":
    main()
