#!/usr/bin/env python3
"""Install, upgrade, roll back and remove seatwatch on a systemd host. ``packaging/install.sh`` runs this.

    install.sh [--python PATH] [--force]     install or upgrade from this checkout
    install.sh --rollback                    switch back to the release before the current one
    install.sh --uninstall                   remove the unit and every release (keeps /etc/seatwatch)
    install.sh --purge                       also /etc/seatwatch, /var/lib/seatwatch and the seatwatch user
    install.sh --which-python                print the Python that would be used, and why
    ... --root DIR                           do all of it inside DIR, recording the commands it would run

Layout: /opt/seatwatch/releases/<version>-<commit>/ (its own venv, a copy of the unit it was built with),
/opt/seatwatch/current -> releases/<one of them> (switched with one rename), /opt/seatwatch/history.json
(releases in the order they became current; the last three are kept), /etc/seatwatch/seatwatch.env (0600)
and /etc/seatwatch/credentials/ (0700), /etc/systemd/system/seatwatch.service, /usr/local/bin/seatwatch.

A release is built from the checkout's tracked files copied into a clean temporary folder (so nothing
deleted or untracked ships), as a wheel whose version carries the commit, installed with the locked,
hashed dependencies only. A release that fails half way is removed; ``seatwatch check`` runs against the
installed configuration before ``current`` moves. This file runs on any Python 3.8 or newer (the host's
default python3 may be older than the 3.11 seatwatch needs): keep it to the standard library and 3.8 syntax.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

MIN_PYTHON = (3, 11)
USER = "seatwatch"
PREFIX = Path("/opt/seatwatch")
ETC = Path("/etc/seatwatch")
STATE_DIR = Path("/var/lib/seatwatch")
UNIT = Path("/etc/systemd/system/seatwatch.service")
BIN_LINK = Path("/usr/local/bin/seatwatch")
UNIT_NAME = "seatwatch.service"
KEEP_RELEASES = 3
CREDENTIALS = ("database_url", "redis_url", "scraper_secret_token", "resend_api_key", "supabase_service_role_key")
RUNTIME_LOCK = "packaging/requirements.lock"
BUILD_LOCK = "packaging/requirements-build.lock"
RELEASE_FILE = "RELEASE.json"  # written last: a release folder without it is unfinished

# Asks a candidate interpreter for its version and whether it can make a venv with pip in it.
PROBE = (
    "import json, sys\n"
    "try:\n"
    "    import ensurepip, venv\n"
    "    ok = True\n"
    "except ImportError:\n"
    "    ok = False\n"
    "print(json.dumps({'version': list(sys.version_info[:3]), 'venv': ok}))\n"
)


class Refused(Exception):
    """The installer will not go on; the message says why and what to do."""


def say(message: str) -> None:
    """A line for the operator. A terminal that went away (an SSH session dropped, ``| head`` done reading) does
    not stop the installer: from then on its output, and its commands', goes to /dev/null."""
    try:
        print(message, flush=True)
    except OSError:
        lose_terminal()


