"""Queue benchmark on a private redis-server: throughput, Redis commands per job, peak RSS, idle cost.

Run ``.venv/bin/python bench/queue.py`` (a few minutes) or ``--quick`` (a shorter idle measurement).

Every consumer runs in its own process (``--role consumer``), so its peak RSS is its own and the
orchestrator's work does not slow it. For each load case the orchestrator waits until the consumer blocks
on the stream, enqueues the jobs (``Queue.enqueue``, 2,000 per script call) and waits for the consumer to
exit after the last job is settled. Commands are counted three ways:

* client side: ``usage.total`` of the consumer (from ready to exit) plus the orchestrator's enqueue calls;
  this is what Upstash bills: every command, those a script runs included (SPEC §5);
* ``MONITOR`` (a second run of the same case, because MONITOR slows Redis): every line without the free
  connection commands (all-in, it must agree with the client side), and the lines not from ``[0 lua]``
  (top-level) beside it;
* ``INFO commandstats``: every command Redis executed, those inside scripts included.

The breaker's admission and outcome recording are inside the consumer's ``queue_cycle`` script, so they
are in every count. The idle case runs a consumer with the default settings (``idle_block_s=900``,
``idle_maintenance_s=3600``) and, alongside it, one with 10 s periods that shows what one idle period costs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and this file is named like the stdlib ``queue``
# that redis-py imports: take the folder off the path before importing anything else.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import pstats
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import anyio
import redis.asyncio as aioredis

from daemon.checks.consumer import Consumer
from daemon.commands.embedded import RedisServer
from daemon.keys import Keys
from daemon.primitives.breaker import BreakerConfig
from daemon.primitives.clients import FREE_COMMANDS, RedisClients
from daemon.primitives.queue import Queue
from daemon.primitives.scripts import SCRIPTS, Scripts, source

if TYPE_CHECKING:
    from daemon.checks.pipeline import Ticket

THIS = Path(__file__).resolve()
ROOT = THIS.parents[1]
FREE = {name.lower() for name in FREE_COMMANDS}
SENTINEL = "bench-monitor-stop"
SHA_TO_SCRIPT = {hashlib.sha1(source(name).encode()).hexdigest(): name for name in SCRIPTS}  # noqa: S324
MONITOR_LINE = re.compile(r'^\+?(?P<ts>\d+\.\d+) \[(?P<db>\d+) (?P<client>[^\]]+)\] "(?P<cmd>[^"]*)"(?P<rest>.*)$')

# Targets from the issue.
IDLE_TARGET_PER_DAY = 400  # all-in (SPEC §5)
TOTAL_TARGET_PER_JOB = 0.1  # all-in, everything, breaker included (SPEC §5)
NOOP_TARGET_JOBS_S = 5000
SLOW_TARGET_FRACTION = 0.9
RSS_TARGET_MB = 60


# -- the consumer process ------------------------------------------------------------------------------


def emit(event: str, **data: Any) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


async def consumer_main(args: argparse.Namespace) -> None:
    clients = RedisClients(args.redis)
    keys = Keys(args.prefix)
    scripts = Scripts(clients.client("startup"))
    await scripts.load(clients.client("startup"))
    visibility_s = args.visibility_s
    queue = Queue(
        clients.client("queue"),
        clients.client("queue", blocking=True),
        keys,
        scripts,
        consumer=args.consumer,
        visibility_timeout_s=visibility_s,
        max_attempts=3,
        breaker=BreakerConfig(trial_ttl_s=visibility_s),
    )
    stopping = anyio.Event()
    completed = 0
    job_s = args.job_ms / 1000

    async def handler(ticket: Ticket) -> None:
        nonlocal completed
        if job_s > 0:
            await anyio.sleep(job_s)
        ticket.success()  # as the pipeline does after a good scrape: the breaker records it
        completed += 1
        if completed == args.expect:
            stopping.set()

    options: dict[str, Any] = {"concurrency": args.concurrency}
    if not args.defaults:
        options.update(retry_base_s=1.0, idle_block_s=args.idle_block_s, idle_maintenance_s=args.idle_maintenance_s)
    consumer = Consumer(queue, handler, **options)

    async def announce_ready() -> None:
        while True:  # the consumer has no "started" event: its first stats mean it resumed and reads next
            if consumer.state.stats is not None:
                break
            await anyio.sleep(0.01)
        await anyio.sleep(0.3)  # the reader's first blocking read is on its way
        emit("ready", usage=dict(clients.usage.total), t=time.time())

    async def on_sigterm() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                stopping.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(announce_ready)
            tg.start_soon(on_sigterm)
            await consumer.run(stopping)
            tg.cancel_scope.cancel()
        t_end = time.time()
    finally:
        await clients.aclose()
    emit(
        "done",
        usage=dict(clients.usage.total),
        t=t_end,
        completed=completed,
        rss_kb=peak_rss_kb(),
        state={
            "completed": consumer.state.completed,
            "retried": consumer.state.retried,
            "deferred": consumer.state.deferred,
            "dead_lettered": consumer.state.dead_lettered,
        },
    )


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM), which starts afresh at exec.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: Linux carries the pre-exec high-water mark over
    exec, so a child spawned by a large parent reports the parent's peak.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_consumer_role(args: argparse.Namespace) -> None:
    if not args.profile_path:
        anyio.run(consumer_main, args)
        return
    profile = cProfile.Profile()
    profile.enable()
    anyio.run(consumer_main, args)
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    Path(args.profile_path).write_text(out.getvalue())


# -- the MONITOR process --------------------------------------------------------------------------------


def run_monitor_role(args: argparse.Namespace) -> None:
    """Write every MONITOR line to ``--out`` until the sentinel ECHO shows up."""
    host, port = args.host, int(args.port)
    with socket.create_connection((host, port)) as sock, Path(args.out).open("wb") as out:
        sock.sendall(b"MONITOR\r\n")
        reader = sock.makefile("rb")
        first = reader.readline()
        if not first.startswith(b"+OK"):
            raise SystemExit(f"MONITOR refused: {first!r}")
        print("ready", flush=True)
        for line in reader:
            out.write(line)
            if SENTINEL.encode() in line:
                break


# -- the orchestrator ----------------------------------------------------------------------------------


@dataclass
class Child:
    proc: subprocess.Popen[str]
    stderr_path: Path

    async def event(self, name: str, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with anyio.fail_after(timeout_s):
            while True:
                line = await anyio.to_thread.run_sync(self.proc.stdout.readline)
                if not line:
                    raise RuntimeError(f"child exited: {self.stderr_path.read_text()[-3000:]}")
                message: dict[str, Any] = json.loads(line)
                if message["event"] == name:
                    return message


def spawn(role: str, workdir: Path, label: str, *extra: str) -> Child:
    stderr_path = workdir / f"{label}.stderr"
    err: IO[str] = stderr_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, str(THIS), "--role", role, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    err.close()
    return Child(proc, stderr_path)


@dataclass
class Monitor:
    proc: subprocess.Popen[str]
    out: Path

    @classmethod
    def start(cls, server: RedisServer, workdir: Path, label: str) -> Monitor:
        """Start the MONITOR reader and wait until Redis has accepted its MONITOR."""
        out = workdir / f"monitor-{label}.log"
        proc = subprocess.Popen(
            [sys.executable, str(THIS), "--role", "monitor", "--port", str(server.port), "--out", str(out)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("MONITOR process did not start")
        return cls(proc, out)

    async def stop(self, r: aioredis.Redis, *, keep_lines: bool = False) -> MonitorSummary:
        await r.echo(SENTINEL)
        await anyio.to_thread.run_sync(self.proc.wait, 30)
        summary = await anyio.to_thread.run_sync(parse_monitor, self.out, keep_lines)
        self.out.unlink()  # tens of MB for a load case
        return summary


@dataclass
class MonitorLine:
    ts: float
    client: str
    cmd: str
    script: str
    rest: str

    @property
    def lua(self) -> bool:
        return self.client == "lua"

    @property
    def billable(self) -> bool:
        return not self.lua and self.cmd not in FREE and SENTINEL not in self.rest

    @property
    def label(self) -> str:
        return f"{self.cmd}({self.script})" if self.script else self.cmd


@dataclass
class MonitorSummary:
    """Billed top-level commands and commands inside scripts (billed too); the lines only for small logs."""

    billable: Counter[str] = field(default_factory=Counter)
    lua: Counter[str] = field(default_factory=Counter)

    @property
    def all_in(self) -> int:
        """Every billed command: top-level and inside scripts."""
        return sum(self.billable.values()) + sum(n for k, n in self.lua.items() if k.split(":")[-1] not in FREE)

    lines: list[MonitorLine] = field(default_factory=list)


def parse_monitor(path: Path, keep_lines: bool = False) -> MonitorSummary:
    summary = MonitorSummary()
    current = ""
    with path.open(errors="replace") as log:
        for raw in log:
            m = MONITOR_LINE.match(raw.rstrip("\r\n"))
            if m is None:
                continue
            cmd, rest = m["cmd"].lower(), m["rest"]
            script = ""
            if m["client"] != "lua":
                current = ""
                if cmd == "evalsha":
                    sha = rest.split('"')[1] if '"' in rest else ""
                    current = script = SHA_TO_SCRIPT.get(sha, sha[:8])
            else:
                script = current  # a command run by the script called just before
            line = MonitorLine(float(m["ts"]), m["client"], cmd, script, rest)
            if line.billable:
                summary.billable[line.label] += 1
            elif line.lua:
                summary.lua[f"{script}:{cmd}"] += 1
            if keep_lines and line.billable:
                summary.lines.append(line)
    return summary


async def commandstats_total(r: aioredis.Redis) -> tuple[int, dict[str, int]]:
    """Calls Redis counted since the last RESETSTAT, without the bench's own CONFIG/INFO."""
    info: dict[str, Any] = await r.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}
    calls = {name: n for name, n in calls.items() if name not in {"config", "info"}}
    return sum(calls.values()), calls


