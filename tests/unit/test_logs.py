"""Log lines: journald priority prefixes on every line, JSON lines, secrets scrubbed, emails masked."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from typing import TYPE_CHECKING, TextIO

import pytest

from daemon.settings import logs

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

SECRET = "tok-5ecr3t-value"
LOGGER = "daemon.test"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger (and the loggers configure() quiets) back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quieted = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "asyncio", "pgserver")}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in quieted.items():
        logging.getLogger(name).setLevel(old)


def on_the_journal(path: Path, monkeypatch: pytest.MonkeyPatch) -> TextIO:
    """A real file standing where the journal's stdout socket stands: JOURNAL_STREAM names its device:inode."""
    stream = path.open("w+", encoding="utf-8")
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    return stream


@pytest.fixture
def journal(restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """Text format with stdout the journal (JOURNAL_STREAM names it: no timestamps), every level shown."""
    with on_the_journal(tmp_path / "journal", monkeypatch) as stream:
        logs.configure(fmt="text", level="debug", secrets=[SECRET], stream=stream)
        yield stream


@pytest.fixture
def json_stream(restore_logging: None) -> io.StringIO:
    stream = io.StringIO()
    logs.configure(fmt="json", level="debug", secrets=[SECRET], stream=stream)
    return stream


def text(stream: TextIO) -> str:
    if isinstance(stream, io.StringIO):
        return stream.getvalue()
    stream.seek(0)
    return stream.read()


def lines(stream: TextIO) -> list[str]:
    return text(stream).splitlines()


def fail_with(message: str) -> None:
    raise ValueError(message)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.CRITICAL, "<2>"),
        (logging.ERROR, "<3>"),
        (logging.WARNING, "<4>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
    ],
)
def test_journal_priority_prefix(journal: TextIO, level: int, prefix: str) -> None:
    """Each level maps to its syslog priority: critical 2, error 3, warning 4, info 6, debug 7."""
    logging.getLogger(LOGGER).log(level, "job %s done", "2261-12431")
    assert lines(journal) == [f"{prefix}{LOGGER}: job 2261-12431 done"]


@pytest.mark.parametrize(("levelno", "expected"), [(60, 2), (45, 3), (35, 4), (25, 6), (15, 7), (5, 7), (0, 7)])
def test_priority_of_custom_levels(levelno: int, expected: int) -> None:
    """A level between the standard ones takes the priority of the standard level below it."""
    assert logs.priority(levelno) == expected


def test_traceback_lines_all_prefixed(journal: TextIO) -> None:
    """Every line of a traceback carries the record's priority prefix, so journald keeps it one priority."""
    try:
        fail_with("boom")
    except ValueError:
        logging.getLogger(LOGGER).exception("job %s failed", "2261-12431")
    out = lines(journal)
    assert len(out) >= 4
    assert all(line.startswith(f"<3>{LOGGER}: ") for line in out), out
    assert out[0] == f"<3>{LOGGER}: job 2261-12431 failed"
    assert any("Traceback (most recent call last):" in line for line in out)
    assert out[-1] == f"<3>{LOGGER}: ValueError: boom"


def test_warning_traceback_keeps_warning_priority(journal: TextIO) -> None:
    """A traceback logged at warning is prefixed <4> on every line."""
    try:
        fail_with("soft")
    except ValueError:
        logging.getLogger(LOGGER).warning("retrying", exc_info=True)
    out = lines(journal)
    assert len(out) >= 4
    assert all(line.startswith("<4>") for line in out)


def test_multiline_message_prefixed(journal: TextIO) -> None:
    """A message spanning lines is prefixed on each line."""
    logging.getLogger(LOGGER).info("first\nsecond\nthird")
    assert lines(journal) == [f"<6>{LOGGER}: first", f"<6>{LOGGER}: second", f"<6>{LOGGER}: third"]


def test_stack_info_lines_prefixed(journal: TextIO) -> None:
    """stack_info output is prefixed on every line too."""
    logging.getLogger(LOGGER).info("where am I", stack_info=True)
    out = lines(journal)
    assert len(out) >= 3
    assert all(line.startswith(f"<6>{LOGGER}: ") for line in out)


def test_no_timestamp_under_journald(journal: TextIO) -> None:
    """With stdout the journal (journald adds its own), lines carry no timestamp."""
    logging.getLogger(LOGGER).info("hello")
    assert lines(journal) == [f"<6>{LOGGER}: hello"]


