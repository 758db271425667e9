"""packaging/installer.py for the tests: loaded as a module (its folder is not a package), and run for real."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "packaging" / "installer.py"


def load_installer() -> Any:
    """The installer as a module, under a name that cannot clash with PyPI's ``packaging``."""
    spec = importlib.util.spec_from_file_location("seatwatch_installer", INSTALLER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_installer(
    *args: str, env: dict[str, str], python: str = sys.executable, timeout_s: float = 240
) -> subprocess.CompletedProcess[str]:
    """``installer.py ARGS`` to completion, stdout and stderr together in ``stdout``."""
    return subprocess.run(
        [python, str(INSTALLER), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def recorded_calls(root: Path) -> list[list[str]]:
    """The system commands a staged run recorded, in order."""
    calls = root / ".staging" / "calls.jsonl"
    if not calls.exists():
        return []
    return [json.loads(line)["argv"] for line in calls.read_text().splitlines()]


def stand_in_python(folder: Path, name: str, version: tuple[int, int, int], *, venv: bool = True) -> Path:
    """An executable ``name`` in ``folder`` that answers the installer's probe as that Python would."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    answer = json.dumps({"version": list(version), "venv": venv})
    path.write_text(f"#!/bin/sh\necho '{answer}'\n")
    path.chmod(0o755)
    return path