@dataclass
class LoadResult:
    name: str
    jobs: int
    concurrency: int
    job_ms: float
    jobs_s: float = 0.0
    client_per_job: float = 0.0
    enqueue_per_job: float = 0.0
    consumer_per_job: float = 0.0
    monitor_per_job: float = 0.0
    monitor_top_per_job: float = 0.0
    monitor_client_per_job: float = 0.0
    cmdstats_per_job: float = 0.0
    rss_mb: float = 0.0
    drained: bool = False
    monitor_breakdown: dict[str, int] = field(default_factory=dict)
    lua_breakdown: dict[str, int] = field(default_factory=dict)
    cmdstats_breakdown: dict[str, int] = field(default_factory=dict)


async def load_run(
    server: RedisServer,
    workdir: Path,
    case: LoadResult,
    *,
    monitor: bool,
    run: int,
    profile: bool,
) -> dict[str, Any]:
    """One enqueue-and-drain of ``case``; returns what was measured."""
    label = f"{case.name.replace(' ', '')}-c{case.concurrency}-{'mon' if monitor else 'plain'}-{run}"
    prefix = f"bench:{label}"
    keys = Keys(prefix)
    clients = RedisClients(server.url)
    r = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        scripts = Scripts(clients.client("startup"))
        await scripts.load(clients.client("startup"))
        queue = Queue(clients.client("queue"), clients.client("queue", blocking=True), keys, scripts, consumer="bench")
        await queue.ensure_group()
        extra = [
            "--redis",
            server.url,
            "--prefix",
            prefix,
            "--consumer",
            "c1",
            "--concurrency",
            str(case.concurrency),
            "--job-ms",
            str(case.job_ms),
            "--expect",
            str(case.jobs),
        ]
        if profile:
            extra += ["--profile-out", str(workdir / f"profile-{label}.txt")]
        child = spawn("consumer", workdir, label, *extra)
        ready = await child.event("ready", 30)
        mon = await anyio.to_thread.run_sync(Monitor.start, server, workdir, label) if monitor else None
        await r.config_resetstat()
        sections = [("2261", str(100000 + n)) for n in range(case.jobs)]
        before = clients.usage.total["queue"]
        t0 = time.time()
        result = await queue.enqueue(sections)
        enqueue_commands = clients.usage.total["queue"] - before
        if result.added != case.jobs:
            raise RuntimeError(f"enqueued {result.added} of {case.jobs}")
        done = await child.event("done", 600)
        await anyio.to_thread.run_sync(child.proc.wait, 30)
        cmd_total, cmd_calls = await commandstats_total(r)
        seen = await mon.stop(r) if mon is not None else MonitorSummary()
        summary: Any = await r.xpending(keys.stream, keys.group)
        drained = int(await r.xlen(keys.stream)) == 0 and int(summary["pending"]) == 0
    finally:
        await r.aclose()
        await clients.aclose()
    consumer_commands = sum(done["usage"].values()) - sum(ready["usage"].values())
    return {
        "jobs_s": case.jobs / (done["t"] - t0),
        "enqueue": enqueue_commands,
        "consumer": consumer_commands,
        "client": enqueue_commands + consumer_commands,
        "monitor": seen.all_in,
        "monitor_top": sum(seen.billable.values()),
        "monitor_breakdown": dict(seen.billable.most_common()),
        "lua_breakdown": dict(seen.lua.most_common()),
        "cmdstats": cmd_total,
        "cmdstats_breakdown": dict(sorted(cmd_calls.items(), key=lambda kv: -kv[1])),
        "rss_mb": done["rss_kb"] / 1024,
        "drained": drained and done["completed"] == case.jobs,
    }


