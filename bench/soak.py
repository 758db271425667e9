"""A compressed day under fire: two daemons in the production shape, ticks every minute, random faults.

    .venv/bin/python bench/soak.py [--minutes 22] [--sections 2000] [--fault-every 70] [--seed 7]

Everything it measures runs on private servers it starts and stops: a TLS-only redis-server (``rediss://``
with a throwaway CA), a PostgreSQL cluster in a temp dir behind a PgBouncer in transaction mode (statement
cache off), a loopback scraper whose 2,000 sections' seats churn at random, and a loopback Resend with its
idempotency keys. Two real ``seatwatch run`` processes tick every minute (stagger none: every tick checks every
section). On a schedule, one fault at a time: scraper errors and latency, Resend 429s, 500s and lost replies,
Redis restarted empty, Postgres restarted, PgBouncer restarted, one daemon SIGKILLed and started again.

At the end, after a calm tail with no faults: the exact email ledger (each outbox row, i.e. each email owed,
matched against what Resend delivered: lost, duplicated, unowed, to ineligible users), per-fault counts and
recovery times, the RSS and open fds of the daemon that ran throughout (minute 5 against the last minute),
Redis memory, and Redis commands per section checked (the daemons' own counters, queue and breaker).
``--minutes 1.5 --sections 200`` is the CI-sized run (tests/integration/test_soak.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would come first on sys.path, and bench/queue.py would shadow the
# standard library's queue module; the project root goes there instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

import argparse
import dataclasses
import json
import platform
from datetime import UTC, datetime

from tests.support.soak import Soak, render


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=22)
    parser.add_argument("--sections", type=int, default=2000)
    parser.add_argument(
        "--fault-every", type=float, default=0, help="seconds between faults; 0: one a minute, aligned to ticks"
    )
    parser.add_argument("--fault-window", type=float, default=35)
    parser.add_argument("--calm", type=float, default=150, help="seconds at the end without faults")
    parser.add_argument("--first-fault", type=float, default=75, help="seconds before the first fault")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args()
    started = datetime.now(UTC)
    soak = Soak(
        minutes=args.minutes,
        sections=args.sections,
        fault_every_s=args.fault_every or 60,
        aligned=not args.fault_every,
        fault_window_s=args.fault_window,
        seed=args.seed,
        calm_s=args.calm,
        first_fault_s=args.first_fault,
        log=lambda text: print(text, flush=True),
    )
    report = soak.run()
    print()
    print(f"started {started.isoformat(timespec='seconds')}, {platform.platform()}, Python {platform.python_version()}")
    print(render(report))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": report.config,
                    "ledger": report.ledger,
                    "by_fault": report.by_fault,
                    "steady": report.steady,
                    "injections": [dataclasses.asdict(i) for i in report.injections],
                    "samples": [dataclasses.asdict(s) for s in report.samples],
                    "problems": report.problems,
                },
                indent=1,
                default=str,
            )
        )
    print(f"daemon logs: {soak.workdir}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
