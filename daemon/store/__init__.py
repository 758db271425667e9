"""Postgres: the pool, migrations and every query; the SQL files."""