async def measure_load(server: RedisServer, workdir: Path, case: LoadResult, profile: bool) -> LoadResult:
    plain = await load_run(server, workdir, case, monitor=False, run=1, profile=profile)
    monitored = await load_run(server, workdir, case, monitor=True, run=2, profile=False)
    n = case.jobs
    case.jobs_s = plain["jobs_s"]
    case.client_per_job = plain["client"] / n
    case.enqueue_per_job = plain["enqueue"] / n
    case.consumer_per_job = plain["consumer"] / n
    case.cmdstats_per_job = plain["cmdstats"] / n
    case.monitor_per_job = monitored["monitor"] / n
    case.monitor_top_per_job = monitored["monitor_top"] / n
    case.monitor_client_per_job = monitored["client"] / n
    case.rss_mb = plain["rss_mb"]
    case.drained = plain["drained"] and monitored["drained"]
    case.monitor_breakdown = monitored["monitor_breakdown"]
    case.lua_breakdown = monitored["lua_breakdown"]
    case.cmdstats_breakdown = plain["cmdstats_breakdown"]
    return case


@dataclass
class IdleResult:
    label: str
    settings: str
    period_s: float
    window_s: float
    startup: int  # client side, before ready: script loads, group, resume
    client_after_ready: int
    monitor_after_ready: int
    timeline: list[str]
    per_day_raw: float = 0.0
    per_day_steady: float = 0.0


