"""Rows the web app writes (users, profiles, watches, legacy section states), for the demo to seed its database."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg


async def add_user(conn: asyncpg.Connection, user_id: str, email: str, *, notifications_enabled: bool) -> None:
    """A user and their profile, unless present."""
    await conn.execute("INSERT INTO auth.users (id, email) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING", user_id, email)
    await conn.execute(
        "INSERT INTO user_profiles (user_id, notifications_enabled) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
        user_id,
        notifications_enabled,
    )


async def add_watch(
    conn: asyncpg.Connection, user_id: str, term: str, subject: str, catalog_nbr: str, class_nbr: str
) -> None:
    """``user_id`` watches the section, unless already."""
    await conn.execute(
        "INSERT INTO class_watches (user_id, term, subject, catalog_nbr, class_nbr) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        user_id,
        term,
        subject,
        catalog_nbr,
        class_nbr,
    )


async def add_full_legacy_state(
    conn: asyncpg.Connection, term: str, subject: str, catalog_nbr: str, class_nbr: str, title: str, capacity: int
) -> None:
    """A legacy ``class_states`` row saying the section is full and taught by Staff, unless one exists."""
    await conn.execute(
        "INSERT INTO class_states (term, subject, catalog_nbr, class_nbr, title, instructor_name, "
        "seats_available, seats_capacity, non_reserved_seats) "
        "VALUES ($1, $2, $3, $4, $5, 'Staff', 0, $6, 0) ON CONFLICT (class_nbr) DO NOTHING",
        term,
        subject,
        catalog_nbr,
        class_nbr,
        title,
        capacity,
    )


async def ensure_database(conn: asyncpg.Connection, name: str) -> None:
    """Create database ``name`` (a fixed identifier, never user input) on the server if missing."""
    exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    if not exists:
        await conn.execute(f'CREATE DATABASE "{name}"')
