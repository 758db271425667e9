"""The system test: seatwatch installed by ``packaging/install.sh`` and run by a real systemd (Debian 12's 252)
in a booted container, on this machine's architecture and on arm64 under qemu-user emulation.

Run as root by ``scripts/system-test`` (which installs the tools and the venv first); not collected by pytest.
Each check prints one ``PASS``/``FAIL`` line with its time; the exit status is 1 when any failed.

The machine shares the host's network namespace (no private network: it reaches the package registries the
way the host does), so the unit talks to the host's Redis and Postgres on loopback, under a random prefix and
in a scratch database this run creates and drops, and to a scraper and a Resend stand-in served from here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

import asyncpg
import redis

from tests.support.seed import add_legacy_state, add_user, add_watch
from tests.support.stubs import RESEND_KEY, SCRAPER_TOKEN, Reply, ResendStub, ScraperStub, section_data
from tests.system.machine import Machine, MachineError, booted, cached_root, say, sweep_runs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

REPO: Final = Path(__file__).resolve().parents[2]
ADMIN_DSN: Final = os.environ.get("SEATWATCH_SYSTEM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL: Final = os.environ.get("SEATWATCH_SYSTEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TERM: Final = "2261"
UNIT: Final = "seatwatch"
ENV_FILE: Final = "/etc/seatwatch/seatwatch.env"
CREDENTIALS: Final = "/etc/seatwatch/credentials"
CHECKOUT: Final = "/root/seatwatch"
# Three of the unit's settings cannot work under qemu-user (7.2), whose emulated processes fork through qemu's
# own clone() emulation and always carry a second thread of qemu's:
# - LoadCredential=: systemd 252 mounts the credentials in a child made with clone(CLONE_NEWNS), which qemu
#   refuses with EINVAL for anything but a thread (no host system call is made): step CREDENTIALS, 243; Debian's
#   own systemd-sysusers and systemd-tmpfiles-setup fail the same way at boot.
# - PrivateUsers=yes: unshare(CLONE_NEWUSER) reaches the kernel, which refuses it with EINVAL because the caller
#   is multithreaded (qemu's thread): step USER, 217.
# - PrivateIPC=yes: the IPC namespace is made in a child that never starts (no host system call either), and
#   systemd reads EIO from the socket it waits on: step NAMESPACE, 226.
# Real arm64 has none of these limits (the native run proves the unit whole); under emulation only, the secrets
# go into the env file (which the daemon and `check --env-file` also read) and this drop-in turns those off.
QEMU_DROP_IN: Final = "/etc/systemd/system/seatwatch.service.d/qemu-user.conf"
QEMU_SETTINGS: Final = "[Service]\nLoadCredential=\nPrivateUsers=no\nPrivateIPC=no\n"


class CheckFailed(Exception):
    """A check's expectation did not hold (the message says what was seen)."""


def fail(message: str) -> NoReturn:
    raise CheckFailed(message)


