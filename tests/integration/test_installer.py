"""The installer run for real into a staging root: releases, the check before the switch, rollback, removal.

``--root DIR`` does everything inside DIR (the releases are real venvs built from a real git checkout,
``seatwatch check`` runs against real Redis, Postgres and a scraper stub on loopback) and records the system
commands (useradd, systemctl, apt-get, dnf) instead of running them. pip reads a wheelhouse of exactly the
locked files, so the two builds here do not wait on the registry.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.installer import recorded_calls, run_installer, stand_in_python

if TYPE_CHECKING:
    from tests.support.stubs import ScraperStub

ROOT = Path(__file__).resolve().parents[2]
CANARY = "daemon/canary_removed_in_v2.py"
USERADD = [
    "useradd",
    "--system",
    "--user-group",
    "--home-dir",
    "/var/lib/seatwatch",
    "--no-create-home",
    "--shell",
    "/usr/sbin/nologin",
    "seatwatch",
]
RELOAD = ["systemctl", "daemon-reload"]
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--quiet", "--timeout", "20", "--retries", "1"]
RESTART = ["systemctl", "try-restart", "seatwatch.service"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every file of the runtime and build locks, checked against its hash, from pip's cache or the registry."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    locks = ["-r", str(ROOT / "packaging/requirements.lock"), "-r", str(ROOT / "packaging/requirements-build.lock")]
    result = subprocess.run(
        [*PIP_DOWNLOAD, "--require-hashes", "--no-deps", "--only-binary=:all:", "-d", str(folder), *locks],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"cannot fetch the locked wheels (is the registry reachable?):\n{result.stderr}"
    return folder


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A git checkout of this tree (its tracked files as they are now) plus a module that v2 deletes."""
    repo = tmp_path / "src"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True)
    for name in tracked.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / CANARY).write_text('"""Shipped by v1 only: an upgrade must not keep it."""\n')
    git(repo, "init", "--quiet")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "v1")
    return repo


