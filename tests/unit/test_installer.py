"""The installer's bookkeeping, on folders made here: which releases are kept, where a rollback goes, and that
the file stays readable by the older Pythons it runs on."""

from __future__ import annotations

import ast
import json
import os
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.installer import INSTALLER, load_installer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

installer: Any = load_installer()


def test_installer_parses_as_python_3_8() -> None:
    """The host's python3 may be 3.8 (it only has to run the installer): no newer syntax in the file."""
    ast.parse(INSTALLER.read_text(), feature_version=(3, 8))
    # The env-file reader the installer borrows from the checkout (purge names the Redis prefix with it).
    ast.parse((INSTALLER.parents[1] / "daemon" / "settings" / "envfile.py").read_text(), feature_version=(3, 8))


def make_release(root: Path, name: str) -> None:
    release = root / "opt/seatwatch/releases" / name
    release.mkdir(parents=True)
    (release / "seatwatch.service").write_text(f"# unit of {name}\n")
    (release / "RELEASE.json").write_text(json.dumps({"version": name}))


def activate(layout: Any, *names: str) -> None:
    for name in names:
        layout.switch(name)
        layout.save_history([*layout.history(), name])


def test_prune_keeps_the_last_three_that_were_current(tmp_path: Path) -> None:
    """After five upgrades the current release and the two before it stay; older and never-current ones go."""
    layout = installer.Layout(installer.Host(tmp_path))
    for name in ("r1", "r2", "r3", "r4", "r5", "never-current"):
        make_release(tmp_path, name)
    activate(layout, "r1", "r2", "r3", "r4", "r5")
    assert layout.prune(3) == ["r5", "r4", "r3"]
    assert sorted(p.name for p in layout.releases.iterdir()) == ["r3", "r4", "r5"]
    assert layout.history() == ["r3", "r4", "r5"]


def test_prune_never_removes_the_current_release(tmp_path: Path) -> None:
    """A current release missing from the history (installed by hand) is kept anyway."""
    layout = installer.Layout(installer.Host(tmp_path))
    for name in ("r1", "r2", "r3", "r4"):
        make_release(tmp_path, name)
    activate(layout, "r2", "r3", "r4")
    layout.switch("r1")
    assert "r1" in layout.prune(3)
    assert (layout.releases / "r1").is_dir()


def test_rollbacks_walk_back_through_the_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each rollback goes one release further back, installs that release's unit, and stops at the oldest."""
    for name in ("r1", "r2", "r3"):
        make_release(tmp_path, name)
    layout = installer.Layout(installer.Host(tmp_path))
    activate(layout, "r1", "r2", "r3")
    assert installer.main(["--rollback", "--root", str(tmp_path)]) == 0
    assert os.readlink(layout.current_link) == "releases/r2"
    assert (tmp_path / "etc/systemd/system/seatwatch.service").read_text() == "# unit of r2\n"
    assert installer.main(["--rollback", "--root", str(tmp_path)]) == 0
    assert os.readlink(layout.current_link) == "releases/r1"
    assert installer.main(["--rollback", "--root", str(tmp_path)]) == 1
    assert "no earlier release to roll back to" in capsys.readouterr().out
    assert os.readlink(layout.current_link) == "releases/r1"


@pytest.mark.parametrize(
    ("os_release", "expected"),
    [
        ({"ID": "ubuntu", "VERSION_ID": "22.04"}, ["python3.11", "python3.11-venv"]),
        ({"ID": "ubuntu", "VERSION_ID": "24.04"}, ["python3", "python3-venv"]),
        ({"ID": "debian", "VERSION_ID": "12"}, ["python3", "python3-venv"]),
        ({"ID": "ol", "ID_LIKE": "fedora", "VERSION_ID": "9.4"}, ["python3.11"]),
        ({"ID": "rocky", "ID_LIKE": "rhel centos fedora", "VERSION_ID": "9.3"}, ["python3.11"]),
    ],
)
def test_distribution_packages(os_release: dict[str, str], expected: list[str]) -> None:
    """The supported images get their distribution's own Python >= 3.11 package."""
    commands = installer.distribution_packages(os_release, [])
    assert commands[-1][-len(expected) :] == expected


def test_no_package_for_old_or_unknown_distributions() -> None:
    """Ubuntu 20.04 or Alpine: no known package, so the installer refuses instead of guessing."""
    assert installer.distribution_packages({"ID": "ubuntu", "VERSION_ID": "20.04"}, []) is None
    assert installer.distribution_packages({"ID": "alpine", "VERSION_ID": "3.19.1"}, []) is None


