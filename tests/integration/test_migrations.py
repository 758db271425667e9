"""Migrations on real Postgres: an empty database, the production schema, reruns, races, poolers, the CLI.

The production case loads ``tests/fixtures/legacy_schema.sql`` (the original web app's schema, written
independently of ``daemon/store/sql``) and compares a catalog snapshot of every object before and after: SPEC §6
says migrations are additive only.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg
import pytest

from daemon.store import db
from daemon.store.migrations import migrate, migrations, pending_migrations
from daemon.store.pool import connect, connect_options
from tests.support.procs import run_cli

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

LEGACY_SQL: Final = (Path(__file__).resolve().parents[1] / "fixtures" / "legacy_schema.sql").read_text()

# -- catalog snapshots -----------------------------------------------------------------------------------

# Each query yields (schema, owner, name, definition): ``owner`` is the table or function an entry belongs to,
# so a new entry can be attributed to seatwatch (owner named seatwatch_*) or not.
CATALOG_QUERIES: Final[dict[str, str]] = {
    "schemas": """
        SELECT n.nspname, n.nspname, n.nspname,
               json_build_object('owner', pg_get_userbyid(n.nspowner), 'acl', n.nspacl::text)::text
        FROM pg_namespace n WHERE n.nspname IN ('public', 'auth')
    """,
    "relations": """
        SELECT n.nspname, c.relname, c.relname,
               json_build_object('kind', c.relkind, 'owner', pg_get_userbyid(c.relowner), 'acl', c.relacl::text,
                                 'rls', c.relrowsecurity, 'force_rls', c.relforcerowsecurity,
                                 'replica_identity', c.relreplident, 'persistence', c.relpersistence,
                                 'options', c.reloptions::text, 'comment', obj_description(c.oid, 'pg_class'))::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('public', 'auth') AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    """,
    "columns": """
        SELECT n.nspname, c.relname, a.attname,
               json_build_object('position', a.attnum, 'type', format_type(a.atttypid, a.atttypmod),
                                 'not_null', a.attnotnull, 'default', pg_get_expr(d.adbin, d.adrelid),
                                 'identity', a.attidentity, 'generated', a.attgenerated,
                                 'collation', a.attcollation, 'acl', a.attacl::text,
                                 'comment', col_description(c.oid, a.attnum))::text
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname IN ('public', 'auth') AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND a.attnum > 0 AND NOT a.attisdropped
    """,
    "constraints": """
        SELECT n.nspname, c.relname, con.conname,
               json_build_object('type', con.contype, 'def', pg_get_constraintdef(con.oid),
                                 'deferrable', con.condeferrable, 'deferred', con.condeferred,
                                 'validated', con.convalidated)::text
        FROM pg_constraint con
        JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('public', 'auth')
    """,
    "indexes": """
        SELECT n.nspname, t.relname, i.relname,
               json_build_object('def', pg_get_indexdef(i.oid), 'primary', ix.indisprimary,
                                 'valid', ix.indisvalid)::text
        FROM pg_index ix
        JOIN pg_class i ON i.oid = ix.indexrelid
        JOIN pg_class t ON t.oid = ix.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname IN ('public', 'auth')
    """,
    "triggers": """
        SELECT n.nspname, c.relname, t.tgname,
               json_build_object('def', pg_get_triggerdef(t.oid), 'enabled', t.tgenabled)::text
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('public', 'auth') AND NOT t.tgisinternal
    """,
    "functions": """
        SELECT n.nspname, p.proname, p.oid::regprocedure::text,
               json_build_object('def', CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END,
                                 'owner', pg_get_userbyid(p.proowner), 'acl', p.proacl::text,
                                 'comment', obj_description(p.oid, 'pg_proc'))::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname IN ('public', 'auth')
    """,
    "policies": """
        SELECT schemaname, tablename, policyname,
               json_build_object('permissive', permissive, 'roles', roles::text, 'cmd', cmd,
                                 'using', qual, 'check', with_check)::text
        FROM pg_policies WHERE schemaname IN ('public', 'auth')
    """,
    "table_grants": """
        SELECT table_schema, table_name, grantor || ' -> ' || grantee || ': ' || privilege_type,
               json_build_object('grantable', is_grantable, 'hierarchy', with_hierarchy)::text
        FROM information_schema.role_table_grants WHERE table_schema IN ('public', 'auth')
    """,
    "routine_grants": """
        SELECT routine_schema, routine_name, specific_name || ' ' || grantor || ' -> ' || grantee || ': '
               || privilege_type, is_grantable
        FROM information_schema.routine_privileges WHERE routine_schema IN ('public', 'auth')
    """,
    "default_privileges": """
        SELECT coalesce(n.nspname, '*'), pg_get_userbyid(d.defaclrole), d.defaclobjtype::text, d.defaclacl::text
        FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
    """,
    "publications": """
        SELECT schemaname, tablename, pubname, pubname FROM pg_publication_tables
    """,
    "extensions": """
        SELECT 'extension', e.extname, e.extname, e.extversion FROM pg_extension e
    """,
    "roles": """
        SELECT 'cluster', rolname, rolname,
               json_build_object('super', rolsuper, 'inherit', rolinherit, 'login', rolcanlogin,
                                 'bypassrls', rolbypassrls, 'config', rolconfig::text)::text
        FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')
    """,
}

Key = tuple[str, str, str]
Snapshot = dict[str, dict[Key, str]]


async def catalog_snapshot(conn: asyncpg.Connection) -> Snapshot:
    """Every object's definition in public and auth (and the Supabase roles), keyed by category."""
    snapshot: Snapshot = {}
    for category, query in CATALOG_QUERIES.items():
        entries: dict[Key, str] = {}
        for schema, owner, name, definition in await conn.fetch(query):
            key = (str(schema), str(owner), str(name))
            assert key not in entries, f"{category}: ambiguous key {key}"
            entries[key] = str(definition)
        snapshot[category] = entries
    return snapshot