def expect(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


def until(probe: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = probe()
        except (MachineError, CheckFailed, OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            fail(f"{what}: not within {timeout_s:.0f} s (last: {last!r})")
        time.sleep(every_s)


class Report:
    """One line per check: PASS or FAIL, its name, its time; a fatal failure ends that machine's checks."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.passed = 0
        self.failed: list[str] = []
        self.notes: list[str] = []

    @contextlib.contextmanager
    def check(self, name: str, *, fatal: bool = False) -> Iterator[list[str]]:
        """Time the block; ``details`` appended to the yielded list are printed after PASS."""
        details: list[str] = []
        began = time.monotonic()
        try:
            yield details
        except Exception as exc:  # any error is this check's failure; the run goes on
            took = time.monotonic() - began
            say(f"FAIL {name} ({took:.1f} s)")
            for line in str(exc).splitlines() or [type(exc).__name__]:
                say(f"     {line}")
            self.failed.append(name)
            if fatal:
                raise Abort(name) from exc
        else:
            took = time.monotonic() - began
            say(f"PASS {name} ({took:.1f} s)")
            for line in details:
                say(f"     {line}")
            self.passed += 1


class Abort(Exception):
    """A check the rest depends on failed: the machine's remaining checks are skipped."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the host side: a scratch database, a Redis prefix, the stand-ins ----------------------------------------


class Stores:
    """A scratch database (created empty: the unit's `run` applies the migrations) and a Redis prefix."""

    def __init__(self, tag: str) -> None:
        self.database = f"seatwatch_system_{tag}_{os.getpid()}_{secrets.token_hex(4)}"
        self.prefix = f"swsys-{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        self.url = ADMIN_DSN.rsplit("/", 1)[0] + "/" + self.database

    def create(self) -> None:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.database}"'))

    def drop(self) -> None:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(REDIS_URL)
            try:
                keys = list(client.scan_iter(match=f"{self.prefix}:*", count=500))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start : start + 500])
            finally:
                client.close()

    @classmethod
    def sweep(cls) -> None:
        """Drop the databases and keys of runs killed before their clean-up (their process is gone)."""

        def dead(pid: str) -> bool:
            return pid.isdigit() and not Path(f"/proc/{pid}").exists()

        async def databases() -> list[str]:
            conn = await asyncpg.connect(ADMIN_DSN, timeout=15)
            try:
                rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'seatwatch\\_system\\_%'")
            finally:
                await conn.close()
            return [str(r["datname"]) for r in rows]

        with contextlib.suppress(OSError, asyncpg.PostgresError):
            for name in asyncio.run(databases()):
                if dead(name.split("_")[3] if name.count("_") >= 4 else ""):
                    asyncio.run(cls._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    say(f"     swept a leftover database: {name}")
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(REDIS_URL)
            try:
                for key in client.scan_iter(match="swsys-*", count=1000):
                    parts = key.decode(errors="replace").split("-")
                    if len(parts) >= 4 and dead(parts[2]):
                        client.delete(key)
            finally:
                client.close()

    @staticmethod
    async def _admin(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=15)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def watch(self, class_nbr: str) -> str:
        """A student watching a full section (the state the web app leaves); the student's address."""
        email = f"student-{class_nbr}@example.edu"

        async def seed() -> None:
            conn = await asyncpg.connect(self.url, timeout=15)
            try:
                await add_watch(conn, await add_user(conn, email), TERM, class_nbr)
                await add_legacy_state(conn, TERM, class_nbr, seats=0)
            finally:
                await conn.close()

        asyncio.run(seed())
        return email


# -- the scenario --------------------------------------------------------------------------------------------


class Scenario:
    """The checks on one booted machine."""

    def __init__(self, report: Report, machine: Machine, stores: Stores, *, emulated: bool) -> None:
        self.report = report
        self.m = machine
        self.stores = stores
        self.emulated = emulated
        self.slow = 4.0 if emulated else 1.0  # timeouts under qemu-user
        self.scraper = ScraperStub().start()
        self.resend = ResendStub().start()
        self.port = free_port()
        self.signing_key = secrets.token_hex(16)
        self.first_version = ""
        self.owed = ""

    def close(self) -> None:
        self.scraper.stop()
        self.resend.stop()

    # What the operator writes into /etc/seatwatch.

    def settings(self) -> dict[str, str]:
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        return {
            "SCRAPER_URL": self.scraper.url,
            "RESEND_API_URL": self.resend.url,
            "NOTIFICATION_FROM_EMAIL": "notifications@pickmyclass.test",
            "NEXT_PUBLIC_SITE_URL": "https://pickmyclass.test",
            # A daily cron an hour ago, blanks and all (systemd's syntax): no tick of its own during the test.
            "SEATWATCH_CRON": f"{hour_ago.minute} {hour_ago.hour} * * *",
            "SEATWATCH_TIMEZONE": "UTC",
            "SEATWATCH_HEALTH_LISTEN": f"127.0.0.1:{self.port}",
            "SEATWATCH_REDIS_PREFIX": self.stores.prefix,
            "SEATWATCH_CONSUMER": f"system-test-{self.m.arch}",
            "SEATWATCH_SHUTDOWN_GRACE_S": "30",
            "SEATWATCH_SCRAPER_TIMEOUT_S": "20",
        }

    def secrets(self) -> dict[str, str]:
        return {
            "database_url": self.stores.url,
            "redis_url": REDIS_URL,
            "scraper_secret_token": SCRAPER_TOKEN,
            "resend_api_key": RESEND_KEY,
            "supabase_service_role_key": self.signing_key,
        }

    def configure(self) -> None:
        values = self.settings()
        if self.emulated:
            values.update({name.upper(): value for name, value in self.secrets().items()})
        self.m.write(ENV_FILE, "".join(f"{k}={v}\n" for k, v in values.items()))
        if self.emulated:
            self.m.write(QEMU_DROP_IN, QEMU_SETTINGS, 0o644)
            self.m.run(["systemctl", "daemon-reload"])
            return
        for name, value in self.secrets().items():
            self.m.write(f"{CREDENTIALS}/{name}", value)

    def cli_env(self) -> dict[str, str]:
        """The settings as environment variables (how a command is pointed at them without issue 19's default)."""
        return {**self.settings(), **{k.upper(): v for k, v in self.secrets().items()}}

    # Reading the unit.

    def show(self, *props: str) -> dict[str, str]:
        out = self.m.run(["systemctl", "show", UNIT, *(f"-p{p}" for p in props)], timeout_s=30 * self.slow).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, since: float, *extra: str) -> str:
        argv = ["journalctl", "-u", UNIT, "--no-pager", "-o", "cat", f"--since=@{int(since) - 1}", *extra]
        return self.m.run(argv, timeout_s=30 * self.slow, check=False).stdout

    def health(self) -> dict[str, Any]:
        done = self.m.run(
            ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{self.port}/api/monitoring/health"],
            timeout_s=20 * self.slow,
            check=False,
        )
        if done.returncode != 0:
            raise CheckFailed(f"curl exited {done.returncode}: {done.stderr.strip()}")
        body: dict[str, Any] = json.loads(done.stdout)
        return body

    def healthy(self) -> dict[str, Any] | None:
        body = self.health()
        return body if body.get("status") == "healthy" else None

    def running(self) -> dict[str, str] | None:
        state = self.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")
        ok = state.get("ActiveState") == "active" and state.get("SubState") == "running"
        return state if ok and state.get("MainPID", "0") != "0" else None

    def seccomp_filters(self, pid: str) -> int:
        status = self.m.run(["cat", f"/proc/{pid}/status"]).stdout
        found = re.search(r"^Seccomp_filters:\s+(\d+)", status, re.MULTILINE)
        return int(found.group(1)) if found else -1

    def current_release(self) -> str:
        return self.m.run(["readlink", "/opt/seatwatch/current"]).stdout.strip().rsplit("/", 1)[-1]

    def installed_version(self) -> str:
        return self.m.run(["/usr/local/bin/seatwatch", "--version"]).stdout.strip().split()[-1]

    def install(self, *args: str) -> str:
        done = self.m.shell(
            f"cd {CHECKOUT} && packaging/install.sh {' '.join(args)}".strip(), timeout_s=600 * self.slow
        )
        return done.stdout + done.stderr

    def tick_with_email(self, class_nbr: str, details: list[str], *, delay_s: float = 0.0) -> str:
        """A watched full section the scraper now shows open; `seatwatch tick`; the email Resend received."""
        email = self.stores.watch(class_nbr)
        self.scraper.script(
            TERM, class_nbr, Reply(200, {"success": True, "data": section_data(seats=2)}, delay_s=delay_s)
        )
        tick = self.m.run(["seatwatch", "tick", "--group", "all"], env=self.cli_env(), timeout_s=60 * self.slow)
        details.append(f"tick: {tick.stdout.strip().splitlines()[-1] if tick.stdout.strip() else '(no output)'}")
        return email

    def delivered(self, email: str, timeout_s: float) -> None:
        until(lambda: email in self.resend.delivered_to(), timeout_s * self.slow, f"the email to {email}")

    def stopped_with(self, status: str, since: float, details: list[str]) -> None:
        """The unit, started into a bad configuration, failed with ``status`` and was not restarted."""
        start = self.m.run(["systemctl", "start", UNIT], timeout_s=200 * self.slow, check=False)
        expect(start.returncode != 0, "systemctl start succeeded")
        first = self.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        time.sleep(8)  # longer than RestartSec=5: a restart would have begun
        after = self.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        expect(after.get("ExecMainStatus") == status, f"exit status {after.get('ExecMainStatus')}, expected {status}")
        expect(after.get("ActiveState") == "failed", f"ActiveState={after.get('ActiveState')}")
        expect(after.get("NRestarts") == first.get("NRestarts"), f"restarted: NRestarts {first} -> {after}")
        log = self.journal(since)
        expect("Scheduled restart job" not in log, "systemd scheduled a restart")
        errors = [line for line in self.journal(since, "-p", "err").splitlines() if line.strip()]
        details.append(f"ExecMainStatus={status}, Result={after.get('Result')}, NRestarts={after.get('NRestarts')}")
        for line in errors[-4:]:
            details.append(f"journalctl -p err: {line[:150]}")

    def reset_failed(self) -> None:
        self.m.run(["systemctl", "reset-failed", UNIT], check=False)

    def journal_tail(self) -> None:
        tail = self.m.run(
            ["journalctl", "-u", UNIT, "--no-pager", "-n", "25", "-o", "short-precise"], timeout_s=60, check=False
        ).stdout
        say(f"     the unit's last journal lines ({self.m.arch}):")
        for line in tail.splitlines():
            say(f"     | {line}")

    # The checks.

    def boot_checks(self) -> None:
        with self.report.check(f"{self.m.arch}: systemd >= 249 inside", fatal=True) as details:
            first = self.m.run(["systemctl", "--version"]).stdout.splitlines()[0]
            found = re.match(r"systemd (\d+)", first)
            expect(found is not None and int(found.group(1)) >= 249, f"found {first!r}")
            machine = self.m.run(["uname", "-m"]).stdout.strip()
            details.append(f"{first}; uname -m: {machine}")

    def install_checks(self) -> None:
        with self.report.check(f"{self.m.arch}: install (packaging/install.sh from a clone of HEAD)", fatal=True) as d:
            subprocess.run(
                ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(self.m.root / CHECKOUT.lstrip("/"))],
                check=True,
                timeout=120,
                capture_output=True,
            )
            output = self.install()
            done = self.m.run(["readlink", "/opt/seatwatch/current"], check=False)
            expect(done.returncode == 0, f"no /opt/seatwatch/current after:\n{output[-2000:]}")
            self.first_version = self.installed_version()
            d.append(f"seatwatch {self.first_version}; release {self.current_release()}")

        with self.report.check(f"{self.m.arch}: settings written; seatwatch check --env-file", fatal=True) as d:
            self.configure()
            done = self.m.run(["seatwatch", "check", "--env-file", ENV_FILE], timeout_s=120 * self.slow, check=False)
            lines = (done.stdout + done.stderr).strip().splitlines()
            expect(done.returncode == 0, "exit status {}:\n{}".format(done.returncode, "\n".join(lines)))
            d.extend(lines)
            if self.emulated:
                d.append(
                    f"(under qemu-user: the secrets in the env file; {QEMU_DROP_IN}: "
                    "LoadCredential= PrivateUsers=no PrivateIPC=no)"
                )

    def start_checks(self) -> None:
        with self.report.check(f"{self.m.arch}: systemctl enable --now: READY and STATUS=", fatal=True) as d:
            began = time.monotonic()
            self.m.run(["systemctl", "enable", "--now", UNIT], timeout_s=200 * self.slow)
            state = self.running()
            expect(state is not None, f"not running after start: {self.show('ActiveState', 'SubState', 'Result')}")
            assert state is not None
            expect(bool(state["StatusText"].strip()), "STATUS= is empty")
            d.append(f"ready in {time.monotonic() - began:.1f} s; StatusText={state['StatusText']}")
            # nspawn filters the whole container; the unit's SystemCallFilter= adds filters of its own.
            unit, init = self.seccomp_filters(state["MainPID"]), self.seccomp_filters("1")
            d.append(f"seccomp filters: the daemon {unit}, the machine's init {init}")
            if not self.emulated:
                expect(unit > init, "SystemCallFilter= is not in force (no seccomp filter beyond nspawn's)")

        with self.report.check(f"{self.m.arch}: health through the unit's listener") as d:
            body = until(self.healthy, 30 * self.slow, "health 'healthy'")
            expect(body.get("version") == self.first_version, f"version {body.get('version')}")
            d.append(f"status {body['status']}, version {body['version']}, checks {sorted(body.get('checks', {}))}")

        with self.report.check(f"{self.m.arch}: one tick with an email (scraper and Resend stand-ins)") as d:
            email = self.tick_with_email("12340", d)
            self.delivered(email, 60)
            d.append(f"delivered to {email} through the Resend stand-in")

    def operator_checks(self) -> None:
        with self.report.check(f"{self.m.arch}: `seatwatch status` as typed by root (issue 19's default)") as d:
            done = self.m.shell("seatwatch status", timeout_s=60, check=False)
            out = (done.stdout + done.stderr).strip().splitlines()
            if done.returncode != 0:
                fail(
                    f"exit status {done.returncode}; needs the commands to read the installed settings by "
                    "default (issue 19, branch i19):\n" + "\n".join(out[-6:])
                )
            expect(any("breaker" in line.lower() for line in out), "no breaker line:\n" + "\n".join(out))
            d.extend(out[:6])

        with self.report.check(f"{self.m.arch}: kill -9: restarted within seconds") as d:
            before = until(self.running, 30, "running before")
            began = time.monotonic()
            self.m.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT])
            after = until(
                lambda: (s := self.running()) and s["MainPID"] != before["MainPID"] and s,
                30,
                "a new main process",
                every_s=0.2,
            )
            expect(int(after["NRestarts"]) == int(before["NRestarts"]) + 1, f"NRestarts {before} -> {after}")
            until(self.healthy, 30, "health after the restart")
            d.append(f"running again in {time.monotonic() - began:.1f} s (RestartSec=5), healthy")

        with self.report.check(f"{self.m.arch}: watchdog on SIGSTOP (WatchdogSec=60)") as d:
            before = until(self.running, 30, "running before")
            began = time.time()
            self.m.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT])
            until(
                lambda: (s := self.running()) and s["MainPID"] != before["MainPID"] and s,
                150,
                "a new main process after the watchdog",
                every_s=1,
            )
            log = self.journal(began)
            expect("Watchdog timeout" in log, "no 'Watchdog timeout' in the journal")
            d.append(f"aborted by the watchdog and running again after {time.time() - began:.0f} s")
            d.extend(line for line in log.splitlines() if "atchdog" in line)

        with self.report.check(f"{self.m.arch}: upgrade (install.sh on a second commit)") as d:
            until(self.running, 30, "running before")
            self.m.run(
                [
                    "git",
                    "-C",
                    CHECKOUT,
                    "-c",
                    "user.name=system test",
                    "-c",
                    "user.email=system-test@localhost",
                    "commit",
                    "--quiet",
                    "--allow-empty",
                    "-m",
                    "system test: a second commit",
                ]
            )
            first_release = self.current_release()
            output = self.install()
            second = self.installed_version()
            expect(second != self.first_version, f"still {second}:\n{output[-1500:]}")
            expect(self.current_release() != first_release, "current did not move")
            body = until(lambda: (b := self.healthy()) and b.get("version") == second and b, 60, "the new version")
            d.append(f"{self.first_version} -> {second}; health says {body['version']}")

        with self.report.check(f"{self.m.arch}: rollback (install.sh --rollback)") as d:
            self.install("--rollback")
            expect(self.installed_version() == self.first_version, f"now {self.installed_version()}")
            body = until(
                lambda: (b := self.healthy()) and b.get("version") == self.first_version and b, 60, "the old version"
            )
            history = json.loads(self.m.run(["cat", "/opt/seatwatch/history.json"]).stdout)
            d.append(f"back to {body['version']}; /opt/seatwatch/history.json: {json.dumps(history)}")

        with self.report.check(f"{self.m.arch}: drain on stop (exit 0, the job in flight finishes)") as d:
            until(self.running, 30, "running before")
            since = time.time()
            self.owed = self.tick_with_email("12342", d, delay_s=4)
            until(lambda: self.scraper.calls(TERM, "12342") >= 1, 30, "the slow scrape to begin")
            began = time.monotonic()
            self.m.run(["systemctl", "stop", UNIT], timeout_s=120)
            state = self.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
            expect(state.get("ExecMainStatus") == "0", f"stopped with {state}")
            expect(state.get("Result") == "success", f"Result={state.get('Result')}")
            lines = self.journal(since).splitlines()
            drained = [line for line in lines if "draining" in line or "12342" in line]
            expect(any("draining: waiting for 1 running job" in line for line in lines), "no 'draining' line")
            d.append(f"stopped in {time.monotonic() - began:.1f} s, {state}")
            d.extend(line[:160] for line in drained[-4:])
            sent = self.owed in self.resend.delivered_to()
            d.append("its email: " + ("delivered before exit" if sent else "owed (the next start sends it)"))

        env_text = (self.m.root / ENV_FILE.lstrip("/")).read_text()

        with self.report.check(f"{self.m.arch}: a bad setting stops with 78, no restart") as d:
            since = time.time()
            self.m.write(ENV_FILE, env_text + "SEATWATCH_CONCURRENCY=lots\n")
            try:
                self.stopped_with("78", since, d)
            finally:
                self.m.write(ENV_FILE, env_text)
                self.reset_failed()

        with self.report.check(f"{self.m.arch}: a missing credential (database_url) stops with 78, no restart") as d:
            since = time.time()
            moved = self.m.root / CREDENTIALS.lstrip("/") / "database_url"
            moved.rename(moved.with_name("database_url.away"))
            try:
                self.stopped_with("78", since, d)
                log = self.journal(since)
                expect("DATABASE_URL" in log or "database_url" in log, "the journal does not name database_url")
            finally:
                moved.with_name("database_url.away").rename(moved)
                self.reset_failed()

        with self.report.check(f"{self.m.arch}: the credentials folder missing stops with 243, no restart") as d:
            since = time.time()
            folder = self.m.root / CREDENTIALS.lstrip("/")
            folder.rename(folder.with_name("credentials.away"))
            try:
                self.stopped_with("243", since, d)
            finally:
                folder.with_name("credentials.away").rename(folder)
                self.reset_failed()

        with self.report.check(f"{self.m.arch}: the env file missing: no restart loop (issue 19)") as d:
            since = time.time()
            env_path = self.m.root / ENV_FILE.lstrip("/")
            env_path.rename(env_path.with_name("seatwatch.env.away"))
            try:
                self.m.run(["systemctl", "start", UNIT], timeout_s=60, check=False)
                time.sleep(12)  # two RestartSec=5 periods
                state = self.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
                log = self.journal(since)
                expect("Scheduled restart job" not in log, f"a restart loop: {state}")
                expect(state.get("ActiveState") not in ("active", "activating"), f"{state}")
                d.append(f"{state}")
            finally:
                env_path.with_name("seatwatch.env.away").rename(env_path)
                self.reset_failed()

        with self.report.check(f"{self.m.arch}: starts again once the settings are whole; nothing owed is lost") as d:
            self.m.run(["systemctl", "start", UNIT], timeout_s=200)
            body = until(self.healthy, 30, "health 'healthy'")
            if self.owed:
                self.delivered(self.owed, 60)
            d.append(f"health {body['status']}; the email owed at the drain delivered to {self.owed}")