def lose_terminal() -> None:
    """Point stdout and stderr (ours and every later command's) at /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


MIN_SYSTEMD = 249


def systemd_version() -> int | None:
    """The version ``systemctl --version`` reports, or None when there is no systemctl."""
    try:
        out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else None


def check_systemd(host: Host) -> None:
    """The unit needs systemd >= 249: before it, a folder in ``LoadCredential=`` fails every start with 243."""
    found = systemd_version()
    if found is None:
        if host.staging:
            say("systemd: no systemctl here (staging): the version is not checked")
            return
        raise Refused("no systemctl: seatwatch runs as a systemd service (systemd 249 or newer)")
    if found < MIN_SYSTEMD:
        raise Refused(
            f"systemd {found} is too old: the unit needs {MIN_SYSTEMD} or newer (before it, LoadCredential= of a"
            " folder fails every start with status 243, 'Protocol error'). Debian 12, Ubuntu 22.04 and Oracle Linux 9"
            " have it; on Debian 11 upgrade to Debian 12 first"
        )
    say(f"systemd: {found} (the unit needs {MIN_SYSTEMD} or newer)")


# -- where the installer acts ---------------------------------------------------------------------------


class Host:
    """The real system, or a staging folder (``--root``) where system commands are recorded, not run."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.calls_file = root / ".staging" / "calls.jsonl" if root else None

    @property
    def staging(self) -> bool:
        return self.root is not None

    def path(self, path: Path) -> Path:
        """Where a system path is: itself, or the same path inside the staging folder."""
        return self.root / path.relative_to("/") if self.root else path

    def system(self, argv: Sequence[str], env: dict[str, str] | None = None, check: bool = True) -> None:
        """A command that changes the system (systemctl, useradd, a package manager): run, or recorded."""
        say("  $ " + " ".join(shlex.quote(a) for a in argv))
        if self.calls_file is not None:
            self.calls_file.parent.mkdir(parents=True, exist_ok=True)
            with self.calls_file.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"argv": list(argv)}) + "\n")
            return
        result = subprocess.run(list(argv), env=dict(os.environ, **(env or {})))
        if check and result.returncode != 0:
            raise Refused(f"{argv[0]} failed with exit status {result.returncode}")

    def user_exists(self, name: str) -> bool:
        if self.root is None:
            try:
                pwd.getpwnam(name)
            except KeyError:
                return False
            return True
        passwd = self.path(Path("/etc/passwd"))
        return passwd.exists() and any(line.split(":", 1)[0] == name for line in passwd.read_text().splitlines())

    def add_system_user(self, name: str, home: Path) -> None:
        self.system(
            [
                "useradd",
                "--system",
                "--user-group",
                "--home-dir",
                str(home),
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ]
        )
        if self.root is not None:  # what useradd would have done, so a second run sees the user
            passwd = self.path(Path("/etc/passwd"))
            passwd.parent.mkdir(parents=True, exist_ok=True)
            with passwd.open("a", encoding="utf-8") as out:
                out.write(f"{name}:x:999:999::{home}:/usr/sbin/nologin\n")

    def remove_system_user(self, name: str) -> None:
        self.system(["userdel", name])
        if self.root is not None:
            passwd = self.path(Path("/etc/passwd"))
            kept = [line for line in passwd.read_text().splitlines() if line.split(":", 1)[0] != name]
            passwd.write_text("".join(line + "\n" for line in kept))

    def own_by_root(self, path: Path) -> None:
        if self.root is None:
            os.chown(path, 0, 0)


# -- finding a Python >= 3.11 ---------------------------------------------------------------------------


class Interpreter:
    def __init__(self, path: str, version: tuple[int, ...], venv: bool) -> None:
        self.path = path
        self.version = version
        self.venv = venv

    @property
    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)

    def __repr__(self) -> str:
        return f"{self.path} ({self.version_text}{'' if self.venv else ', no venv'})"


def probe(path: str) -> Interpreter | None:
    """What ``path`` is, or None when it does not run as a Python."""
    try:
        out = subprocess.run(
            [path, "-I", "-c", PROBE], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        answer = json.loads(out.splitlines()[-1])
        return Interpreter(path, tuple(int(part) for part in answer["version"]), bool(answer["venv"]))
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def candidates(search_path: str) -> list[str]:
    """Every ``python3.N`` and ``python3`` on the search path, once each (by the file they resolve to)."""
    names = [f"python3.{minor}" for minor in range(30, 5, -1)] + ["python3"]
    found: list[str] = []
    seen = set()
    for folder in search_path.split(os.pathsep):
        if not folder:
            continue
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                real = os.path.realpath(path)
                if real not in seen:
                    seen.add(real)
                    found.append(path)
    return found


def choose(interpreters: list[Interpreter]) -> Interpreter | None:
    """The newest interpreter that is recent enough and can make a venv."""
    usable = [i for i in interpreters if i.version >= MIN_PYTHON and i.venv]
    return max(usable, key=lambda i: i.version) if usable else None


def os_release(host: Host) -> dict[str, str]:
    path = host.path(Path("/etc/os-release"))
    if not path.exists() and host.staging:
        return {}
    values: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def distribution_packages(release: dict[str, str], found: list[Interpreter]) -> list[list[str]] | None:
    """The package-manager commands that bring a Python >= 3.11 with venv on this distribution, if known."""
    ids = [release.get("ID", ""), *release.get("ID_LIKE", "").split()]
    version = release.get("VERSION_ID", "")
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    recent = sorted((i for i in found if i.version >= MIN_PYTHON), key=lambda i: i.version, reverse=True)
    if "debian" in ids or "ubuntu" in ids:
        apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "--no-install-recommends"]
        if recent:  # new enough, but venv/ensurepip is packaged separately (python3.X-venv)
            minor = recent[0].version[1]
            return [["apt-get", "update"], [*apt, f"python3.{minor}-venv"]]
        if release.get("ID") == "ubuntu" and version == "22.04":
            return [["apt-get", "update"], [*apt, "python3.11", "python3.11-venv"]]
        if (release.get("ID") == "debian" and major >= 12) or (release.get("ID") == "ubuntu" and major >= 24):
            return [["apt-get", "update"], [*apt, "python3", "python3-venv"]]
        return None
    if {"rhel", "centos", "fedora", "ol", "rocky", "almalinux"} & set(ids):
        if major == 9:
            return [["dnf", "install", "-y", "python3.11"]]
        if major >= 10:
            return [["dnf", "install", "-y", "python3"]]
    return None


