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
    from pathlib import Path

installer: Any = load_installer()


def test_installer_parses_as_python_3_8() -> None:
    """The host's python3 may be 3.8 (it only has to run the installer): no newer syntax in the file."""
    ast.parse(INSTALLER.read_text(), feature_version=(3, 8))


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