def installer_env(wheelhouse: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "SEATWATCH_"))}
    env.update({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return env


def configure(root: Path, *, database_url: str, redis_url: str, scraper_url: str, outbox: Path) -> None:
    """Settings and credentials as an operator would leave them (the env file too open, on purpose)."""
    etc = root / "etc" / "seatwatch"
    (etc / "credentials").mkdir(parents=True)
    (etc / "seatwatch.env").write_text(
        "# staged settings\n"
        f"SCRAPER_URL={scraper_url}\n"
        "SEATWATCH_CRON=0,30 * * * *\n"
        "SEATWATCH_EMAIL_TRANSPORT=file\n"
        f"SEATWATCH_OUTBOX_DIR={outbox}\n"
    )
    (etc / "seatwatch.env").chmod(0o644)
    secrets = {"database_url": database_url, "redis_url": redis_url, "scraper_secret_token": "tok-staged-1f2e"}
    for name, value in secrets.items():
        (etc / "credentials" / name).write_text(value + "\n")
        (etc / "credentials" / name).chmod(0o600)


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path outside the venvs: (kind or link target, mode, owner)."""
    found: dict[str, tuple[str, int, int]] = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if "/venv/" in f"/{relative}/" and not relative.endswith("/venv"):
            continue
        info = path.lstat()
        kind = f"-> {os.readlink(path)}" if path.is_symlink() else ("dir" if path.is_dir() else "file")
        found[relative] = (kind, stat.S_IMODE(info.st_mode), info.st_uid)
    return found


def site_packages(release: Path) -> Path:
    (found,) = release.glob("venv/lib/python3.*/site-packages")
    return found


@pytest.mark.slow
def test_install_reinstall_upgrade_rollback_uninstall_purge(
    tmp_path: Path, source: Path, wheelhouse: Path, database_url: str, redis_url: str, scraper: ScraperStub
) -> None:
    """The whole life of an install in a staging root: files, modes, owners and the systemctl calls each step makes."""
    root = tmp_path / "root"
    configure(root, database_url=database_url, redis_url=redis_url, scraper_url=scraper.url, outbox=tmp_path / "out")
    env = installer_env(wheelhouse)
    stage = ["--root", str(root), "--source", str(source)]
    v1 = f"0.1.0-{git(source, 'rev-parse', '--short=12', 'HEAD')}"
    releases = root / "opt/seatwatch/releases"

    # 1. First install: a release with its own venv, checked against the staged settings, then current.
    first = run_installer(*stage, env=env)
    assert first.returncode == 0, first.stdout
    assert "check: passed" in first.stdout
    assert "settings: /etc/seatwatch/seatwatch.env made 0600" in first.stdout
    assert os.readlink(root / "opt/seatwatch/current") == f"releases/{v1}"
    assert recorded_calls(root) == [USERADD, RELOAD, RESTART]
    version = subprocess.run(
        [str(releases / v1 / "venv/bin/seatwatch"), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert version == f"seatwatch 0.1.0+g{v1.split('-', 1)[1]}"
    info = json.loads((releases / v1 / "RELEASE.json").read_text())
    assert info["version"] == version.split()[1]
    assert (site_packages(releases / v1) / CANARY).is_file()
    assert (root / "etc/systemd/system/seatwatch.service").read_text() == (source / "seatwatch.service").read_text()
    tree = snapshot(root)
    expected = {
        "etc/seatwatch": ("dir", 0o755, 0),
        "etc/seatwatch/credentials": ("dir", 0o700, 0),
        "etc/seatwatch/seatwatch.env": ("file", 0o600, 0),
        "etc/systemd/system/seatwatch.service": ("file", 0o644, 0),
        "opt/seatwatch": ("dir", 0o755, 0),
        "opt/seatwatch/current": (f"-> releases/{v1}", 0o777, 0),
        "opt/seatwatch/releases": ("dir", 0o755, 0),
        "usr/local/bin/seatwatch": ("-> /opt/seatwatch/current/venv/bin/seatwatch", 0o777, 0),
    }
    assert {path: tree[path] for path in expected} == expected
    assert (root / "etc/passwd").read_text().startswith("seatwatch:")

    # 2. The same again: nothing rebuilt, nothing switched, no command, not one file changed.
    again = run_installer(*stage, env=env)
    assert again.returncode == 0, again.stdout
    assert f"current: already {v1}" in again.stdout
    assert recorded_calls(root) == [USERADD, RELOAD, RESTART]
    assert snapshot(root) == tree

    # 3. v2 deletes a module: the upgrade ships without it, while v1 keeps it for a rollback.
    git(source, "rm", "--quiet", CANARY)
    git(source, "commit", "--quiet", "-m", "v2")
    v2 = f"0.1.0-{git(source, 'rev-parse', '--short=12', 'HEAD')}"
    upgrade = run_installer(*stage, env=env)
    assert upgrade.returncode == 0, upgrade.stdout
    assert os.readlink(root / "opt/seatwatch/current") == f"releases/{v2}"
    assert not (site_packages(releases / v2) / CANARY).exists()
    assert (site_packages(releases / v1) / CANARY).is_file()
    assert json.loads((root / "opt/seatwatch/history.json").read_text())["history"] == [v1, v2]
    assert recorded_calls(root)[3:] == [RELOAD, RESTART]

    # 4. Rollback: current goes back to v1, the unit is reinstalled from it and the service restarted.
    back = run_installer("--rollback", "--root", str(root), env=env)
    assert back.returncode == 0, back.stdout
    assert os.readlink(root / "opt/seatwatch/current") == f"releases/{v1}"
    assert recorded_calls(root)[5:] == [RELOAD, RESTART]
    nothing_left = run_installer("--rollback", "--root", str(root), env=env)
    assert nothing_left.returncode == 1
    assert "no earlier release to roll back to" in nothing_left.stdout

    # 5. A release whose check fails (Redis unreachable) is not switched to.
    credential = root / "etc/seatwatch/credentials/redis_url"
    credential.write_text("redis://127.0.0.1:9/0\n")
    refused = run_installer(*stage, env=env)
    assert refused.returncode == 1, refused.stdout
    assert "FAIL redis" in refused.stdout
    assert f"check failed; current stays at {v1}" in refused.stdout
    assert os.readlink(root / "opt/seatwatch/current") == f"releases/{v1}"
    assert len(recorded_calls(root)) == 7

    # 6. Uninstall: the unit, the command and every release go; settings, state and the user stay.
    removed = run_installer("--uninstall", "--root", str(root), env=env)
    assert removed.returncode == 0, removed.stdout
    assert recorded_calls(root)[7:] == [["systemctl", "disable", "--now", "seatwatch.service"], RELOAD]
    assert not (root / "opt/seatwatch").exists()
    assert not (root / "etc/systemd/system/seatwatch.service").exists()
    assert not (root / "usr/local/bin/seatwatch").is_symlink()
    assert (root / "etc/seatwatch/seatwatch.env").is_file()
    assert (root / "etc/seatwatch/credentials/database_url").is_file()

    # 7. Purge: the settings, the credentials and the user go too.
    purged = run_installer("--purge", "--root", str(root), env=env)
    assert purged.returncode == 0, purged.stdout
    assert recorded_calls(root)[9:] == [["userdel", "seatwatch"]]
    assert not (root / "etc/seatwatch").exists()
    assert "seatwatch:" not in (root / "etc/passwd").read_text()
    # What purge cannot remove is named: the deployment's Redis keys and its Postgres objects.
    assert "Redis: every key under seatwatch: (queue, lock, breaker, usage, schedule)" in purged.stdout
    assert "--scan --pattern 'seatwatch:*'" in purged.stdout
    assert "Postgres: the seatwatch_* tables and functions" in purged.stdout


def test_first_install_without_settings_switches_and_says_what_to_fill_in(tmp_path: Path, source: Path) -> None:
    """A release left unfinished by a killed run is swept; a first install switches even though its check fails (no
    settings yet), writes the env template 0600, and names the missing credentials and a check that works."""
    root = tmp_path / "root"
    unfinished = root / "opt/seatwatch/releases/0.1.0-killedhalfway"
    (unfinished / "venv/bin").mkdir(parents=True)
    # A finished release of this checkout, whose check fails as a real one does without settings: no build needed.
    done = root / f"opt/seatwatch/releases/0.1.0-{git(source, 'rev-parse', '--short=12', 'HEAD')}"
    (done / "venv/bin").mkdir(parents=True)
    (done / "venv/bin/seatwatch").write_text("#!/bin/sh\necho 'seatwatch: invalid configuration:' >&2\nexit 78\n")
    (done / "venv/bin/seatwatch").chmod(0o755)
    shutil.copy2(source / "seatwatch.service", done / "seatwatch.service")
    (done / "RELEASE.json").write_text("{}")
    result = run_installer("--root", str(root), "--source", str(source), env=dict(os.environ))
    assert result.returncode == 0, result.stdout
    assert "removing the unfinished release 0.1.0-killedhalfway" in result.stdout
    assert not unfinished.exists()
    assert "check: FAILED" in result.stdout
    assert "check: expected on a first install" in result.stdout
    assert os.readlink(root / "opt/seatwatch/current") == f"releases/{done.name}"
    env_file = root / "etc/seatwatch/seatwatch.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert env_file.read_text() == (source / "packaging/seatwatch.env").read_text()
    assert "database_url, redis_url, scraper_secret_token, resend_api_key, supabase_service_role_key" in result.stdout
    assert (
        "  2. seatwatch check      (reads /etc/seatwatch/seatwatch.env and /etc/seatwatch/credentials" in result.stdout
    )
    assert "sudo" not in result.stdout  # minimal Debian has none; the installer runs as root anyway


def broken_python(folder: Path, *, sleep_s: float = 0) -> Path:
    """A Python 3.12 that passes the probe but leaves a half-made venv behind (and fails, or hangs first)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "python3.12"
    answer = json.dumps({"version": [3, 12, 3], "venv": True})
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-I" ]; then echo \'{answer}\'; exit 0; fi\n'
        'mkdir -p "$3/bin" && touch "$3/bin/python"\n'
        f"[ {sleep_s} = 0 ] || exec sleep {sleep_s}\n"
        "exit 1\n"
    )
    path.chmod(0o755)
    return path


def test_a_release_that_fails_half_way_is_removed(tmp_path: Path, source: Path) -> None:
    """A venv that fails half made takes its release folder with it; nothing becomes current."""
    root = tmp_path / "root"
    python = broken_python(tmp_path / "bin")
    result = run_installer("--root", str(root), "--source", str(source), "--python", str(python), env=dict(os.environ))
    assert result.returncode == 1, result.stdout
    assert "install.sh: creating the release's venv failed" in result.stdout
    assert list((root / "opt/seatwatch/releases").iterdir()) == []
    assert not (root / "opt/seatwatch/current").is_symlink()


def test_an_install_stopped_by_sigterm_removes_its_half_made_release(tmp_path: Path, source: Path) -> None:
    """SIGTERM while the venv is being made unwinds through the cleanup: no half-made release is left."""
    root = tmp_path / "root"
    python = broken_python(tmp_path / "bin", sleep_s=60)
    command = [sys.executable, str(ROOT / "packaging/installer.py"), "--root", str(root), "--source", str(source)]
    process = subprocess.Popen(
        [*command, "--python", str(python)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    releases = root / "opt/seatwatch/releases"
    deadline = time.monotonic() + 30
    while not list(releases.glob("*/venv/bin/python")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(releases.glob("*/venv/bin/python")), "the venv was never started"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert list(releases.iterdir()) == []


# -- finding a Python -----------------------------------------------------------------------------------------


def discover(tmp_path: Path, *args: str, os_release: str = "") -> subprocess.CompletedProcess[str]:
    root = tmp_path / "root"
    if os_release:
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc/os-release").write_text(os_release)
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{tmp_path / 'more'}", "HOME": str(tmp_path)}
    return run_installer("--which-python", "--root", str(root), *args, env=env)


UBUNTU_2204 = 'PRETTY_NAME="Ubuntu 22.04.4 LTS"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\n'
ORACLE_9 = 'PRETTY_NAME="Oracle Linux Server 9.4"\nID="ol"\nID_LIKE="fedora"\nVERSION_ID="9.4"\n'
DEBIAN_12 = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'


def test_newest_python_of_311_or_later_is_chosen(tmp_path: Path) -> None:
    """With 3.9, 3.10, 3.11 and 3.12 on PATH (python3 being 3.10), the newest, 3.12, is chosen."""
    for name, version in [("python3.9", (3, 9, 18)), ("python3.10", (3, 10, 12)), ("python3", (3, 10, 12))]:
        stand_in_python(tmp_path / "bin", name, version)
    stand_in_python(tmp_path / "more", "python3.11", (3, 11, 9))
    newest = stand_in_python(tmp_path / "more", "python3.12", (3, 12, 3))
    result = discover(tmp_path)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == f"{newest} (Python 3.12.3)"


def test_a_python_without_venv_is_passed_over(tmp_path: Path) -> None:
    """A 3.12 that cannot make a venv (python3.12-venv missing) loses to a 3.11 that can."""
    stand_in_python(tmp_path / "bin", "python3.12", (3, 12, 3), venv=False)
    usable = stand_in_python(tmp_path / "bin", "python3.11", (3, 11, 2))
    result = discover(tmp_path)
    assert result.stdout.strip() == f"{usable} (Python 3.11.2)"


@pytest.mark.parametrize(
    ("os_release", "interpreters", "advice"),
    [
        (
            UBUNTU_2204,
            [("python3", (3, 10, 12), True), ("python3.10", (3, 10, 12), True)],
            "python3.11 python3.11-venv",
        ),
        (ORACLE_9, [("python3", (3, 9, 18), True), ("python3.9", (3, 9, 18), True)], "dnf install -y python3.11"),
        (DEBIAN_12, [("python3", (3, 11, 2), False), ("python3.11", (3, 11, 2), False)], "python3.11-venv"),
    ],
    ids=["ubuntu-22.04", "oracle-linux-9", "debian-12-without-venv"],
)
def test_refusal_names_the_distribution_package(
    tmp_path: Path, os_release: str, interpreters: list[tuple[str, tuple[int, int, int], bool]], advice: str
) -> None:
    """Without a usable Python >= 3.11 the installer refuses, listing what it found and the package that fixes it."""
    for name, version, venv in interpreters:
        stand_in_python(tmp_path / "bin", name, version, venv=venv)
    result = discover(tmp_path, os_release=os_release)
    assert result.returncode == 1
    assert "no Python 3.11 or newer with venv on PATH" in result.stdout
    assert f"python3 ({'.'.join(map(str, interpreters[0][1]))}" in result.stdout
    assert advice in result.stdout


def test_install_brings_python_from_the_distribution_and_refuses_cleanly_when_it_does_not_appear(
    tmp_path: Path, source: Path
) -> None:
    """The install itself runs the distribution's package install (recorded when staged), then refuses, building
    nothing, when no usable Python shows up."""
    stand_in_python(tmp_path / "bin", "python3", (3, 10, 12))
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(UBUNTU_2204)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools/git").symlink_to(shutil.which("git") or "/usr/bin/git")
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{tmp_path / 'tools'}", "HOME": str(tmp_path)}
    result = run_installer("--root", str(root), "--source", str(source), env=env)
    assert result.returncode == 1, result.stdout
    apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "--no-install-recommends"]
    assert recorded_calls(root) == [["apt-get", "update"], [*apt, "python3.11", "python3.11-venv"]]
    assert "still no Python 3.11 or newer with venv" in result.stdout
    assert not (root / "opt").exists()


def test_unknown_distribution_is_refused_with_the_way_out(tmp_path: Path) -> None:
    """On a system the installer knows no package for, it says to install Python 3.11+ and pass --python."""
    stand_in_python(tmp_path / "bin", "python3", (3, 8, 10))
    result = discover(tmp_path, os_release='PRETTY_NAME="Alpine Linux v3.19"\nID=alpine\nVERSION_ID=3.19.1\n')
    assert result.returncode == 1
    assert "Alpine Linux v3.19 has no known package for it: install Python 3.11+ and pass --python PATH" in (
        result.stdout
    )


@pytest.mark.parametrize(
    ("version", "venv", "message"),
    [
        ((3, 10, 12), True, "is Python 3.10.12; seatwatch needs 3.11 or newer"),
        ((3, 12, 3), False, "cannot make a virtual environment (no venv/ensurepip): install python3.12-venv"),
    ],
)
def test_explicit_python_must_be_usable(
    tmp_path: Path, version: tuple[int, int, int], venv: bool, message: str
) -> None:
    """--python PATH is taken as given: too old, or without venv, is refused rather than replaced by another."""
    stand_in_python(tmp_path / "bin", "python3.13", (3, 13, 0))
    chosen = stand_in_python(tmp_path / "elsewhere", "python", version, venv=venv)
    result = discover(tmp_path, "--python", str(chosen))
    assert result.returncode == 1
    assert message in result.stdout


def test_explicit_python_is_used(tmp_path: Path) -> None:
    """--python PATH wins over a newer interpreter on PATH."""
    stand_in_python(tmp_path / "bin", "python3.13", (3, 13, 0))
    chosen = stand_in_python(tmp_path / "elsewhere", "python", (3, 11, 4))
    result = discover(tmp_path, "--python", str(chosen))
    assert result.stdout.strip() == f"{chosen} (Python 3.11.4)"
