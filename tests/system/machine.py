"""A Debian 12 machine under a real systemd: a cached debootstrap root, a throwaway copy of it booted with
``systemd-nspawn -b``, and commands run inside it through ``nsenter``.

The root filesystem is built once per architecture and package list from the mirror the host's own apt
sources name (read at run time: no host name is written here), and kept under ``CACHE``. Each run boots a
copy under ``RUNS`` that is removed afterwards, with every mount below it; a run that was killed is swept
by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

CACHE: Final = Path(os.environ.get("SEATWATCH_SYSTEM_TEST_CACHE", "/var/cache/seatwatch-system-test"))
RUNS: Final = Path(os.environ.get("SEATWATCH_SYSTEM_TEST_RUNS", "/var/tmp/seatwatch-system-test"))
SUITE: Final = "bookworm"
# What the installer and the checks need beyond Debian's minimal base: systemd as PID 1 (and D-Bus, which
# logind and `systemctl` expect), the Python the installer builds with, git (the installer reads the
# checkout), curl (health through the unit's listener), the CA bundle (pip over TLS).
PACKAGES: Final = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "git", "curl", "ca-certificates")
RECIPE: Final = 1  # bump when the way the root is prepared changes, so caches are rebuilt
LOGIN_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MachineError(RuntimeError):
    """The machine could not be built, booted or reached."""


def say(line: str) -> None:
    print(line, flush=True)


# -- the mirror ----------------------------------------------------------------------------------------------


def _sources(apt: Path) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of every enabled ``deb`` entry in the host's apt sources."""
    found: list[tuple[str, list[str], list[str]]] = []
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in files:
        if not path.is_file():
            continue
        for raw in path.read_text(errors="replace").splitlines():
            line = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
            if len(line) >= 3 and line[0] == "deb":
                found.append((line[1], [line[2]], line[3:]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for raw in stanza.splitlines():
                if raw.startswith("#") or ":" not in raw or raw[:1].isspace():
                    continue
                name, value = raw.split(":", 1)
                fields[name.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                found.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    return found


def debian_mirror(apt: Path = Path("/etc/apt")) -> str:
    """The Debian archive the host installs from (an entry with the main component and a plain release suite)."""
    sources = _sources(apt)
    plain = [uri for uri, suites, comps in sources if "main" in comps and SUITE in suites]
    if not plain:
        plain = [
            uri
            for uri, suites, comps in sources
            if "main" in comps and any(re.fullmatch(r"[a-z]+", s) for s in suites) and "security" not in uri
        ]
    if not plain:
        raise MachineError(f"no Debian archive in {apt}/sources.list(.d) to debootstrap {SUITE} from")
    return plain[0].rstrip("/")


# -- the cached root -----------------------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                points.append(point)
    return points


def remove_tree(path: Path) -> None:
    """Unmount everything below ``path`` (deepest first), then remove it without crossing into a mount."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, capture_output=True, timeout=600)


def cache_key(arch: str, mirror: str) -> str:
    text = f"{RECIPE} {SUITE} {arch} minbase {' '.join(sorted(PACKAGES))} {mirror}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_root(arch: str, timeout_s: float) -> tuple[Path, bool]:
    """The prepared root for ``arch`` (built now when missing); whether it came from the cache.

    A lock per architecture: a second run waits for the first one's build instead of removing it.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".{arch}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cached_root(arch, timeout_s)


def _cached_root(arch: str, timeout_s: float) -> tuple[Path, bool]:
    mirror = debian_mirror()
    folder = CACHE / arch
    ready = folder / cache_key(arch, mirror)
    if (ready / ".complete").is_file():
        return ready / "root", True
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():  # unfinished builds and roots of another package list
        if stale != ready:
            remove_tree(stale)
    remove_tree(ready)
    build = folder / f"build-{os.getpid()}"
    log = folder / f"debootstrap-{os.getpid()}.log"
    say(f"     debootstrap {SUITE} {arch} from the host's mirror (log: {log})")
    try:
        with log.open("w") as out:
            result = subprocess.run(
                [
                    "debootstrap",
                    f"--arch={arch}",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(build / "root"),
                    mirror,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout_s,
                check=False,
            )
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise MachineError(f"debootstrap {arch} failed (exit status {result.returncode}):\n{tail}")
        _prepare(build / "root")
        (build / ".complete").write_text(f"{SUITE} {arch} {' '.join(PACKAGES)} from {mirror}\n")
        remove_tree(ready)
        os.rename(build, ready)
        log.unlink(missing_ok=True)
    except BaseException:
        remove_tree(build)
        raise
    return ready / "root", False


def _prepare(root: Path) -> None:
    """Once per cached root: a machine that boots quickly and quietly in a container."""
    (root / "etc" / "hostname").write_text("seatwatch-test\n")
    wants = root / "etc" / "systemd" / "system"
    for unit in ("console-getty.service", "apt-daily.timer", "apt-daily-upgrade.timer"):
        link = wants / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def host_pip_files() -> list[Path]:
    """The host's pip configuration and extra CA certificates: copied in so pip inside reaches the registry."""
    files: list[Path] = []
    for folder in (Path("/usr/local/share/ca-certificates"), Path("/etc/xdg/pip"), Path.home() / ".config" / "pip"):
        if folder.is_dir():
            files.extend(p for p in folder.rglob("*") if p.is_file())
    for single in (Path("/etc/pip.conf"), Path.home() / ".pip" / "pip.conf"):
        if single.is_file():
            files.append(single)
    named = [os.environ.get(n, "") for n in ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_CONFIG_FILE", "REQUESTS_CA_BUNDLE")]
    for conf in [f for f in files if f.suffix == ".conf"]:
        named += re.findall(r"^\s*(?:cert|client-cert|constraint)\s*=\s*(\S+)", conf.read_text(), re.MULTILINE)
    for name in named:
        path = Path(name)
        if path.is_absolute() and path.is_file() and not str(path).startswith("/etc/ssl/"):
            files.append(path)
    return sorted(set(files))


def pass_through_env() -> dict[str, str]:
    """What of the caller's environment commands inside get: pip's settings and the proxies."""
    keep = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in keep}


# -- the booted machine --------------------------------------------------------------------------------------


class Done(subprocess.CompletedProcess[str]):
    """A finished command inside the machine."""


def sweep_runs() -> None:
    """Stop the machines and remove the copies of runs that were killed before their own clean-up."""
    if not RUNS.is_dir():
        return
    for run in RUNS.iterdir():
        owner = run / "owner.pid"
        with contextlib.suppress(OSError, ValueError):
            if Path(f"/proc/{int(owner.read_text())}").exists():
                continue  # a live run (another invocation): not ours to remove
        for pid in _nspawns_under(run):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(_nspawns_under(run), 10)
        say(f"     swept a leftover run: {run}")
        remove_tree(run)
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / run.name, ignore_errors=True)


def _nspawns_under(run: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"systemd-nspawn") and any(a.startswith(str(run).encode()) for a in argv):
                pids.append(int(proc.name))
    return pids


def _wait_gone(pids: Sequence[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.2)
    return False


class Machine:
    """A copy of a cached root, booted by systemd-nspawn; ``run`` executes a command inside."""

    def __init__(self, arch: str, image: Path) -> None:
        self.arch = arch
        self.name = f"sw-{arch}-{uuid.uuid4().hex[:8]}"
        self.dir = RUNS / self.name
        self.root = self.dir / "root"
        self.image = image
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.console = self.dir / "console.log"
        self.env = pass_through_env()

    # Setting up and tearing down.

    def create(self) -> None:
        self.dir.mkdir(parents=True)
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.image), str(self.root)], check=True, timeout=600)
        for path in host_pip_files():
            target = self.root / str(path).lstrip("/")
            if str(path).startswith(str(Path.home())):
                target = self.root / "root" / path.relative_to(Path.home())
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            if str(path).startswith("/usr/local/share/ca-certificates/") and path.suffix == ".crt":
                # What update-ca-certificates would add to the bundle pip, curl and Python read (running it
                # inside takes half a minute under emulation).
                with (self.root / "etc/ssl/certs/ca-certificates.crt").open("a") as bundle:
                    bundle.write("\n" + path.read_text().strip() + "\n")

    def boot(self, timeout_s: float) -> None:
        """Boot it; return once ``systemctl is-system-running --wait`` says running or degraded."""
        with self.console.open("wb") as out:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "-b",
                    "--register=no",
                    "--keep-unit",
                    f"--machine={self.name}",
                    "-D",
                    str(self.root),
                    "--console=read-only",
                    "--resolv-conf=copy-host",
                    "--timezone=off",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self.pid1:
            if self.nspawn.poll() is not None:
                raise MachineError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise MachineError(f"no PID 1 inside within {timeout_s:.0f} s:\n{self.console_tail()}")
            self.pid1 = self._find_pid1(self.nspawn.pid)
            time.sleep(0.1)
        while True:  # PID 1 is there before its bus socket: retry until systemctl connects
            left = max(5.0, deadline - time.monotonic())
            state = self.run(["systemctl", "is-system-running", "--wait"], timeout_s=left, check=False)
            if state.stdout.strip() in ("running", "degraded"):
                return
            said = (state.stdout + state.stderr).strip()
            if "Failed to connect to bus" not in said or time.monotonic() > deadline:
                raise MachineError(f"the boot did not finish: {said!r}\n{self.console_tail()}")
            time.sleep(0.5)

    @staticmethod
    def _find_pid1(nspawn: int) -> int:
        """The container's init: a descendant of systemd-nspawn whose own PID namespace calls it 1."""
        children = {nspawn}
        for _ in range(3):
            found: set[int] = set()
            for pid in children:
                with contextlib.suppress(OSError):
                    for task in Path(f"/proc/{pid}/task").iterdir():
                        found.update(int(c) for c in (task / "children").read_text().split())
            for pid in found:
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    nspid = re.search(r"^NSpid:\s+(.*)$", status, re.MULTILINE)
                    if nspid and len(nspid.group(1).split()) > 1 and nspid.group(1).split()[-1] == "1":
                        return pid
            children = found
        return 0

    def console_tail(self, lines: int = 20) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        text = re.sub(r"\x1b\[[0-9;]*m|\r", "", text)
        kept = [line for line in text.splitlines() if line.strip()]
        return "\n".join("     | " + line for line in kept[-lines:])

    def destroy(self) -> None:
        """Power it off, then remove the copy.

        ``systemctl poweroff`` first: nspawn's own SIGTERM sends SIGRTMIN+3, which qemu-user renumbers (an
        emulated systemd took it for SIGRTMIN+1, rescue mode). Then SIGTERM twice (nspawn's immediate
        termination), then SIGKILL, which takes the whole PID namespace with it.
        """
        nspawn = self.nspawn
        if nspawn is not None and nspawn.poll() is None:
            if self.pid1:
                with contextlib.suppress(MachineError):
                    self.run(["systemctl", "poweroff", "--no-block"], timeout_s=15, check=False)
            for sig in (None, signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        nspawn.send_signal(sig)
                try:
                    nspawn.wait(30 if sig is None else 10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        remove_tree(self.dir)
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)

    # Commands inside.

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = 60,
        check: bool = True,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
    ) -> Done:
        """``argv`` inside the machine, as root, in a clean environment (a login's PATH, HOME, LANG)."""
        clean = {"PATH": LOGIN_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "USER": "root"}
        clean.update(self.env)
        clean.update(env or {})
        command = ["nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i", *(f"{k}={v}" for k, v in clean.items())]
        try:
            result = subprocess.run(
                [*command, *argv],
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise MachineError(f"{' '.join(argv)!r} took longer than {timeout_s:.0f} s") from exc
        done = Done(result.args, result.returncode, result.stdout, result.stderr)
        if check and done.returncode != 0:
            output = "\n".join(("     | " + line) for line in (done.stdout + done.stderr).strip().splitlines()[-25:])
            raise MachineError(f"{' '.join(argv)!r} exited {done.returncode}:\n{output}")
        return done

    def shell(self, script: str, *, timeout_s: float = 60, check: bool = True) -> Done:
        """A command line as root would type it at a login shell."""
        return self.run(["bash", "-lc", script], timeout_s=timeout_s, check=check)

    def write(self, path: str, text: str, mode: int = 0o600) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        os.chmod(target, mode)


@contextlib.contextmanager
def booted(arch: str, image: Path, timeout_s: float) -> Iterator[Machine]:
    machine = Machine(arch, image)
    try:
        machine.create()
        machine.boot(timeout_s)
        yield machine
    finally:
        machine.destroy()