def find_python(host: Host, explicit: str | None, search_path: str, install: bool) -> Interpreter:
    """The Python to build the release with: ``--python``, else the newest >= 3.11 on the search path,
    else one the distribution's packages provide (installed when ``install``); refuses otherwise."""
    want = ".".join(str(part) for part in MIN_PYTHON)
    if explicit:
        chosen = probe(explicit)
        if chosen is None:
            raise Refused(f"--python {explicit}: does not run as a Python interpreter")
        if chosen.version < MIN_PYTHON:
            raise Refused(f"--python {explicit} is Python {chosen.version_text}; seatwatch needs {want} or newer")
        if not chosen.venv:
            raise Refused(
                f"--python {explicit} (Python {chosen.version_text}) cannot make a virtual environment "
                f"(no venv/ensurepip): install python3.{chosen.version[1]}-venv or its equivalent"
            )
        return chosen
    found = [i for i in (probe(path) for path in candidates(search_path)) if i is not None]
    chosen = choose(found)
    if chosen is not None:
        return chosen
    release = os_release(host)
    commands = distribution_packages(release, found)
    seen = ", ".join(repr(i) for i in sorted(found, key=lambda i: i.version, reverse=True)) or "none"
    name = release.get("PRETTY_NAME") or "this system"
    if commands is None or not install:
        advice = (
            "; the distribution can provide one with: " + " && ".join(" ".join(c) for c in commands)
            if commands
            else f"; {name} has no known package for it: install Python {want}+ and pass --python PATH"
        )
        raise Refused(f"no Python {want} or newer with venv on PATH (found: {seen}){advice}")
    say(f"no Python {want}+ with venv on PATH (found: {seen}); installing one from {name}'s packages")
    for command in commands:
        host.system(command)
    found = [i for i in (probe(path) for path in candidates(search_path)) if i is not None]
    chosen = choose(found)
    if chosen is None:
        raise Refused(f"still no Python {want} or newer with venv after installing it; pass --python PATH")
    return chosen


# -- the source and its version -------------------------------------------------------------------------


class Source:
    """The checkout to install: its tracked files, base version and the commit label of the release."""

    def __init__(self, root: Path) -> None:
        self.root = root
        pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
        match = re.search(r'^version = "([^"+]+)"$', pyproject, re.MULTILINE)
        if match is None:
            raise Refused(f"{root}/pyproject.toml has no plain version line")
        self.base_version = match.group(1)
        self.files, self.commit = self._inventory()

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.root), *args], capture_output=True, text=True, check=True).stdout

    def _inventory(self) -> tuple[list[str], str]:
        if not (self.root / ".git").exists():
            raise Refused(f"{self.root} is not a git checkout: install from a clone, so the release names its commit")
        try:
            files = [f for f in self._git("ls-files", "-z").split("\0") if f and (self.root / f).is_file()]
            head = self._git("rev-parse", "--short=12", "HEAD").strip()
            changed = self._git("status", "--porcelain", "--untracked-files=no").strip()
        except (OSError, subprocess.CalledProcessError) as exc:
            raise Refused(f"cannot read the git checkout {self.root}: {exc}") from None
        if not changed:
            return files, head
        # Local changes to tracked files: name the release by their content too, so the same edits make the
        # same release and different edits a different one.
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + (self.root / name).read_bytes() + b"\0")
        return files, f"{head}.dirty{digest.hexdigest()[:8]}"

    @property
    def version(self) -> str:
        """PEP 440, the commit in the local part: ``0.1.0+g1a2b3c4d5e6f``."""
        return f"{self.base_version}+g{self.commit}"

    @property
    def release_name(self) -> str:
        return f"{self.base_version}-{self.commit}"

    def copy_to(self, folder: Path) -> None:
        """The tracked files into ``folder``, with the version in pyproject.toml carrying the commit."""
        for name in self.files:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.root / name, target)
        pyproject = folder / "pyproject.toml"
        text, count = re.subn(
            r'^version = "[^"]+"$',
            f'version = "{self.version}"',
            pyproject.read_text(encoding="utf-8"),
            count=1,
            flags=re.MULTILINE,
        )
        if count != 1:
            raise Refused("cannot stamp the version into pyproject.toml")
        pyproject.write_text(text, encoding="utf-8")


