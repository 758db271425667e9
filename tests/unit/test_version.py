"""The version names its commit: from the wheel's metadata when installed, from git in a checkout."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from daemon import __version__
from daemon.version import _git_commit, version

if TYPE_CHECKING:
    from pathlib import Path


def test_version_in_a_checkout_carries_its_commit() -> None:
    """Run from this checkout, the version is the release plus +g and the short commit (.dirty with local edits)."""
    assert re.fullmatch(rf"{re.escape(__version__)}\+g[0-9a-f]{{12}}(\.dirty)?", version()), version()


def test_no_commit_outside_a_checkout(tmp_path: Path) -> None:
    """A folder that is not a git checkout has no commit (the plain version is used)."""
    assert _git_commit(tmp_path) is None
