"""The dependency locks: every pin hashed, pyproject's ranges honoured, and binary wheels for the VPS images.

The last test asks the package registry (through pip's cache) whether every locked file exists as a binary
wheel for CPython 3.11 and 3.12 on manylinux x86_64 and aarch64, so a dependency without an arm64 wheel is
caught here, not on the VPS. An unreachable registry fails it with pip's own words; it never skips.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "packaging"
# The oldest glibc of the supported images: Oracle Linux 9 (2.34); Ubuntu 22.04 has 2.35, Debian 12 2.36.
GLIBC_MINOR = 34


def pins(lock: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of every requirement in ``lock``."""
    found: dict[str, tuple[str, int]] = {}
    for entry in re.split(r"\n(?=\S)", lock.read_text()):
        if not entry.strip() or entry.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;\\]+)", entry)
        assert match, f"{lock.name}: not an exact pin: {entry.splitlines()[0]}"
        found[match.group(1).lower().replace("_", "-")] = (match.group(2), entry.count("--hash=sha256:"))
    return found


def test_every_locked_requirement_is_pinned_with_hashes() -> None:
    """Each lock pins every package exactly, each with at least one sha256 hash (pip --require-hashes needs it)."""
    for name in ("requirements.lock", "requirements-build.lock", "requirements-dev.lock"):
        locked = pins(LOCKS / name)
        assert locked, name
        unhashed = [package for package, (_, hashes) in locked.items() if hashes == 0]
        assert unhashed == [], f"{name}: no hash for {unhashed}"


def test_locks_honour_pyproject_and_agree_with_each_other() -> None:
    """Every dependency of pyproject (runtime, build backend) is locked within its range, the same in every lock."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime, build, dev = (
        pins(LOCKS / n) for n in ("requirements.lock", "requirements-build.lock", "requirements-dev.lock")
    )
    for text in project["project"]["dependencies"]:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in runtime, f"{name} is a dependency but not in requirements.lock: run packaging/lock"
        assert requirement.specifier.contains(runtime[name][0], prereleases=True), (name, runtime[name])
    for text in project["build-system"]["requires"]:
        requirement = Requirement(text)
        assert requirement.specifier.contains(build[requirement.name][0]), (requirement, build)
    for name, (version, _) in {**runtime, **build}.items():
        assert dev.get(name, (None,))[0] == version, f"requirements-dev.lock has {name} {dev.get(name)}, not {version}"


def download(lock_without_markers: Path, arch: str, python: str, folder: Path) -> subprocess.CompletedProcess[str]:
    platforms = [f"--platform=manylinux_2_{minor}_{arch}" for minor in range(17, GLIBC_MINOR + 1)]
    return subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", *platforms),
            *(f"--python-version={python}", "--implementation=cp", "--timeout=20", "--retries=1"),
            *("-d", str(folder / f"{arch}-{python}"), "-r", str(lock_without_markers)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_runtime_lock_has_binary_wheels_for_the_vps_images(tmp_path: Path) -> None:
    """Every file of requirements.lock exists as a wheel for CPython 3.11 and 3.12 on manylinux x86_64 and aarch64
    (markers dropped, so a package locked only for old Pythons is checked too)."""
    text = (LOCKS / "requirements.lock").read_text()
    lock = tmp_path / "requirements-all.lock"
    lock.write_text(re.sub(r" ;[^\\\n]*", "", text))
    expected = len(pins(LOCKS / "requirements.lock"))
    targets = [(arch, python) for arch in ("x86_64", "aarch64") for python in ("3.11", "3.12")]
    with ThreadPoolExecutor(len(targets)) as pool:
        results = list(pool.map(lambda target: download(lock, target[0], target[1], tmp_path), targets))
    for (arch, python), result in zip(targets, results, strict=True):
        assert result.returncode == 0, (
            f"the lock does not resolve to binary wheels for CPython {python} on manylinux {arch} "
            f"(or the registry is unreachable):\n{result.stderr[-3000:]}"
        )
        wheels = list((tmp_path / f"{arch}-{python}").glob("*.whl"))
        assert len(wheels) == expected, (arch, python, sorted(w.name for w in wheels))