# -- releases -------------------------------------------------------------------------------------------


def pip_env() -> dict[str, str]:
    return dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")


def run_step(what: str, argv: Sequence[str], cwd: Path | None = None) -> str:
    """Run a build step; on failure, refuse with its output (the caller cleans up)."""
    result = subprocess.run(list(argv), cwd=cwd, env=pip_env(), capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise Refused(f"{what} failed (exit status {result.returncode}):\n{tail}")
    return result.stdout


# Builds the wheel through the PEP 517 interface of the locked backend (no second venv, no pip build step).
BUILD = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_wheel(sys.argv[1]))\n"


def make_release(python: Interpreter, source: Source, release: Path, work: Path) -> None:
    """Build ``release`` (venv, locked dependencies, the wheel, the unit); removed again if anything fails.

    The wheel is built from a clean copy of the tracked files in ``work``, by the build backend pinned in
    the build lock; the dependencies come only from the runtime lock, each file checked against its hash.
    """
    try:
        tree = work / "src"
        source.copy_to(tree)
        venv = release / "venv"
        release.mkdir(parents=True)
        run_step("creating the release's venv", [python.path, "-m", "venv", str(venv)])
        vpython = str(venv / "bin" / "python")
        pip = [vpython, "-m", "pip", "install", "--quiet", "--no-deps"]
        # One pip run for both locks: the build backend lands in the venv too (a 3.11 venv has one anyway).
        locks = ["-r", str(tree / RUNTIME_LOCK), "-r", str(tree / BUILD_LOCK)]
        run_step("installing the locked dependencies", [*pip, "--require-hashes", "--only-binary=:all:", *locks])
        dist = work / "dist"
        wheel_name = run_step("building the wheel", [vpython, "-c", BUILD, str(dist)], cwd=tree)
        wheel = dist / wheel_name.strip().splitlines()[-1]
        run_step("installing seatwatch", [*pip, "--no-index", str(wheel)])
        run_step("checking the dependencies (pip check)", [vpython, "-m", "pip", "check"])
        shown = run_step("running seatwatch --version", [str(venv / "bin" / "seatwatch"), "--version"]).strip()
        if shown != f"seatwatch {source.version}":
            raise Refused(f"the new release says {shown!r}, expected 'seatwatch {source.version}'")
        shutil.copy2(tree / "seatwatch.service", release / "seatwatch.service")
        for extra in ("Caddyfile", "packaging/seatwatch.env", "docs/operations.md", "README.md"):
            if (tree / extra).is_file():
                (release / extra).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tree / extra, release / extra)
        info = {
            "version": source.version,
            "commit": source.commit,
            "python": python.version_text,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        }
        write_atomically(release / RELEASE_FILE, json.dumps(info, indent=2) + "\n", 0o644)
    except BaseException:
        shutil.rmtree(release, ignore_errors=True)
        raise