def run_machine(report: Report, arch: str, *, emulated: bool, full: bool, boot_timeout_s: float) -> None:
    stores = Stores(arch)
    try:
        with contextlib.ExitStack() as stack:
            with report.check(f"{arch}: Debian 12 root filesystem (debootstrap, cached)", fatal=True) as d:
                began = time.monotonic()
                image, hit = cached_root(arch, timeout_s=1800)
                d.append(f"{'from the cache' if hit else 'built'}: {image} ({time.monotonic() - began:.0f} s)")
            with report.check(f"{arch}: boot (systemd-nspawn -b --register=no --keep-unit)", fatal=True) as d:
                stores.create()
                machine = stack.enter_context(booted(arch, image, boot_timeout_s))
                d.append(f"{machine.name}, PID 1 on the host: {machine.pid1}")
            scenario = Scenario(report, machine, stores, emulated=emulated)
            stack.callback(scenario.close)
            failed = len(report.failed)
            try:
                scenario.boot_checks()
                scenario.install_checks()
                scenario.start_checks()
                if full:
                    scenario.operator_checks()
            finally:
                if len(report.failed) > failed:
                    scenario.journal_tail()
    except Abort as exc:
        say(f"---- {arch}: the remaining checks need '{exc}': skipped")
    finally:
        stores.drop()


