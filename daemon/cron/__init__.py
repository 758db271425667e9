"""Cron mode (SPEC): the slot maths (``slots``) and the scheduler that enqueues each group once per slot.

Nothing here imports adaptive checking (an independence contract in pyproject.toml keeps it so).
"""
