"""systemd ``EnvironmentFile=`` syntax, read the way systemd reads it, for ``seatwatch check --env-file``.

So the check sees what the service will see: ``# comments`` and ``; comments``, values with interior
blanks left as they are (``SEATWATCH_CRON=0,30 * * * *``), single quotes taken verbatim, double quotes with
the shell's escapes, a backslash at the end of a line continuing it, lines without ``=`` ignored. The
states follow systemd's own parser (``parse_env_file`` in ``src/basic/env-file.c``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

_NEWLINE = "\n\r"
_BLANK = " \t\n\r"
_COMMENT = "#;"
_DOUBLE_QUOTE_ESCAPES = '"\\`$'
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse(text: str) -> tuple[dict[str, str], list[str]]:
    """(assignments, problems): each problem names a line systemd would ignore, and why."""
    values: dict[str, str] = {}
    problems: list[str] = []
    state = "pre_key"
    key: list[str] = []
    value: list[str] = []
    key_end = 0  # length of the key without trailing blanks
    value_end = 0  # length of the value without unescaped trailing blanks
    line = 1
    key_line = 1

    def push() -> None:
        name = "".join(key[:key_end])
        if _NAME.fullmatch(name):
            values[name] = "".join(value[:value_end])
        else:
            problems.append(f"line {key_line}: {name!r} is not a valid variable name; systemd ignores it")

    for char in text:
        if state == "pre_key":
            if char in _COMMENT:
                state = "comment"
            elif char not in _BLANK:
                state, key, key_end, key_line = "key", [char], 1, line
        elif state == "key":
            if char in _NEWLINE:
                state = "pre_key"  # a line without "=" is ignored
            elif char == "=":
                state, value, value_end = "pre_value", [], 0
            else:
                key.append(char)
                if char not in _BLANK:
                    key_end = len(key)
        elif state == "pre_value":
            if char in _NEWLINE:
                push()
                state = "pre_key"
            elif char == "'":
                state = "single"
            elif char == '"':
                state = "double"
            elif char == "\\":
                state = "value_escape"
            elif char not in _BLANK:
                value.append(char)
                value_end = len(value)
                state = "value"
        elif state == "value":
            if char in _NEWLINE:
                push()
                state = "pre_key"
            elif char == "\\":
                state = "value_escape"
            else:
                value.append(char)
                if char not in _BLANK:
                    value_end = len(value)
        elif state == "value_escape":
            state = "value"
            if char not in _NEWLINE:  # a backslash before a newline continues the line
                value.append(char)
                value_end = len(value)
        elif state == "single":
            if char == "'":
                state = "pre_value"
            else:
                value.append(char)
                value_end = len(value)
        elif state == "double":
            if char == '"':
                state = "pre_value"
            elif char == "\\":
                state = "double_escape"
            else:
                value.append(char)
                value_end = len(value)
        elif state == "double_escape":
            state = "double"
            if char in _DOUBLE_QUOTE_ESCAPES:
                value.append(char)
            elif char != "\n":
                value.extend(("\\", char))
            value_end = len(value)
        elif state == "comment":
            if char == "\\":
                state = "comment_escape"
            elif char in _NEWLINE:
                state = "pre_key"
        elif state == "comment_escape":
            state = "comment"
        if char == "\n":
            line += 1
    if state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push()
    return values, problems


def read(path: Path) -> tuple[dict[str, str], list[str]]:
    """``parse`` of a file (UTF-8, as systemd requires)."""
    return parse(path.read_text(encoding="utf-8"))