class FailingHost:
    """A staging host whose systemctl fails at one command (the restart of a release that does not start)."""

    def __init__(self, root: Path, fail: list[str] | None = None) -> None:
        self.inner = installer.Host(root)
        self.fail = fail
        self.calls: list[list[str]] = []
        self.signals_seen: list[tuple[object, object]] = []
        self.staging = True

    def path(self, path: Path) -> Path:
        found: Path = self.inner.path(path)
        return found

    def own_by_root(self, path: Path) -> None:
        return None

    def system(self, argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> None:
        import signal

        self.calls.append(list(argv))
        self.signals_seen.append((signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGPIPE)))
        if argv == self.fail and check:
            raise installer.Refused(f"{argv[0]} failed with exit status 1")


@pytest.fixture
def signals_restored() -> Iterator[None]:
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_switch_whose_restart_fails_is_rolled_back_whole(tmp_path: Path, signals_restored: None) -> None:
    """current, the unit, the service and the history all go back to the previous release when the restart fails."""
    for name in ("r1", "r2"):
        make_release(tmp_path, name)
    host = FailingHost(tmp_path, fail=["systemctl", "try-restart", "seatwatch.service"])
    layout = installer.Layout(host)
    activate(layout, "r1")
    installer.install_unit(host, layout.releases / "r1")
    with pytest.raises(installer.Refused):
        installer.switch_over(host, layout, "r2", [*layout.history(), "r2"])
    assert layout.current() == "r1"
    assert layout.history() == ["r1"]
    assert (tmp_path / "etc/systemd/system/seatwatch.service").read_text() == "# unit of r1\n"
    assert host.calls[-2:] == [["systemctl", "daemon-reload"], ["systemctl", "try-restart", "seatwatch.service"]]
    assert len(host.calls) == 4  # reload, restart (failed); reload, restart of r1


def test_a_switch_ignores_hangup_and_broken_pipes_from_the_switch_on(tmp_path: Path, signals_restored: None) -> None:
    """SIGHUP and SIGPIPE are ignored while systemctl runs, and a closed stdout does not stop the switch."""
    import signal
    import sys

    make_release(tmp_path, "r1")
    make_release(tmp_path, "r2")
    host = FailingHost(tmp_path)
    layout = installer.Layout(host)
    activate(layout, "r1")

    class Gone:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    saved_out = os.dup(1), os.dup(2)
    real_stdout = sys.stdout
    try:
        sys.stdout = Gone()
        installer.say("the terminal is gone")  # swallowed: stdout now goes to /dev/null
        sys.stdout = real_stdout
        installer.switch_over(host, layout, "r2", [*layout.history(), "r2"])
    finally:
        sys.stdout = real_stdout
        os.dup2(saved_out[0], 1)
        os.dup2(saved_out[1], 2)
    assert layout.current() == "r2"
    assert layout.history() == ["r1", "r2"]
    assert host.signals_seen == [(signal.SIG_IGN, signal.SIG_IGN)] * 2


def test_systemd_older_than_249_is_refused_saying_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd 247 (Debian 11) is refused with the reason; 252 is accepted and said."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl = bin_dir / "systemctl"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    host = installer.Host(tmp_path / "root")
    systemctl.write_text("#!/bin/sh\necho 'systemd 247 (247.3-7+deb11u4)'\necho '+PAM +AUDIT'\n")
    systemctl.chmod(0o755)
    with pytest.raises(installer.Refused, match=r"systemd 247 is too old: the unit needs 249 or newer"):
        installer.check_systemd(host)
    systemctl.write_text("#!/bin/sh\necho 'systemd 252 (252.22-1~deb12u1)'\n")
    installer.check_systemd(host)


def test_purge_names_the_redis_prefix_the_env_file_sets(tmp_path: Path) -> None:
    """The prefix purge names is read by the daemon's own env-file reader (quotes and comments as systemd)."""
    env_file = tmp_path / "seatwatch.env"
    env_file.write_text("# settings\nSEATWATCH_REDIS_PREFIX='prod-a'  \nSEATWATCH_CRON=0,30 * * * *\n")
    assert installer.redis_prefix(env_file) == "prod-a"
    assert installer.redis_prefix(tmp_path / "absent.env") == "seatwatch"


def test_a_second_installer_at_the_same_time_is_refused(tmp_path: Path) -> None:
    """While one run holds the lock, another (install, rollback or uninstall) is refused, not interleaved."""
    host = installer.Host(tmp_path)
    with installer.install_lock(host):
        with pytest.raises(installer.Refused, match=r"another install\.sh is running"), installer.install_lock(host):
            pass
        with pytest.raises(installer.Refused, match=r"another install\.sh is running"):
            installer.uninstall(host, purge=False)
    with installer.install_lock(host):
        pass  # free again once the first run ends
