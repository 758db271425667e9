"""systemd EnvironmentFile= syntax, read as systemd reads it (so `check --env-file` sees what the unit sees)."""

from __future__ import annotations

from daemon.settings import envfile


def test_comments_blank_lines_and_lines_without_equals_are_ignored() -> None:
    """'#' and ';' lines, blank lines and lines without '=' assign nothing."""
    values, problems = envfile.parse("# a comment\n; another\n\n   \nJUST_A_WORD\nA=1\n")
    assert values == {"A": "1"}
    assert problems == []


def test_unquoted_value_keeps_interior_blanks_and_trims_the_ends() -> None:
    """A cron expression needs no quotes: interior blanks stay, leading and trailing ones go."""
    values, _ = envfile.parse("SEATWATCH_CRON=  0,30 * * * *  \t\nB = spaced key \n")
    assert values == {"SEATWATCH_CRON": "0,30 * * * *", "B": "spaced key"}


def test_single_quotes_are_verbatim_and_may_span_lines() -> None:
    """Inside single quotes nothing is special, not even a backslash, '#' or a newline."""
    values, _ = envfile.parse("A='x\\ny # not a comment'\nB='two\nlines'\n")
    assert values == {"A": "x\\ny # not a comment", "B": "two\nlines"}


def test_double_quotes_take_the_shell_escapes() -> None:
    r"""In double quotes \" \\ \$ \` lose their backslash; any other backslash stays with its character."""
    values, _ = envfile.parse('A="say \\"hi\\" \\\\ \\$HOME \\` \\n"\n')
    assert values == {"A": 'say "hi" \\ $HOME ` \\n'}


def test_backslash_at_the_end_of_a_line_continues_it() -> None:
    """A trailing backslash joins the next line; an escaped blank at the end is kept."""
    values, _ = envfile.parse("A=one \\\ntwo\nB=kept\\ \n")
    assert values == {"A": "one two", "B": "kept "}


def test_quoted_and_unquoted_parts_join() -> None:
    """Text after a closing quote joins the value, as systemd does."""
    values, _ = envfile.parse('A="x"y\nB=\'p\'"q"\n')
    assert values == {"A": "xy", "B": "pq"}


def test_empty_values_last_line_without_newline_and_later_assignments_win() -> None:
    """NAME= is an empty value; a file may end without a newline; a repeated name takes the last value."""
    values, _ = envfile.parse("EMPTY=\nA=first\nA=second\nLAST=end")
    assert values == {"EMPTY": "", "A": "second", "LAST": "end"}


def test_invalid_names_are_reported_with_their_line() -> None:
    """An assignment systemd would ignore for its name is left out and named, with its line number."""
    values, problems = envfile.parse("OK=1\n1BAD=2\nALSO-BAD=3\n")
    assert values == {"OK": "1"}
    assert problems == [
        "line 2: '1BAD' is not a valid variable name; systemd ignores it",
        "line 3: 'ALSO-BAD' is not a valid variable name; systemd ignores it",
    ]


def test_a_comment_line_may_continue_with_a_backslash() -> None:
    """A backslash at the end of a comment makes the next line part of the comment, as in systemd."""
    values, _ = envfile.parse("# comment \\\nHIDDEN=1\nSHOWN=2\n")
    assert values == {"SHOWN": "2"}


def test_which_variables_name_settings() -> None:
    """A setting, its NAME_FILE or any SEATWATCH_ variable names settings; CREDENTIALS_DIRECTORY and PATH do not."""
    from daemon.settings.service_env import names_settings

    assert not names_settings({"PATH": "/usr/bin", "CREDENTIALS_DIRECTORY": "/run/credentials/x", "HOME": "/root"})
    assert not names_settings({"SEATWATCH_INSTALL_ROOT": "/tmp/stage", "DATABASE_URL": " "})
    assert names_settings({"DATABASE_URL": "postgresql://h/db"})
    assert names_settings({"SCRAPER_SECRET_TOKEN_FILE": "/run/secret"})
    assert names_settings({"SEATWATCH_CRON": "0 * * * *"})