async def base_tables(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('public', 'auth') AND c.relkind = 'r' ORDER BY 1, 2
        """
    )
    return [(r[0], r[1]) for r in rows]


async def data_snapshot(conn: asyncpg.Connection, tables: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """Every row of ``tables`` (default: every table of public and auth) as JSON in a stable order."""
    return {
        f"{schema}.{table}": await conn.fetchval(
            f'SELECT coalesce(json_agg(t ORDER BY t::text), \'[]\')::text FROM "{schema}"."{table}" t'
        )
        for schema, table in (tables if tables is not None else await base_tables(conn))
    }


def is_seatwatch_owned(key: Key) -> bool:
    schema, owner, _name = key
    return schema == "public" and owner.startswith("seatwatch_")


# -- fixtures and helpers -----------------------------------------------------------------------------

MIGRATION_NAMES: Final = [m.name for m in migrations()]

USER_A: Final = "00000000-0000-4000-8000-00000000000a"
USER_B: Final = "00000000-0000-4000-8000-00000000000b"
USER_MUTED: Final = "00000000-0000-4000-8000-00000000000c"


async def seed_legacy(conn: asyncpg.Connection) -> None:
    """Rows as production has them: users with trigger-made profiles, watches, states, live and expired claims."""
    await conn.execute(
        f"""
        INSERT INTO auth.users (id, aud, role, email, raw_user_meta_data) VALUES
            ('{USER_A}', 'authenticated', 'authenticated', 'a@example.edu', '{{"name": "A"}}'),
            ('{USER_B}', 'authenticated', 'authenticated', 'b@example.edu', NULL),
            ('{USER_MUTED}', 'authenticated', 'authenticated', 'muted@example.edu', NULL);
        UPDATE user_profiles SET notifications_enabled = false, unsubscribed_at = now()
        WHERE user_id = '{USER_MUTED}';
        INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) VALUES
            ('{USER_A}', '2261', 'CSE', '110', '12431'),
            ('{USER_B}', '2261', 'CSE', '110', '12431'),
            ('{USER_MUTED}', '2261', 'CSE', '110', '12431'),
            ('{USER_A}', '2261', 'MAT', '265', '20012'),
            ('{USER_B}', '2261', 'ENG', '101', '3318A');
        INSERT INTO class_states (term, subject, catalog_nbr, class_nbr, title, instructor_name, seats_available,
                                  seats_capacity, location, meeting_times, non_reserved_seats) VALUES
            ('2261', 'CSE', '110', '12431', 'Principles of Programming', 'Staff', 0, 150, 'BYENG 210',
             'MWF 9:00-9:50', 0),
            ('2257', 'MAT', '265', '20012', 'Calculus III', 'Ada L', 3, 40, NULL, NULL, NULL);
        INSERT INTO notifications_sent (class_watch_id, notification_type, sent_at, expires_at)
        SELECT id, 'seat_available', now() - interval '3 days', now() - interval '2 days'
        FROM class_watches WHERE user_id = '{USER_A}' AND class_nbr = '12431';
        INSERT INTO notifications_sent (class_watch_id, notification_type)
        SELECT id, 'instructor_assigned' FROM class_watches WHERE user_id = '{USER_B}' AND class_nbr = '12431';
        """
    )


async def load_legacy(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(LEGACY_SQL)
        await seed_legacy(conn)
    finally:
        await conn.close()


@pytest.fixture
async def legacy_database_url(empty_database_url: str) -> str:
    """A fresh database holding the original production schema and some rows."""
    await load_legacy(empty_database_url)
    return empty_database_url


@pytest.fixture(params=["empty", "legacy"])
async def start_database_url(request: pytest.FixtureRequest, empty_database_url: str) -> str:
    """An empty database, or one holding the production schema."""
    if request.param == "legacy":
        await load_legacy(empty_database_url)
    return empty_database_url


@pytest.fixture
async def conn_to_empty(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(empty_database_url)
    try:
        yield conn
    finally:
        await conn.close()


def cli_env(database_url: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", "DATABASE_URL": database_url}


async def columns(conn: asyncpg.Connection, table: str) -> dict[str, tuple[str, bool]]:
    rows = await conn.fetch(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull
        FROM pg_attribute a
        WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
        """,
        table,
    )
    return {r["attname"]: (r["type"], r["attnotnull"]) for r in rows}