def main(argv: list[str] | None = None) -> int:
    native = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    parser = argparse.ArgumentParser(prog="scripts/system-test", description=__doc__)
    parser.add_argument(
        "--arch",
        action="append",
        help=f"architectures to test (default: {native} in full, then arm64 emulated when the host is not arm64)",
    )
    args = parser.parse_args(argv)
    arches = args.arch or list(dict.fromkeys([native, "arm64"]))
    if os.geteuid() != 0:
        say("system-test: run as root (it boots containers)")
        return 2

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)

    report = Report()
    say(f"system-test: {shlex.join(arches)} on a {native} host, checkout {REPO} at {head()}")
    sweep_runs()
    Stores.sweep()
    try:
        for arch in arches:
            emulated = arch != native
            say(f"---- {arch}{' (qemu-user emulation)' if emulated else ''}")
            run_machine(report, arch, emulated=emulated, full=not emulated, boot_timeout_s=600 if emulated else 120)
    except KeyboardInterrupt as exc:
        say(f"system-test: interrupted ({exc}); cleaned up")
        report.failed.append("interrupted")
    total = time.monotonic() - report.started
    say(f"---- total {total:.0f} s ({total / 60:.1f} min)")
    for name in report.failed:
        say(f"FAILED: {name}")
    say(f"system-test: {report.passed} passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


def head() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
