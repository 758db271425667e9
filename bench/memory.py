"""Where the daemon's RSS goes under a steady load: two ``seatwatch run`` processes, no faults, memory probed.

    .venv/bin/python bench/memory.py [--minutes 14] [--sections 2000] [--env-a MALLOC_MMAP_THRESHOLD_=131072]

The soak's servers and stand-ins (tests/support/soak.py: TLS Redis, Postgres behind PgBouncer, the churning
scraper, Resend), every tick checking all sections, seats churning to the end (emails owed and sent), but no
faults. Each daemon loads bench/memprobe (a
``sitecustomize`` on PYTHONPATH), which writes once a minute: RSS, gc-tracked objects by type, glibc's heap
(size, in use, free) and pymalloc's arenas. ``--env-a`` / ``--env-b`` add variables to one daemon (an A/B of
allocator settings in the same run). Prints a line per daemon and minute, and the object types that grew most.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

import argparse
import json
import tempfile
from typing import TYPE_CHECKING, Any

from tests.support.soak import Soak

if TYPE_CHECKING:
    from tests.support.procs import DaemonProcess

PROBE = ROOT / "bench" / "memprobe"


def mb(n: int) -> float:
    return n / 2**20


def show(probe_dir: Path, env: dict[str, dict[str, str]]) -> None:
    for name in sorted(env):
        for path in sorted((probe_dir / name).glob("probe-*.jsonl")):
            records = [json.loads(line) for line in path.read_text().splitlines()]
            print(f"daemon {name} {env[name] or '(defaults)'}")
            for r in records:
                m, p = r["malloc"], r["pymalloc"]
                print(
                    f"  min {r['i']:2d}  rss {r['rss_mb']:5.1f} MB  gc objects {r['objects']:6d}  "
                    f"threads {len(r['threads'])}  glibc heap {mb(m['arena']):5.2f} MB "
                    f"(in use {mb(m['uordblks']):5.2f}, free {mb(m['fordblks']):5.2f}), "
                    f"mmapped {mb(m['hblkhd']):4.2f}  "
                    f"pymalloc arenas {p.get('arenas allocated current')}, "
                    f"in use {mb(p.get('bytes in allocated blocks', 0)):5.2f} MB"
                )
            if len(records) >= 4:
                first, last = records[2]["types"], records[-1]["types"]
                grew = sorted(((last.get(k, 0) - first.get(k, 0), k) for k in set(first) | set(last)), reverse=True)
                print(f"  types grown, minute 3 -> {records[-1]['i']}: {[(k, n) for n, k in grew[:8]]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=14)
    parser.add_argument("--sections", type=int, default=2000)
    parser.add_argument("--env-a", action="append", default=[], help="NAME=VALUE for daemon a (repeatable)")
    parser.add_argument("--env-b", action="append", default=[], help="NAME=VALUE for daemon b (repeatable)")
    args = parser.parse_args()
    probe_dir = Path(tempfile.mkdtemp(prefix="seatwatch-memory-"))
    extra = {
        "a": dict(item.split("=", 1) for item in args.env_a),
        "b": dict(item.split("=", 1) for item in args.env_b),
    }

    class Probed(Soak):
        def _spawn(self, name: str, env: dict[str, str]) -> DaemonProcess:
            (probe_dir / name).mkdir(exist_ok=True)
            env = {**env, "PYTHONPATH": str(PROBE), "MEMPROBE_DIR": str(probe_dir / name), **extra[name]}
            return super()._spawn(name, env)

        def _churner(self) -> None:
            """Seats keep churning to the end (the soak stops at its calm tail, which here is all of it)."""
            while not self.stop_threads.wait(self.churn_every_s):
                self.scraper.churn(self.churn_fraction)

    # No faults: the first one would be due after the end.
    soak = Probed(
        minutes=args.minutes,
        sections=args.sections,
        fault_every_s=60,
        seed=7,
        calm_s=30,
        first_fault_s=args.minutes * 60 + 600,
        log=lambda text: print(text, flush=True),
    )
    report: Any = soak.run()
    checks = sum(sum(c.get("seatwatch_sections_checked_total", {}).values()) for c in soak.counters.values())
    print(f"ledger ok: {report.ok} {report.ledger}; sections checked: {checks:.0f}; probe files: {probe_dir}")
    show(probe_dir, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