async def defaults(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        """
        SELECT a.attname, pg_get_expr(d.adbin, d.adrelid) AS def
        FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
        WHERE d.adrelid = to_regclass($1)
        """,
        table,
    )
    return {r["attname"]: r["def"] for r in rows}


async def constraints(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE conrelid = to_regclass($1)",
        table,
    )
    return {r["conname"]: r["def"] for r in rows}


async def index_columns(conn: asyncpg.Connection, table: str) -> list[str]:
    """The column list of every index on ``table``, e.g. ``"class_nbr, term"``, partial ones with WHERE."""
    rows = await conn.fetch(
        "SELECT pg_get_indexdef(indexrelid) AS def FROM pg_index WHERE indrelid = to_regclass($1)", table
    )
    found = []
    for r in rows:
        match = re.search(r"USING btree \((.*)\)$", r["def"])
        assert match is not None, r["def"]
        found.append(match.group(1))
    return found


T: Final = "timestamp with time zone"

EXPECTED_COLUMNS: Final[dict[str, dict[str, tuple[str, bool]]]] = {
    "auth.users": {"id": ("uuid", True), "email": ("text", False)},
    "public.class_watches": {
        "id": ("uuid", True),
        "user_id": ("uuid", True),
        "term": ("text", True),
        "subject": ("text", True),
        "catalog_nbr": ("text", True),
        "class_nbr": ("text", True),
        "created_at": (T, True),
    },
    "public.class_states": {
        "id": ("uuid", True),
        "term": ("text", True),
        "subject": ("text", True),
        "catalog_nbr": ("text", True),
        "class_nbr": ("text", True),
        "title": ("text", False),
        "instructor_name": ("text", False),
        "seats_available": ("integer", True),
        "seats_capacity": ("integer", True),
        "non_reserved_seats": ("integer", False),
        "location": ("text", False),
        "meeting_times": ("text", False),
        "last_checked_at": (T, True),
        "last_changed_at": (T, True),
    },
    "public.notifications_sent": {
        "id": ("uuid", True),
        "class_watch_id": ("uuid", True),
        "notification_type": ("text", True),
        "sent_at": (T, True),
        "expires_at": (T, True),
    },
    "public.user_profiles": {
        "id": ("uuid", True),
        "user_id": ("uuid", True),
        "is_disabled": ("boolean", True),
        "disabled_at": (T, False),
        "age_verified_at": (T, False),
        "agreed_to_terms_at": (T, False),
        "created_at": (T, True),
        "updated_at": (T, True),
        "notifications_enabled": ("boolean", True),
        "unsubscribed_at": (T, False),
        "email_bounced": ("boolean", True),
        "email_bounced_at": (T, False),
        "spam_complained": ("boolean", True),
        "spam_complained_at": (T, False),
        "is_admin": ("boolean", True),
    },
}

