"""What is running: the release and the commit it was built from, e.g. ``0.1.0+g1a2b3c4d5e6f``.

The installer builds each release's wheel with the commit in the version's local part (PEP 440), so the
installed distribution's metadata carries it. A checkout run in place (``pip install -e``, the tests) has
only the plain version in its metadata; there the commit comes from git, when git and the checkout are there.
The release number itself is written once, in ``pyproject.toml`` (the installer stamps the commit there).
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from importlib import metadata
from pathlib import Path


@functools.cache
def version() -> str:
    """The version with its commit when known (``0.1.0+g1a2b3c4d5e6f``), else the plain version."""
    try:
        installed = metadata.version("seatwatch")
    except metadata.PackageNotFoundError:  # run from a copy of the tree that was never installed
        installed = "0+unknown"
    if "+" in installed:
        return installed
    commit = _git_commit(Path(__file__).resolve().parent.parent)
    return f"{installed}+g{commit}" if commit else installed


def _git_commit(checkout: Path) -> str | None:
    """The short commit of ``checkout`` (with ``.dirty`` for local changes), or None outside a checkout."""
    if not (checkout / ".git").exists():  # a worktree's .git is a file
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{head}.dirty" if changed else head
    return None
