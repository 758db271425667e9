"""Redis primitives: counted clients, Lua scripts, usage ledger, cron lock, breaker, queue."""