EXPECTED_DEFAULTS: Final[dict[str, dict[str, str]]] = {
    "public.class_watches": {"id": "gen_random_uuid()", "created_at": "now()"},
    "public.class_states": {
        "seats_available": "0",
        "seats_capacity": "0",
        "last_checked_at": "now()",
        "last_changed_at": "now()",
    },
    "public.notifications_sent": {"sent_at": "now()", "expires_at": "(now() + '24:00:00'::interval)"},
    "public.user_profiles": {
        "is_disabled": "false",
        "notifications_enabled": "true",
        "email_bounced": "false",
        "spam_complained": "false",
        "is_admin": "false",
    },
}

EXPECTED_CONSTRAINTS: Final[dict[str, set[str]]] = {
    "auth.users": {"PRIMARY KEY (id)"},
    "public.class_watches": {
        "PRIMARY KEY (id)",
        "UNIQUE (user_id, term, class_nbr)",
        "FOREIGN KEY (user_id) REFERENCES auth.users(id) ON DELETE CASCADE",
    },
    "public.class_states": {"PRIMARY KEY (id)", "UNIQUE (class_nbr)"},
    "public.notifications_sent": {
        "PRIMARY KEY (id)",
        "UNIQUE (class_watch_id, notification_type)",
        "FOREIGN KEY (class_watch_id) REFERENCES class_watches(id) ON DELETE CASCADE",
        "CHECK ((notification_type = ANY (ARRAY['seat_available'::text, 'instructor_assigned'::text])))",
    },
    "public.user_profiles": {
        "PRIMARY KEY (id)",
        "UNIQUE (user_id)",
        "FOREIGN KEY (user_id) REFERENCES auth.users(id) ON DELETE CASCADE",
    },
}

# Names the web app relies on (its API maps the unique violation of the first to HTTP 409).
EXPECTED_NAMED_CONSTRAINTS: Final[dict[str, tuple[str, str]]] = {
    "unique_user_class_watch": ("public.class_watches", "UNIQUE (user_id, term, class_nbr)"),
    "unique_notification": ("public.notifications_sent", "UNIQUE (class_watch_id, notification_type)"),
}

EXPECTED_INDEXES: Final[dict[str, set[str]]] = {
    "public.class_watches": {"user_id", "class_nbr", "class_nbr, term"},
    "public.notifications_sent": {"class_watch_id", "expires_at"},
}

LEGACY_FUNCTIONS: Final[dict[str, str]] = {
    "get_sections_to_check(text)": "TABLE(class_nbr text, term text)",
    "get_watchers_for_sections(text[])": "TABLE(user_id uuid, email text, watch_id uuid, class_nbr text)",
    "try_record_notification(uuid,text,integer)": "boolean",
}

SEATWATCH_TABLES: Final = (
    "seatwatch_migrations",
    "seatwatch_section_states",
    "seatwatch_outbox",
    "seatwatch_outbox_batches",
)
SEATWATCH_FUNCTIONS: Final = (
    "seatwatch_sections_to_check(text)",
    "seatwatch_observe(text,text,text,text,text,text,integer,integer,integer,text,text)",
    "seatwatch_claim(text,text,boolean,text[])",
)


