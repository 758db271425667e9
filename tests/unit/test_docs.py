"""The operations guide's commands, run against what they read: the jq filter over journal output as
`journalctl -o cat` prints it (JSON lines and systemd's own plain lines mixed)."""

from __future__ import annotations

import io
import logging
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.settings import logs

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def guide_command(pattern: str) -> str:
    """The command in a table cell of the guide matching ``pattern``, with markdown's ``\\|`` as ``|``."""
    match = re.search(pattern, GUIDE.read_text())
    assert match, f"the guide has no command matching {pattern!r}"
    return match.group(1).replace("\\|", "|")


def test_the_guides_jq_filter_keeps_warnings_and_worse_and_survives_systemds_own_lines() -> None:
    """`jq -cR 'fromjson? | select(.priority <= 4)'` passes JSON warnings and errors, drops info and plain lines."""
    jq = shutil.which("jq")
    if jq is None:
        pytest.fail("jq is missing: apt-get install jq (.ci/run does it); the guide says to install it too")
    command = guide_command(r"`journalctl -u seatwatch -o cat \\\| (jq [^`]+)`")
    assert "fromjson?" in command
    stream = io.StringIO()
    formatter = logs.JsonFormatter(logs._Scrubber(), journal=False)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("daemon.test_docs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.info("ready: seatwatch")
        logger.warning("outbox: the file transport unavailable")
        logger.error("loops not making progress")
    finally:
        logger.removeHandler(handler)
    journal = (
        "Started seatwatch.service - seatwatch: emails students when a class seat opens.\n"
        + stream.getvalue()
        + "seatwatch.service: Main process exited, code=exited, status=78/CONFIG\n"
        "seatwatch.service: Failed with result 'exit-code'.\n"
    )
    result = subprocess.run(
        [jq, *shlex.split(command)[1:]], input=journal, capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stderr
    shown = result.stdout.splitlines()
    assert len(shown) == 2, result.stdout
    assert '"msg":"outbox: the file transport unavailable"' in shown[0]
    assert '"msg":"loops not making progress"' in shown[1]


def test_the_guide_says_to_install_jq_where_it_uses_it() -> None:
    """jq is not on a fresh Debian: the row that uses it says how to get it."""
    row = next(line for line in GUIDE.read_text().splitlines() if "| jq " in line)
    assert "apt-get install -y jq" in row