async def measure_idle(server: RedisServer, workdir: Path, idle_s: float) -> list[IdleResult]:
    """A default-settings consumer and a 10 s-period one, side by side, watched by MONITOR."""
    setups = {
        "default": (900.0, ["--defaults", "--visibility-s", "300"]),
        "scaled": (10.0, ["--idle-block-s", "10", "--idle-maintenance-s", "10", "--visibility-s", "20"]),
    }
    r = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        for name in setups:
            await r.xgroup_create(Keys(f"bench:idle:{name}").stream, "workers", id="0", mkstream=True)
        mon = await anyio.to_thread.run_sync(Monitor.start, server, workdir, "idle")
        children: dict[str, Child] = {}
        for name, (_period, options) in setups.items():
            children[name] = spawn(
                "consumer",
                workdir,
                f"idle-{name}",
                *["--redis", server.url, "--prefix", f"bench:idle:{name}", "--consumer", f"idle-{name}"],
                *["--concurrency", "16", "--expect", "0", *options],
            )
        readies = {name: await child.event("ready", 30) for name, child in children.items()}
        print(f"  idle: watching two idle consumers for {idle_s:.0f}s ...", flush=True)
        await anyio.sleep(idle_s)
        ended = time.time()
        for child in children.values():
            child.proc.send_signal(signal.SIGTERM)
        dones = {name: await child.event("done", 30) for name, child in children.items()}
        for child in children.values():
            await anyio.to_thread.run_sync(child.proc.wait, 30)
        lines = (await mon.stop(r, keep_lines=True)).lines
    finally:
        await r.aclose()

    results = {}
    for name, (period_s, _options) in setups.items():
        ready_t = readies[name]["t"]
        mine = [line for line in lines if f"bench:idle:{name}:" in line.rest]
        startup = sum(readies[name]["usage"].values())
        window_s = ended - ready_t
        client_after_ready = sum(dones[name]["usage"].values()) - startup
        results[name] = IdleResult(
            label=name,
            settings=(
                "idle_block_s=900 idle_maintenance_s=3600 (the defaults)"
                if name == "default"
                else f"idle_block_s={period_s:.0f} idle_maintenance_s={period_s:.0f}"
            ),
            period_s=period_s,
            window_s=window_s,
            startup=startup,
            client_after_ready=client_after_ready,
            monitor_after_ready=sum(1 for line in mine if ready_t <= line.ts <= ended),
            timeline=[f"t{line.ts - ready_t:+.1f}s {line.label}{block_of(line)}" for line in mine],
            per_day_raw=client_after_ready * 86400 / window_s,
        )
    # What one idle period costs, measured over the 10 s consumer's many periods, scaled to each period.
    scaled = results["scaled"]
    per_period = scaled.client_after_ready / (scaled.window_s / scaled.period_s)
    maintenance = per_period - 1  # a period: one blocking read (top-level, no script) and one maintenance
    periods = {"default": (900.0, 3600.0), "scaled": (10.0, 10.0)}
    for name, res in results.items():
        block_s, maintain_s = periods[name]
        res.per_day_steady = 86400 / block_s + maintenance * 86400 / maintain_s
    return list(results.values())