async def assert_full_schema(conn: asyncpg.Connection) -> None:
    """Everything the web app and seatwatch need is there, as BACKGROUND §1 and SPEC §6 describe it."""
    for table, expected in EXPECTED_COLUMNS.items():
        assert await columns(conn, table) == expected, table
    for table, expected_defaults in EXPECTED_DEFAULTS.items():
        actual = await defaults(conn, table)
        assert {c: actual.get(c) for c in expected_defaults} == expected_defaults, table
    for table, expected_constraints in EXPECTED_CONSTRAINTS.items():
        actual_constraints = await constraints(conn, table)
        assert expected_constraints <= set(actual_constraints.values()), (table, actual_constraints)
    for name, (table, definition) in EXPECTED_NAMED_CONSTRAINTS.items():
        assert (await constraints(conn, table)).get(name) == definition, name
    for table, expected_indexes in EXPECTED_INDEXES.items():
        assert expected_indexes <= set(await index_columns(conn, table)), table

    trigger = await conn.fetchrow(
        """
        SELECT pg_get_triggerdef(t.oid) AS def FROM pg_trigger t
        WHERE t.tgrelid = 'public.class_states'::regclass AND NOT t.tgisinternal
          AND t.tgfoid = 'public.update_class_state_changed_at()'::regprocedure
        """
    )
    assert trigger is not None
    assert "BEFORE UPDATE ON public.class_states FOR EACH ROW" in trigger["def"]

    for signature, result in LEGACY_FUNCTIONS.items():
        row = await conn.fetchrow(
            """
            SELECT pg_get_function_result(p.oid) AS result, p.prosecdef, p.proconfig
            FROM pg_proc p WHERE p.oid = to_regprocedure($1)
            """,
            "public." + signature,
        )
        assert row is not None, signature
        assert row["result"] == result, signature
        assert row["prosecdef"], f"{signature} is not SECURITY DEFINER"
        assert row["proconfig"] == ["search_path=public"], signature

    for table in SEATWATCH_TABLES:
        assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", "public." + table), table
    for function in SEATWATCH_FUNCTIONS:
        assert await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", "public." + function), function

    ledger = await conn.fetch("SELECT name, checksum FROM seatwatch_migrations ORDER BY name")
    assert [(r["name"], r["checksum"]) for r in ledger] == [(m.name, m.checksum) for m in migrations()]


# -- an empty database ---------------------------------------------------------------------------------


async def test_migrate_on_empty_database_creates_everything(conn_to_empty: asyncpg.Connection) -> None:
    """On an empty database migrate builds auth.users, the web app's schema and seatwatch's, and records it."""
    assert await conn_to_empty.fetchval("SELECT to_regnamespace('auth')") is None

    assert MIGRATION_NAMES[:2] == ["0001_base_schema", "0002_seatwatch"]
    assert await migrate(conn_to_empty) == MIGRATION_NAMES

    await assert_full_schema(conn_to_empty)
    assert await pending_migrations(conn_to_empty) == []


async def test_class_states_trigger_moves_changed_at_only_for_seats_or_instructor(
    conn_to_empty: asyncpg.Connection,
) -> None:
    """The class_states trigger moves last_changed_at only on a seats/instructor change, last_checked_at always."""
    await migrate(conn_to_empty)
    await conn_to_empty.execute(
        """
        INSERT INTO class_states (term, subject, catalog_nbr, class_nbr, instructor_name, seats_available,
                                  seats_capacity, location, last_checked_at, last_changed_at)
        VALUES ('2261', 'CSE', '110', '10001', NULL, 0, 10, 'A 1', '2000-01-01Z', '2000-01-01Z')
        """
    )

    async def update(assignments: str) -> tuple[bool, bool]:
        """(last_changed_at, last_checked_at) set by this update? Each update is its own transaction."""
        row = await conn_to_empty.fetchrow(
            f"""
            UPDATE class_states SET {assignments} WHERE class_nbr = '10001'
            RETURNING last_changed_at = now() AS changed, last_checked_at = now() AS checked
            """
        )
        assert row is not None
        return row["changed"], row["checked"]

    assert await update("location = 'B 2'") == (False, True)
    assert await update("seats_available = 3") == (True, True)
    assert await update("seats_available = 3, meeting_times = 'MWF'") == (False, True)
    assert await update("instructor_name = 'Staff'") == (True, True), "NULL -> 'Staff' is a change"
    assert await update("instructor_name = 'Staff'") == (False, True)
    assert await update("instructor_name = NULL") == (True, True), "'Staff' -> NULL is a change"
    assert await update("last_checked_at = '2000-01-01Z'") == (False, True), "last_checked_at always moves"
    assert await update("seats_capacity = 99, non_reserved_seats = 4, title = 'x'") == (False, True), (
        "only seats_available and instructor_name count, as in the original"
    )