def write_atomically(path: Path, text: str, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.chmod(temporary, mode)
    os.replace(temporary, path)


class Layout:
    """The installed state under the prefix: releases, ``current`` and the history of switches."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.prefix = host.path(PREFIX)
        self.releases = self.prefix / "releases"
        self.current_link = self.prefix / "current"
        self.history_file = self.prefix / "history.json"

    def current(self) -> str | None:
        if not self.current_link.is_symlink():
            return None
        return Path(os.readlink(self.current_link)).name

    def complete(self, name: str) -> bool:
        return (self.releases / name / RELEASE_FILE).is_file()

    def history(self) -> list[str]:
        try:
            names = json.loads(self.history_file.read_text())["history"]
        except (OSError, ValueError, KeyError):
            return []
        return [str(name) for name in names]

    def save_history(self, names: list[str]) -> None:
        write_atomically(self.history_file, json.dumps({"history": names}, indent=2) + "\n", 0o644)

    def sweep_unfinished(self) -> None:
        """Remove release folders a killed run left without their RELEASE.json."""
        if not self.releases.is_dir():
            return
        for folder in self.releases.iterdir():
            if folder.is_dir() and not (folder / RELEASE_FILE).is_file():
                say(f"removing the unfinished release {folder.name}")
                shutil.rmtree(folder, ignore_errors=True)

    def switch(self, name: str) -> None:
        """Point ``current`` at ``name`` with one rename (never a moment without it)."""
        temporary = self.prefix / f".current-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        os.symlink(f"releases/{name}", temporary)
        os.replace(temporary, self.current_link)

    def prune(self, keep: int) -> list[str]:
        """Keep the last ``keep`` releases that were current (the current one among them); remove the rest."""
        kept: list[str] = []
        for name in reversed(self.history()):
            if name not in kept and self.complete(name):
                kept.append(name)
            if len(kept) == keep:
                break
        current = self.current()
        if current and current not in kept:
            kept.insert(0, current)
        self.save_history([name for name in self.history() if name in kept][-keep * 4 :])
        for folder in sorted(self.releases.iterdir()):
            if folder.is_dir() and folder.name not in kept:
                say(f"removing the old release {folder.name}")
                shutil.rmtree(folder, ignore_errors=True)
        return kept


def switch_over(host: Host, layout: Layout, name: str, history: list[str]) -> None:
    """Make ``name`` current: switch ``current``, install its unit and the command, daemon-reload, restart a
    running service, record ``history``. One step: it finishes, or everything it changed is put back (the
    previous release current, its unit reloaded and restarted, the history as it was).

    From here on a lost terminal cannot stop it half way: SIGHUP and SIGPIPE are ignored (and stay ignored in
    the systemctl it runs), and output to a closed pipe is dropped (``say``). SIGTERM or Ctrl-C rolls back.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    previous = layout.current()
    unit = host.path(UNIT)
    old_unit = unit.read_text(encoding="utf-8") if unit.is_file() else None
    try:
        layout.switch(name)
        install_unit(host, layout.releases / name)
        link_command(host)
        host.system(["systemctl", "daemon-reload"])
        host.system(["systemctl", "try-restart", UNIT_NAME])
        layout.save_history(history)
    except BaseException as exc:
        # Nothing may interrupt the way back either.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        say(f"switch to {name} did not finish ({exc.__class__.__name__}: {exc}); putting {previous or 'nothing'} back")
        if previous is not None:
            layout.switch(previous)
        else:
            with contextlib.suppress(FileNotFoundError):
                layout.current_link.unlink()
        if old_unit is not None:
            write_atomically(unit, old_unit, 0o644)
        else:
            with contextlib.suppress(FileNotFoundError):
                unit.unlink()
        host.system(["systemctl", "daemon-reload"], check=False)
        if previous is not None:
            host.system(["systemctl", "try-restart", UNIT_NAME], check=False)
        raise


@contextlib.contextmanager
def install_lock(host: Host) -> Iterator[None]:
    """One installer at a time."""
    folder = host.path(PREFIX)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".install.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise Refused("another install.sh is running") from None
        yield


def ensure_folder(host: Host, path: Path, mode: int) -> Path:
    real = host.path(path)
    real.mkdir(parents=True, exist_ok=True)
    os.chmod(real, mode)
    host.own_by_root(real)
    return real


def install_unit(host: Host, release: Path) -> bool:
    """The release's unit as /etc/systemd/system/seatwatch.service; True if it changed."""
    unit = host.path(UNIT)
    text = (release / "seatwatch.service").read_text(encoding="utf-8")
    if unit.is_file() and unit.read_text(encoding="utf-8") == text:
        return False
    unit.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(unit, text, 0o644)
    host.own_by_root(unit)
    return True


def link_command(host: Host) -> None:
    link = host.path(BIN_LINK)
    target = str(PREFIX / "current" / "venv" / "bin" / "seatwatch")
    if link.is_symlink() and os.readlink(link) == target:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(f".seatwatch-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, link)


def run_check(host: Host, release: Path) -> tuple[bool, str]:
    """``seatwatch check`` of the new release against the installed settings and credentials."""
    result = subprocess.run(
        [
            str(release / "venv" / "bin" / "seatwatch"),
            "check",
            "--env-file",
            str(host.path(ETC / "seatwatch.env")),
            "--credentials",
            str(host.path(ETC / "credentials")),
            "--unit",
            str(release / "seatwatch.service"),  # the unit it would run under once switched
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
    )
    output = "\n".join("    " + line for line in (result.stdout + result.stderr).strip().splitlines())
    return result.returncode == 0, output


# -- the actions ----------------------------------------------------------------------------------------


def install(host: Host, args: argparse.Namespace) -> int:
    source = Source(Path(args.source).resolve())
    check_systemd(host)
    python = find_python(host, args.python, os.environ.get("PATH", ""), install=True)
    say(f"python: {python.path} (Python {python.version_text})")
    say(f"source: {source.root} at {source.commit} -> seatwatch {source.version}")
    with install_lock(host):
        layout = Layout(host)
        layout.sweep_unfinished()
        if not host.user_exists(USER):
            say(f"user: creating the system user {USER}")
            host.add_system_user(USER, STATE_DIR)
        ensure_folder(host, PREFIX, 0o755)
        ensure_folder(host, PREFIX / "releases", 0o755)
        etc = ensure_folder(host, ETC, 0o755)
        ensure_folder(host, ETC / "credentials", 0o700)
        env_file = etc / "seatwatch.env"
        if not env_file.exists():
            write_atomically(env_file, (source.root / "packaging" / "seatwatch.env").read_text(), 0o600)
            say(f"settings: wrote the template {ETC / 'seatwatch.env'} (edit it)")
        elif env_file.stat().st_mode & 0o777 != 0o600:
            say(f"settings: {ETC / 'seatwatch.env'} made 0600 (systemd reads it as root; it may name hosts)")
            os.chmod(env_file, 0o600)
        host.own_by_root(env_file)

        name = source.release_name
        release = layout.releases / name
        if layout.complete(name):
            say(f"release: {PREFIX}/releases/{name} is already built")
        else:
            with tempfile.TemporaryDirectory(prefix="seatwatch-build-") as work:
                say(f"release: building {PREFIX}/releases/{name} (a clean copy in {work})")
                make_release(python, source, release, Path(work))
        previous = layout.current()
        if previous == name:
            say(f"current: already {name}")
            changed = install_unit(host, release)
            link_command(host)
            if changed:
                host.system(["systemctl", "daemon-reload"])
            return 0

        ok, output = run_check(host, release)
        say(f"check: {'passed' if ok else 'FAILED'}\n{output}")
        if not ok:
            if previous is None:
                say("check: expected on a first install until the settings and credentials are filled in")
            elif args.force:
                say("check: failed, switching anyway (--force)")
            else:
                raise Refused(
                    f"the new release's check failed; current stays at {previous}. Fix the settings, or pass --force"
                )
        say(f"current: {PREFIX}/current -> releases/{name}" + (f" (was {previous})" if previous else ""))
        switch_over(host, layout, name, [*layout.history(), name])
        kept = layout.prune(KEEP_RELEASES)
        say(f"releases kept: {', '.join(kept)}")
    # As root, as the installer itself ran (minimal Debian has no sudo); `seatwatch` reads the unit's files.
    if previous is None and ok:
        say("next: systemctl enable --now seatwatch")
    elif previous is None:
        missing = [n for n in CREDENTIALS if not (host.path(ETC / "credentials") / n).exists()]
        say("next (as root):")
        say(f"  1. edit {ETC}/seatwatch.env; put each secret in {ETC}/credentials/<name> (0600); missing now:")
        say(f"     {', '.join(missing) or 'none'} (the last two only for SEATWATCH_EMAIL_TRANSPORT=resend)")
        say(f"  2. seatwatch check      (reads {ETC}/seatwatch.env and {ETC}/credentials, as the unit does)")
        say("  3. systemctl enable --now seatwatch")
    return 0


def rollback(host: Host) -> int:
    with install_lock(host):
        layout = Layout(host)
        current = layout.current()
        history = layout.history()
        while history and history[-1] == current:
            history.pop()
        earlier = [name for name in history if layout.complete(name) and name != current]
        if current is None or not earlier:
            raise Refused("no earlier release to roll back to")
        target = earlier[-1]
        say(f"current: {PREFIX}/current -> releases/{target} (was {current})")
        switch_over(host, layout, target, history[: len(history) - history[::-1].index(target)])
    return 0


def uninstall(host: Host, purge: bool) -> int:
    if not host.path(PREFIX).exists():
        return _uninstall(host, purge)
    with install_lock(host):
        return _uninstall(host, purge)


def _uninstall(host: Host, purge: bool) -> int:
    unit = host.path(UNIT)
    if unit.exists():
        host.system(["systemctl", "disable", "--now", UNIT_NAME], check=False)
        unit.unlink()
        host.system(["systemctl", "daemon-reload"])
        say(f"removed {UNIT}")
    link = host.path(BIN_LINK)
    if link.is_symlink() and os.readlink(link).startswith(str(PREFIX) + "/"):
        link.unlink()
        say(f"removed {BIN_LINK}")
    prefix = host.path(PREFIX)
    if prefix.exists():
        shutil.rmtree(prefix)
        say(f"removed {PREFIX} (every release)")
    if not purge:
        say(f"kept {ETC} (settings and credentials), {STATE_DIR} and the user {USER}: --purge removes them")
        return 0
    key_prefix = redis_prefix(host.path(ETC / "seatwatch.env"))
    for folder in (ETC, STATE_DIR):
        if host.path(folder).exists():
            shutil.rmtree(host.path(folder))
            say(f"removed {folder}")
    if host.user_exists(USER):
        host.remove_system_user(USER)
        say(f"removed the user {USER}")
    say("left as they are (shared with the web app, or with other daemons; remove them yourself if wanted):")
    say(f"  Redis: every key under {key_prefix}: (queue, lock, breaker, usage, schedule); list them with")
    say(f"    redis-cli -u \"$REDIS_URL\" --scan --pattern '{key_prefix}:*'")
    say("  Postgres: the seatwatch_* tables and functions, their rows (the outbox, per-term states), and the")
    say("    notifications_sent and class_states rows seatwatch wrote (migrations are additive: nothing is dropped)")
    return 0


def redis_prefix(env_file: Path) -> str:
    """SEATWATCH_REDIS_PREFIX as systemd reads the env file (by the daemon's own reader,
    ``daemon/settings/envfile.py`` of this checkout, which runs on 3.8 too), else the default."""
    reader = Path(__file__).resolve().parent.parent / "daemon" / "settings" / "envfile.py"
    spec = importlib.util.spec_from_file_location("seatwatch_envfile", reader)
    if spec is None or spec.loader is None:
        return "seatwatch"
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        values, _ = module.read(env_file)
    except (OSError, UnicodeDecodeError, SyntaxError):
        return "seatwatch"
    return str(values.get("SEATWATCH_REDIS_PREFIX") or "seatwatch")


def which_python(host: Host, args: argparse.Namespace) -> int:
    python = find_python(host, args.python, os.environ.get("PATH", ""), install=False)
    say(f"{python.path} (Python {python.version_text})")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="install.sh", description="Install, upgrade, roll back or remove seatwatch.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--rollback", action="store_true", help="switch back to the release before the current one")
    action.add_argument("--uninstall", action="store_true", help="remove the unit and every release")
    action.add_argument("--purge", action="store_true", help="--uninstall, and settings, state and the user too")
    action.add_argument("--which-python", action="store_true", help="print the Python the install would use")
    parser.add_argument("--python", metavar="PATH", help="build with this interpreter (3.11 or newer)")
    parser.add_argument("--force", action="store_true", help="switch even when the new release's check fails")
    parser.add_argument("--root", metavar="DIR", help="stage into DIR, recording system commands instead")
    parser.add_argument("--source", default=str(Path(__file__).resolve().parent.parent), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.root).resolve() if args.root else None
    host = Host(root)
    if root is None and os.geteuid() != 0 and not args.which_python:
        say("install.sh: run as root (or stage into a folder with --root DIR)")
        return 1

    # Releases must be readable by the seatwatch user whatever root's umask is; secrets get their modes explicitly.
    os.umask(0o022)

    def interrupted(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the cleanup of a half-built release

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    try:
        if args.which_python:
            return which_python(host, args)
        if args.rollback:
            return rollback(host)
        if args.uninstall or args.purge:
            return uninstall(host, purge=args.purge)
        return install(host, args)
    except Refused as exc:
        say(f"install.sh: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
