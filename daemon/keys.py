"""Every Redis key and stream/group name, derived from one prefix: the isolation seam for tests.

Several deployments (or test runs) share one Redis safely as long as their prefixes differ.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Every Redis key and stream/group name, from one prefix: the isolation seam for tests."""

    prefix: str

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- queue ----------------------------------------------------------------------------------
    @property
    def stream(self) -> str:
        """The stream of batch entries (sections to check); only waiting and in-flight ones (acked are deleted)."""
        return self._k("queue")

    @property
    def group(self) -> str:
        """The consumer group every daemon reads through."""
        return "workers"

    @property
    def jobs(self) -> str:
        """The old layout's dedup index (job id -> entry id); nothing writes it now, an upgrade may find it."""
        return self._k("queue", "jobs")

    @property
    def delayed(self) -> str:
        """Sorted set of batches (JSON) -> due time in ms: retries and deferrals waiting their turn."""
        return self._k("queue", "delayed")

    @property
    def delayed_payloads(self) -> str:
        """The old layout's payloads of delayed jobs (job id -> JSON); promoted, then removed."""
        return self._k("queue", "delayed", "payloads")

    def cycle_reply(self, cycle_id: str) -> str:
        """The cached reply of one queue_cycle call, so a retry after a lost reply applies nothing twice."""
        return self._k("queue", "cycle", cycle_id)

    @property
    def dead_letters(self) -> str:
        """The dead-letter stream: jobs that failed every attempt, were malformed or permanent."""
        return self._k("queue", "dead")

    # -- cron lock and ticks ----------------------------------------------------------------------
    @property
    def lock(self) -> str:
        """The cron lock (owner token, fence, times)."""
        return self._k("lock", "cron")

    @property
    def lock_meta(self) -> str:
        """Hash with holder, acquired_at_ms and fence, under the same TTL as the lock."""
        return self._k("lock", "cron", "meta")

    @property
    def lock_fence(self) -> str:
        """Counter behind the fencing tokens; never expires so tokens only grow."""
        return self._k("lock", "cron", "fence")

    def slot(self, slot_id: str) -> str:
        """Marker of one cron slot: ``running`` while a tick works on it, ``done`` after."""
        return self._k("tick", slot_id)

    @property
    def ticks(self) -> str:
        """Hash describing the last completed tick (for status)."""
        return self._k("ticks")

    # -- breaker ----------------------------------------------------------------------------------
    @property
    def breaker(self) -> str:
        """The breaker's state hash."""
        return self._k("breaker", "scraper")

    @property
    def breaker_trials(self) -> str:
        """Sorted set trial id -> expiry ms: half-open calls in flight across every daemon."""
        return self._k("breaker", "scraper", "trials")

    # -- accounting -------------------------------------------------------------------------------
    def usage(self, day: str) -> str:
        """Hash purpose -> Redis commands sent on ``day`` (UTC, YYYY-MM-DD), summed over daemons."""
        return self._k("usage", day)