async def test_second_migrate_is_a_no_op(start_database_url: str) -> None:
    """A second migrate applies nothing and leaves every catalog entry and row exactly as it was."""
    conn = await connect(start_database_url)
    try:
        assert await migrate(conn) == MIGRATION_NAMES
        catalog, data = await catalog_snapshot(conn), await data_snapshot(conn)

        assert await migrate(conn) == []

        assert await catalog_snapshot(conn) == catalog
        assert await data_snapshot(conn) == data
    finally:
        await conn.close()


# -- the production schema -----------------------------------------------------------------------------


async def test_migrate_on_production_schema_changes_nothing_that_exists(legacy_database_url: str) -> None:
    """On the original schema migrate leaves every existing definition, grant, policy and row unchanged."""
    conn = await connect(legacy_database_url)
    try:
        before = await catalog_snapshot(conn)
        existing_tables = await base_tables(conn)
        rows_before = await data_snapshot(conn, existing_tables)
        assert len(before["functions"]) >= 9
        assert len(before["policies"]) >= 5
        assert len(before["table_grants"]) >= 10

        assert await migrate(conn) == MIGRATION_NAMES

        after = await catalog_snapshot(conn)
        changed = [
            (category, key, definition, after[category].get(key, "<gone>"))
            for category, entries in before.items()
            for key, definition in entries.items()
            if after[category].get(key) != definition
        ]
        assert changed == []
        assert await data_snapshot(conn, existing_tables) == rows_before
    finally:
        await conn.close()


async def test_migrate_on_production_schema_adds_only_seatwatch_objects(legacy_database_url: str) -> None:
    """On the original schema every object migrate adds is seatwatch's own: no duplicate index, column or trigger."""
    conn = await connect(legacy_database_url)
    try:
        before = await catalog_snapshot(conn)
        await migrate(conn)
        after = await catalog_snapshot(conn)
    finally:
        await conn.close()

    added = {(category, key) for category, entries in after.items() for key in entries if key not in before[category]}
    assert {item for item in added if not is_seatwatch_owned(item[1])} == set()
    added_tables = {key[2] for category, key in added if category == "relations" and key[2].startswith("seatwatch_")}
    assert set(SEATWATCH_TABLES) <= added_tables
    added_functions = {key[2].removeprefix("public.") for category, key in added if category == "functions"}
    assert set(SEATWATCH_FUNCTIONS) <= added_functions
    # The web app's tables kept their exact index list: no equivalent of an existing index was added.
    assert {key for category, key in added if category == "indexes" and not key[1].startswith("seatwatch_")} == set()


async def test_legacy_functions_keep_their_original_bodies_after_migrate(legacy_database_url: str) -> None:
    """After migrate the web app's own functions and triggers still behave as the original ones did."""
    conn = await connect(legacy_database_url)
    try:
        await migrate(conn)
        # The original casts the last character: a class number ending in a letter breaks the parity groups.
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            await conn.fetch("SELECT * FROM get_sections_to_check('even')")
        assert len(await conn.fetch("SELECT * FROM get_sections_to_check('all')")) == 3
        # The profile trigger on auth.users still creates the row.
        new_user = "00000000-0000-4000-8000-0000000000dd"
        await conn.execute("INSERT INTO auth.users (id, email) VALUES ($1, 'new@example.edu')", new_user)
        assert await conn.fetchval("SELECT count(*) FROM user_profiles WHERE user_id = $1", new_user) == 1
        # The original quirk: an expired row still blocks the claim.
        watch = await conn.fetchval("SELECT id FROM class_watches WHERE user_id = $1 AND class_nbr = '12431'", USER_A)
        assert await conn.fetchval("SELECT try_record_notification($1, 'seat_available')", watch) is False
    finally:
        await conn.close()