def block_of(line: MonitorLine) -> str:
    m = re.search(r'"BLOCK" "(\d+)"', line.rest, re.IGNORECASE)
    return f" BLOCK {int(m[1]) / 1000:.0f}s" if m else ""


# -- report --------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(loads: list[LoadResult], idles: list[IdleResult]) -> None:
    print()
    print("Load: enqueue + drain on a private redis-server (consumer in its own process)")
    header = (
        f"{'case':<16}{'jobs':>7}{'jobs/s':>9}{'ideal':>8}{'cmd/job':>9}{'enq':>7}{'cons':>7}"
        f"{'MONITOR':>9}{'(client)':>9}{'top':>7}{'cmdstats':>10}{'RSS MB':>8}  drained"
    )
    print(header)
    print("-" * len(header))
    for c in loads:
        ideal = f"{c.concurrency / (c.job_ms / 1000):.0f}" if c.job_ms else "-"
        print(
            f"{c.name + ' c=' + str(c.concurrency):<16}{c.jobs:>7}{c.jobs_s:>9.0f}{ideal:>8}"
            f"{c.client_per_job:>9.3f}{c.enqueue_per_job:>7.3f}{c.consumer_per_job:>7.3f}"
            f"{c.monitor_per_job:>9.3f}{c.monitor_client_per_job:>9.3f}{c.monitor_top_per_job:>7.3f}"
            f"{c.cmdstats_per_job:>10.3f}"
            f"{c.rss_mb:>8.1f}  {c.drained}"
        )
    print(
        "  cmd/job = billed commands per job, all-in (scripts' inner commands included), client-side usage.total"
        "\n  (enq = orchestrator's enqueue, cons = the consumer: reads, queue_cycle (acks + breaker admit/record),"
        "\n  maintenance); MONITOR = billable MONITOR lines per job in a second run, all-in, (client) = usage.total"
        "\n  of that same run, top = its top-level lines only; cmdstats = INFO commandstats calls per job."
    )
    print()
    print("MONITOR breakdown (billed commands, second run):")
    for c in loads:
        parts = ", ".join(f"{k} {v}" for k, v in c.monitor_breakdown.items())
        print(f"  {c.name} c={c.concurrency}: {parts}")
    print("Inside scripts (MONITOR [0 lua] lines per job):")
    for c in loads:
        top = list(c.lua_breakdown.items())[:8]
        parts = ", ".join(f"{k} {v / c.jobs:.2f}" for k, v in top)
        print(f"  {c.name} c={c.concurrency}: {parts}")

    print()
    print("Idle: a waiting consumer (all-in commands; startup = script loads, group, resume)")
    for res in idles:
        print(
            f"  {res.label:<8} {res.settings}: startup {res.startup}; then {res.client_after_ready} commands"
            f" in {res.window_s:.0f}s (MONITOR saw {res.monitor_after_ready} top-level)"
        )
        print(f"           timeline: {'; '.join(res.timeline)}")
        print(
            f"           per day: raw extrapolation of the window {res.per_day_raw:.0f};"
            f" steady state (measured cost of one idle period x periods per day) {res.per_day_steady:.0f};"
            f" first day incl. startup and the first maintenance ~{res.startup + 1 + res.per_day_steady:.0f}"
        )
    print(
        "  The raw extrapolation scales whatever fell in the window: with 900 s and 3,600 s periods a window of a"
        "\n  few minutes holds zero or one periodic command, so the steady state is taken from the measured cost"
        "\n  of one period (the 10 s consumer, many periods): one blocking read per idle_block_s, the rest of a"
        "\n  period's cost per idle_maintenance_s."
    )

    print()
    print("Targets")
    default_idle = next(res for res in idles if res.label == "default")
    rows = [
        (
            "idle <= 400 commands/day all-in (defaults, steady state)",
            f"{default_idle.per_day_steady:.0f}/day",
            default_idle.per_day_steady <= IDLE_TARGET_PER_DAY,
        ),
    ]
    for c in loads:
        if c.concurrency >= 4:
            rows.append(
                (
                    f"total incl. breaker <= 0.1 cmd/job all-in ({c.name} c={c.concurrency})",
                    f"{c.client_per_job:.3f}",
                    c.client_per_job <= TOTAL_TARGET_PER_JOB,
                )
            )
    for c in loads:
        if c.job_ms == 0 and c.concurrency == 16:
            rows.append(("no-op >= 5,000 jobs/s at c=16", f"{c.jobs_s:.0f} jobs/s", c.jobs_s >= NOOP_TARGET_JOBS_S))
        if c.job_ms == 50 and c.concurrency == 16:
            ideal_jobs_s = c.concurrency / 0.05
            rows.append(
                (
                    "50 ms jobs at c=16 >= 90% of 320 jobs/s",
                    f"{c.jobs_s:.0f} jobs/s = {100 * c.jobs_s / ideal_jobs_s:.1f}%",
                    c.jobs_s >= SLOW_TARGET_FRACTION * ideal_jobs_s,
                )
            )
    peak = max(c.rss_mb for c in loads)
    rows.append(("peak RSS < 60 MB (consumer process)", f"{peak:.1f} MB", peak < RSS_TARGET_MB))
    for what, value, ok in rows:
        print(f"  {what:<58}{value:>22}  {verdict(ok)}")


