"""The version names its commit: from the wheel's metadata when installed, from git in a checkout."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from daemon.version import _git_commit, version

ROOT = Path(__file__).resolve().parents[2]


def test_version_in_a_checkout_carries_its_commit() -> None:
    """Run from this checkout, the version is the release plus +g and the short commit (.dirty with local edits)."""
    release = metadata.version("seatwatch")
    assert re.fullmatch(rf"{re.escape(release)}\+g[0-9a-f]{{12}}(\.dirty)?", version()), version()


def test_the_release_number_is_written_once() -> None:
    """pyproject.toml holds the release number; no module repeats it (the installed metadata is read)."""
    release = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert metadata.version("seatwatch") == release
    hits = [p for p in (ROOT / "daemon").rglob("*.py") if f'"{release}"' in p.read_text(encoding="utf-8")]
    assert hits == []


def test_no_commit_outside_a_checkout(tmp_path: Path) -> None:
    """A folder that is not a git checkout has no commit (the plain version is used)."""
    assert _git_commit(tmp_path) is None