async def test_seatwatch_functions_work_on_production_schema(legacy_database_url: str) -> None:
    """seatwatch's functions run against the original tables (varchar emails, the legacy trigger, profiles)."""
    conn = await connect(legacy_database_url)
    try:
        await migrate(conn)
        assert ("2261", "3318A") in await db.sections_to_check(conn, "even")

        async with conn.transaction():
            prev = await conn.fetchrow(
                "SELECT * FROM seatwatch_observe('2261', '12431', 'CSE', '110', 'Principles of Programming', "
                "'Grace H', 5, 150, 5, 'BYENG 210', 'MWF 9:00-9:50')"
            )
            claimed = await conn.fetch(
                "SELECT * FROM seatwatch_claim('2261', '12431', true, ARRAY['seat_available', 'instructor_assigned'])"
            )
            state = await conn.fetchrow(
                "SELECT instructor_name, seats_available, last_changed_at = now() AS changed, "
                "last_checked_at = now() AS checked FROM class_states WHERE class_nbr = '12431'"
            )
        assert prev is not None
        assert (prev["prev_source"], prev["prev_instructor"], prev["prev_seats_available"]) == (
            "class_states",
            "Staff",
            0,
        )
        assert state is not None
        assert tuple(state) == ("Grace H", 5, True, True)
        # A's seat claim had expired, B already had its instructor claim; the muted user gets nothing.
        assert sorted((str(r["user_id"]), r["email"], r["notification_type"]) for r in claimed) == [
            (USER_A, "a@example.edu", "instructor_assigned"),
            (USER_A, "a@example.edu", "seat_available"),
            (USER_B, "b@example.edu", "seat_available"),
        ]
    finally:
        await conn.close()


async def test_seatwatch_objects_are_closed_to_supabase_client_roles(legacy_database_url: str) -> None:
    """Under Supabase's default grants, anon/authenticated can't call seatwatch's functions or read its rows."""
    conn = await connect(legacy_database_url)
    try:
        await migrate(conn)
        for role in ("anon", "authenticated"):
            for function in SEATWATCH_FUNCTIONS:
                assert not await conn.fetchval(
                    "SELECT has_function_privilege($1::name, $2::text, 'EXECUTE')", role, function
                ), (role, function)
        for table in ("seatwatch_section_states", "seatwatch_outbox", "seatwatch_outbox_batches"):
            assert await conn.fetchval("SELECT relrowsecurity FROM pg_class WHERE oid = to_regclass($1)", table)

        await conn.fetch(
            "SELECT * FROM seatwatch_observe('2261', '20012', 'MAT', '265', NULL, 'Ada L', 1, 40, NULL, NULL, NULL)"
        )
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE anon")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval("SELECT count(*) FROM seatwatch_section_states")
        assert await conn.fetchval("SELECT count(*) FROM seatwatch_section_states") == 1
    finally:
        await conn.close()


# -- concurrent runs -----------------------------------------------------------------------------------


async def test_concurrent_migrations_apply_each_file_once(empty_database_url: str) -> None:
    """Two migrate calls racing on two connections both succeed; each migration runs and is recorded once."""
    first, second = await connect(empty_database_url), await connect(empty_database_url)
    try:
        results = await asyncio.gather(migrate(first), migrate(second))
        assert sorted(results, key=len) == [[], MIGRATION_NAMES]
        counts = await first.fetch("SELECT name, count(*) AS n FROM seatwatch_migrations GROUP BY name ORDER BY name")
        assert [(r["name"], r["n"]) for r in counts] == [(name, 1) for name in MIGRATION_NAMES]
        await assert_full_schema(first)
    finally:
        await first.close()
        await second.close()