def report_bullmq(server: RedisServer, cases: list[tuple[int, int]]) -> None:
    """The same no-op loads through BullMQ on the same server, counted all-in (bench/bullmq/bench.mjs)."""
    folder = Path(__file__).resolve().parent / "bullmq"
    print()
    print("BullMQ, same run, same server (no-op jobs, addBulk, removed on completion; MONITOR, all-in):")
    if shutil.which("node") is None or not (folder / "node_modules" / "bullmq").is_dir():
        print("  skipped: needs node and `npm install` in bench/bullmq")
        return
    for jobs, concurrency in cases:
        out = subprocess.run(
            ["node", str(folder / "bench.mjs"), server.url, str(jobs), str(concurrency)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if out.returncode != 0:
            print(f"  c={concurrency}: failed: {out.stderr.strip()[-300:]}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rate = jobs / result["seconds"]
        print(
            f"  no-op c={concurrency:<3} {jobs} jobs in {result['seconds']:.1f} s ({rate:.0f} jobs/s):"
            f" {result['all_in'] / jobs:.1f} commands per job all-in, {result['top_level'] / jobs:.2f} top-level"
        )


async def orchestrate(args: argparse.Namespace, workdir: Path) -> None:
    idle_s = args.idle_s if args.idle_s else (125.0 if args.quick else 240.0)
    cases = [
        LoadResult("no-op", args.jobs, 4, 0.0),
        LoadResult("no-op", args.jobs, 16, 0.0),
        LoadResult("50 ms", args.slow_jobs, 16, 50.0),
    ]
    server = RedisServer(workdir / "redis").start()
    try:
        probe = aioredis.Redis.from_url(server.url, decode_responses=True)
        version = (await probe.info("server"))["redis_version"]
        await probe.aclose()
        print(f"private redis-server {version} on {server.url}; python {sys.version.split()[0]}", flush=True)
        loads = []
        for case in cases:
            print(f"  load: {case.jobs} x {case.name} jobs at concurrency {case.concurrency} ...", flush=True)
            loads.append(await measure_load(server, workdir, case, profile=args.profile))
        idles = await measure_idle(server, workdir, idle_s)
        report(loads, idles)
        report_bullmq(server, [(c.jobs, c.concurrency) for c in cases if c.job_ms == 0])
    finally:
        server.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a 125 s idle measurement instead of 240 s")
    parser.add_argument("--idle-s", type=float, default=0.0, help="idle measurement length (at least 120)")
    parser.add_argument("--jobs", type=int, default=10_000, help="no-op jobs per load case")
    parser.add_argument("--slow-jobs", type=int, default=3200, help="50 ms jobs (3,200 = 10 s ideal at c=16)")
    parser.add_argument("--profile", action="store_true", help="cProfile the consumer of each load case")
    # Internal roles: the same file runs the consumer and the MONITOR reader in their own processes.
    parser.add_argument("--role", choices=("orchestrate", "consumer", "monitor"), default="orchestrate")
    parser.add_argument("--redis", default="")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--consumer", default="c1")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--job-ms", type=float, default=0.0)
    parser.add_argument("--expect", type=int, default=0, help="stop after this many jobs (0: at SIGTERM)")
    parser.add_argument("--defaults", action="store_true", help="Consumer defaults for the idle settings")
    parser.add_argument("--idle-block-s", type=float, default=2.0)
    parser.add_argument("--idle-maintenance-s", type=float, default=2.0)
    parser.add_argument("--visibility-s", type=float, default=300.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="6379")
    parser.add_argument("--out", default="")
    parser.add_argument("--profile-out", dest="profile_path", default="")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.role == "consumer":
        run_consumer_role(args)
    elif args.role == "monitor":
        run_monitor_role(args)
    else:
        if 0 < args.idle_s < 120:
            raise SystemExit("--idle-s must be at least 120")
        with tempfile.TemporaryDirectory(prefix="seatwatch-bench-") as tmp, contextlib.suppress(KeyboardInterrupt):
            workdir = Path(tmp)
            anyio.run(orchestrate, args, workdir)
            for path in sorted(workdir.glob("profile-*.txt")):
                print(f"\n== {path.name}\n{path.read_text()[:8000]}")


if __name__ == "__main__":
    main()