def test_timestamp_without_journald(restore_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without JOURNAL_STREAM each line has a UTC timestamp and the level name after the prefix."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    logs.configure(fmt="text", level="info", stream=stream)
    logging.getLogger(LOGGER).warning("hello\nagain")
    out = lines(stream)
    pattern = re.compile(r"<4>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 WARNING daemon\.test: (hello|again)")
    assert len(out) == 2
    assert all(pattern.fullmatch(line) for line in out), out


def test_timestamp_when_an_inherited_journal_stream_names_another_file(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text follows the same rule as JSON: a JOURNAL_STREAM that does not name stdout (a child whose output
    was redirected inherits it) still gets timestamps."""
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    stream = io.StringIO()
    logs.configure(fmt="text", level="info", stream=stream)
    logging.getLogger(LOGGER).warning("hello")
    pattern = re.compile(r"<4>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 WARNING daemon\.test: hello")
    assert [line for line in lines(stream) if pattern.fullmatch(line)] == lines(stream) != []


def test_level_filters(restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configure(level=...) drops records below the level."""
    with on_the_journal(tmp_path / "journal", monkeypatch) as stream:
        logs.configure(fmt="text", level="warning", stream=stream)
        logging.getLogger(LOGGER).info("quiet")
        logging.getLogger(LOGGER).error("loud")
        assert lines(stream) == [f"<3>{LOGGER}: loud"]


def test_library_chatter_quieted(journal: TextIO) -> None:
    """httpx info chatter is not logged even at debug level."""
    logging.getLogger("httpx").info("HTTP Request: POST ...")
    logging.getLogger("httpx").warning("something real")
    assert lines(journal) == ["<4>httpx: something real"]


def test_json_one_object_per_line(json_stream: io.StringIO) -> None:
    """JSON format writes one object per record with ts, level, priority, logger and msg."""
    log = logging.getLogger(LOGGER)
    log.info("job %s done", "2261-12431")
    log.warning("two\nlines")
    out = lines(json_stream)
    assert len(out) == 2
    first, second = (json.loads(line) for line in out)
    assert set(first) == {"ts", "level", "priority", "logger", "msg"}
    assert first["level"] == "info"
    assert first["priority"] == 6
    assert first["logger"] == LOGGER
    assert first["msg"] == "job 2261-12431 done"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert second["msg"] == "two\nlines"
    assert second["priority"] == 4


def test_json_exception(json_stream: io.StringIO) -> None:
    """A JSON record with an exception has it, whole, under exc, still on one line."""
    try:
        fail_with("kaput")
    except ValueError:
        logging.getLogger(LOGGER).exception("failed")
    out = lines(json_stream)
    assert len(out) == 1
    event = json.loads(out[0])
    assert event["level"] == "error"
    assert event["priority"] == 3
    assert event["exc"].startswith("Traceback (most recent call last):")
    assert event["exc"].endswith("ValueError: kaput")


def test_secret_scrubbed_from_text_message(journal: TextIO) -> None:
    """A configured secret never reaches the output of a message."""
    logging.getLogger(LOGGER).info("token is %s", SECRET)
    out = text(journal)
    assert SECRET not in out
    assert "token is **********" in out


def test_secret_scrubbed_from_traceback(journal: TextIO) -> None:
    """A configured secret inside an exception message is scrubbed from the traceback."""
    try:
        fail_with(f"bad header Authorization: Bearer {SECRET}")
    except ValueError:
        logging.getLogger(LOGGER).exception("request failed")
    out = text(journal)
    assert SECRET not in out
    assert "Bearer **********" in out


def test_url_password_scrubbed_without_being_configured(journal: TextIO) -> None:
    """A password inside any URL is scrubbed even when it is not a configured secret."""
    logging.getLogger(LOGGER).error("cannot reach %s", "rediss://default:unlisted-pw-42@eu1.upstash.io:6379")
    out = text(journal)
    assert "unlisted-pw-42" not in out
    assert "rediss://default:***@eu1.upstash.io:6379" in out


def test_json_scrubs_message_and_exception(json_stream: io.StringIO) -> None:
    """JSON output scrubs secrets and URL passwords from msg and exc alike."""
    try:
        fail_with(f"postgresql://app:pg-pw-9@db/x {SECRET}")
    except ValueError:
        logging.getLogger(LOGGER).exception("connect %s with %s", "redis://u:r-pw-8@h", SECRET)
    out = json_stream.getvalue()
    for hidden in (SECRET, "pg-pw-9", "r-pw-8"):
        assert hidden not in out
    event = json.loads(out)
    assert event["msg"] == "connect redis://u:***@h with **********"
    assert "postgresql://app:***@db/x **********" in event["exc"]


def test_overlapping_secrets_scrubbed(restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When one secret contains another, the longer is scrubbed whole and no fragment remains."""
    with on_the_journal(tmp_path / "journal", monkeypatch) as stream:
        logs.configure(fmt="text", secrets=["abcd", "xxabcdyy"], stream=stream)
        logging.getLogger(LOGGER).info("key xxabcdyy and abcd")
        assert lines(stream) == [f"<6>{LOGGER}: key ********** and **********"]


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("ada@example.edu", "a***@example.edu"),
        ("grace.hopper@asu.edu", "g***@asu.edu"),
        ("x@y.z", "x***@y.z"),
        ("not-an-address", "***"),
        ("", "***"),
    ],
)
def test_mask_email(address: str, masked: str) -> None:
    """mask_email keeps the first character and the domain, nothing else of the local part."""
    assert logs.mask_email(address) == masked


def test_json_lines_carry_the_journald_priority_prefix_on_the_journal(
    restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stdout the journal (JOURNAL_STREAM names its device:inode), JSON lines start with <N> for journald."""
    with (tmp_path / "stdout").open("w") as stdout:
        info = os.fstat(stdout.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        logs.configure(fmt="json", level="debug", stream=stdout)
        logging.getLogger(LOGGER).warning("slow scrape of %s", "2261-12431")
        logging.getLogger(LOGGER).info("tick done")
    warning, info_line = (tmp_path / "stdout").read_text().splitlines()
    assert warning.startswith('<4>{"')
    assert json.loads(warning.removeprefix("<4>"))["msg"] == "slow scrape of 2261-12431"
    assert info_line.startswith('<6>{"')


def test_json_lines_are_bare_json_when_stdout_is_not_the_journal(
    restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JOURNAL_STREAM inherited by a process whose stdout goes elsewhere (a pipe into jq) adds no prefix."""
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    with (tmp_path / "stdout").open("w") as stdout:
        logs.configure(fmt="json", level="debug", stream=stdout)
        logging.getLogger(LOGGER).warning("plain")
    (line,) = (tmp_path / "stdout").read_text().splitlines()
    assert json.loads(line)["priority"] == 4


def test_asyncpg_pool_floor_noise_is_one_warning_per_outage(journal: TextIO) -> None:
    """asyncpg's "Failed to restore the pool connection floor" is one warning line an outage, no traceback."""
    logs.configure(fmt="text", level="info", stream=journal)
    pool_logger = logging.getLogger("asyncpg.pool")

    def floor_failed() -> None:
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
        except ConnectionRefusedError:
            pool_logger.warning("Failed to restore the pool connection floor; retrying", exc_info=True)

    logs.postgres_back()
    for _ in range(50):
        floor_failed()
    first = lines(journal)
    assert len(first) == 1, first
    assert first[0].startswith("<4>asyncpg.pool: Postgres: the pool cannot reopen its connections")
    assert "ConnectionRefusedError" in first[0]
    logs.postgres_back()  # the monitor's probe answered: the next outage is warned about again
    floor_failed()
    floor_failed()
    assert len(lines(journal)) == 2


def test_asyncpg_pool_floor_tracebacks_stay_at_debug(restore_logging: None) -> None:
    """With SEATWATCH_LOG_LEVEL=debug the repeats and the traceback appear, at <7>."""
    stream = io.StringIO()
    logs.configure(level="debug", stream=stream)
    logs.postgres_back()
    for _ in range(3):
        try:
            raise ConnectionRefusedError(111, "refused")
        except ConnectionRefusedError:
            logging.getLogger("asyncpg.pool").warning(
                "Failed to restore the pool connection floor; retrying", exc_info=True
            )
    out = lines(stream)
    assert sum(line.startswith("<4>") for line in out) == 1
    assert any(line.startswith("<7>") and "Traceback" in line for line in out)