@pytest.mark.slow
async def test_concurrent_migrate_processes_apply_each_file_once(empty_database_url: str) -> None:
    """Two `python -m daemon migrate` processes started together both exit 0; one applies, one finds nothing."""
    env = cli_env(empty_database_url)
    results = await asyncio.gather(
        asyncio.to_thread(run_cli, "migrate", env=env), asyncio.to_thread(run_cli, "migrate", env=env)
    )
    for result in results:
        assert result.returncode == 0, result.stderr
    last_lines = sorted(result.stdout.strip().splitlines()[-1] for result in results)
    assert last_lines == ["applied: " + ", ".join(MIGRATION_NAMES), "nothing to do: every migration is applied"]

    conn = await connect(empty_database_url)
    try:
        counts = await conn.fetch("SELECT name, count(*) AS n FROM seatwatch_migrations GROUP BY name ORDER BY name")
        assert [(r["name"], r["n"]) for r in counts] == [(name, 1) for name in MIGRATION_NAMES]
        await assert_full_schema(conn)
    finally:
        await conn.close()


# -- poolers and the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "cache_off"),
    [
        ("postgresql://u:p@aws-0-us-west-1.pooler.supabase.com:6543/postgres", True),
        ("postgresql://u:p@aws-0-us-west-1.pooler.supabase.com:5432/postgres", False),
        ("postgresql://u:p@db.example.supabase.co/postgres", False),
    ],
)
def test_connect_options_disable_statement_cache_only_for_transaction_pooler(dsn: str, cache_off: bool) -> None:
    """Port 6543 (transaction-mode pooler) turns asyncpg's statement cache off; 5432 or no port keeps it."""
    options = connect_options(dsn)
    assert options["dsn"] == dsn
    if cache_off:
        assert options["statement_cache_size"] == 0
    else:
        assert "statement_cache_size" not in options


@pytest.mark.parametrize(
    ("dsn", "size", "left"),
    [
        ("postgresql://u@127.0.0.1:6432/db?statement_cache_size=0", 0, "postgresql://u@127.0.0.1:6432/db"),
        (
            "postgresql://u@h:6543/db?statement_cache_size=50&sslmode=require",
            50,
            "postgresql://u@h:6543/db?sslmode=require",
        ),
    ],
)
def test_the_dsn_sets_the_statement_cache_explicitly(dsn: str, size: int, left: str) -> None:
    """``?statement_cache_size=N`` sets the cache (any port, a PgBouncer anywhere) and never reaches asyncpg."""
    options = connect_options(dsn)
    assert options["statement_cache_size"] == size
    assert options["dsn"] == left


async def test_migrate_works_without_statement_cache(empty_database_url: str) -> None:
    """migrate and seatwatch's calls work on a connection with the statement cache off (transaction pooler)."""
    conn = await asyncpg.connect(empty_database_url, statement_cache_size=0)
    try:
        assert await migrate(conn) == MIGRATION_NAMES
        assert await migrate(conn) == []
        assert await pending_migrations(conn) == []
        assert await db.sections_to_check(conn, "all") == []
        await assert_full_schema(conn)
    finally:
        await conn.close()


@pytest.mark.slow
async def test_cli_migrate_applies_then_has_nothing_to_do(empty_database_url: str) -> None:
    """`python -m daemon migrate` exits 0 naming what it applied, then exits 0 saying there is nothing to do."""
    env = cli_env(empty_database_url)
    first = await asyncio.to_thread(run_cli, "migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "applied: " + ", ".join(MIGRATION_NAMES)

    second = await asyncio.to_thread(run_cli, "migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines()[-1] == "nothing to do: every migration is applied"

    conn = await connect(empty_database_url)
    try:
        await assert_full_schema(conn)
    finally:
        await conn.close()


def test_legacy_fixture_is_independent_of_seatwatch_sql() -> None:
    """The legacy fixture's index and trigger names differ from daemon/store/sql's, so a duplicate would show."""
    ours = "\n".join(m.sql for m in migrations())
    legacy_names = set(re.findall(r"CREATE (?:UNIQUE )?(?:INDEX|TRIGGER) (\w+)", LEGACY_SQL))
    seatwatch_names = set(re.findall(r"CREATE (?:UNIQUE )?(?:INDEX|TRIGGER) (?:IF NOT EXISTS )?(\w+)", ours))
    assert legacy_names
    assert legacy_names.isdisjoint(seatwatch_names)
