"""How the suite finds its Postgres: a password-protected local server (Debian's default, the arm64 VPS's
documented setup) is used with the password given, never a rewritten one."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from tests.integration.test_health_daemon import with_password
from tests.support.servers import local_postgres_url


def test_the_local_server_is_reached_with_the_usual_pg_variables() -> None:
    """PGUSER, PGPASSWORD (any characters), PGHOST, PGPORT and PGDATABASE make the DSN; none: trust defaults."""
    url, used = local_postgres_url(
        {"PGUSER": "seat", "PGPASSWORD": "p@ss:w/rd#1", "PGHOST": "10.0.0.5", "PGPORT": "5433", "PGDATABASE": "x"}
    )
    parts = urlsplit(url)
    assert (parts.username, unquote(parts.password or ""), parts.hostname, parts.port) == (
        "seat",
        "p@ss:w/rd#1",
        "10.0.0.5",
        5433,
    )
    assert parts.path == "/x"
    assert used == "PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE"
    assert local_postgres_url({}) == ("postgresql://postgres@127.0.0.1:5432/postgres", "")


def test_a_given_database_password_is_kept_by_the_health_test() -> None:
    """test_health_daemon adds a password only to a DSN without one; a real one is used (and checked as secret)."""
    given = "postgresql://postgres:s3cret%40pw@127.0.0.1:5432/swt_x"
    assert with_password(given) == (given, "s3cret@pw")
    made, password = with_password("postgresql://postgres@127.0.0.1:5432/swt_x")
    assert unquote(urlsplit(made).password or "") == password
