"""What ships: the wheel carries the Lua and SQL files; the unit file and Caddyfile say what operators rely on."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from daemon.errors import Exit
from daemon.primitives.scripts import SCRIPTS, source
from daemon.store.migrations import migrations

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_lua_sql_and_entry_point(tmp_path: Path) -> None:
    """The built wheel holds every Lua script and library, every migration, py.typed and the console script."""
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("seatwatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {p.name for p in (ROOT / "daemon" / "primitives" / "lua").glob("*.lua")}
    assert {f"daemon/primitives/lua/{name}" for name in lua} <= names
    assert {f"daemon/primitives/lua/{name}.lua" for name in SCRIPTS} <= names
    assert {f"daemon/store/sql/{m.name}.sql" for m in migrations()} <= names
    assert "daemon/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "seatwatch = daemon.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_script_resolves_its_includes() -> None:
    """Each script's includes name library files that exist, and the loaded source is their text then the
    script's, inside the wrapper that counts what the script runs (SPEC §5)."""
    folder = ROOT / "daemon" / "primitives" / "lua"
    for name in SCRIPTS:
        text = (folder / f"{name}.lua").read_text()
        includes = re.findall(r"^-- include: (\w+)$", text, re.MULTILINE)
        libraries = [(folder / f"{lib}.lua").read_text() for lib in includes]
        body = "\n".join([*libraries, text])
        loaded = source(name)
        assert body in loaded
        head, tail = loaded.split(body)
        assert head.startswith("local __redis, __calls = redis, 0\n")
        assert tail.rstrip().endswith("return {__calls, __reply}")


def test_unit_file_matches_the_daemon() -> None:
    """Type=notify with a watchdog, stop timeout above the default drain grace, migrations inside `run` (no
    ExecStartPre), no restart on 78 or on unloadable credentials, the credential folder, log rate limits,
    glibc's fixed mmap threshold."""
    text = (ROOT / "seatwatch.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"] == "/opt/seatwatch/current/venv/bin/seatwatch run"
    assert "ExecStartPre" not in service
    assert int(service["TimeoutStopSec"]) > 60  # SEATWATCH_SHUTDOWN_GRACE_S default
    assert int(service["WatchdogSec"]) > 0
    assert set(service["RestartPreventExitStatus"].split()) == {str(int(Exit.CONFIG)), "243"}
    assert service["LoadCredential"] == "seatwatch:/etc/seatwatch/credentials"
    assert text.count("LoadCredential=") == 1
    # "-": a missing file reaches the daemon, which exits 78 naming it (test_service_env), not a restart loop.
    assert service["EnvironmentFile"] == "-/etc/seatwatch/seatwatch.env"
    assert service["LogRateLimitIntervalSec"] == "30s"
    assert int(service["LogRateLimitBurst"]) > 0
    assert "\nMemoryDenyWriteExecute=" not in text
    assert service["Environment"] == "MALLOC_MMAP_THRESHOLD_=131072"  # RSS flat under load: bench/RESULTS.md


def test_caddy_publishes_only_health() -> None:
    """The Caddyfile proxies the health paths to the daemon's listener and nothing else; its site is a placeholder."""
    text = (ROOT / "Caddyfile").read_text()
    assert "@health path /api/monitoring/health /health" in text
    assert "reverse_proxy {$SEATWATCH_UPSTREAM:127.0.0.1:8080}" in text
    assert "{$SEATWATCH_SITE:" in text
    assert "/metrics" not in text.split("@health", 1)[1].split("handle {", 1)[0]
