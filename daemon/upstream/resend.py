"""Resend's batch API: one request per batch of stored payloads, under the batch's Idempotency-Key.

Answers map to the error tree: ``EmailRetry`` (try the same batch later; maybe delivered or not) and
``EmailRejected`` (nothing was sent, the same bytes cannot succeed). ``OutgoingEmail`` and ``Transport`` are
what the outbox hands any transport (this one, or ``upstream.files``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import httpx
import orjson

from daemon.errors import EmailQuotaExceeded, EmailRejected, EmailRetry
from daemon.upstream.scraper import parse_retry_after

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

BATCH_LIMIT: Final = 100
# Resend's error names for its sending quotas (429), and the period each one resets on.
QUOTA_ERRORS: Final = {"daily_quota_exceeded": "daily", "monthly_quota_exceeded": "monthly"}


@dataclass(frozen=True)
class OutgoingEmail:
    """One outbox row's stored request payload (the JSON object Resend takes for one email)."""

    row_id: int
    payload: str


class Transport(Protocol):
    """What the outbox sends through: Resend, or a folder of files."""

    name: str

    async def send(self, key: str, emails: Sequence[OutgoingEmail]) -> list[str]:
        """Send one batch under idempotency ``key``; return one provider id per email, in order."""
        ...


class ResendTransport:
    """``POST {RESEND_API_URL}/emails/batch`` with the batch's stored bytes and its Idempotency-Key."""

    name = "resend"

    def __init__(self, client: httpx.AsyncClient, api_url: str, api_key: str, timeout_s: float = 30) -> None:
        self.client = client
        self.url = f"{api_url.rstrip('/')}/emails/batch"
        self._api_key = api_key
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"ResendTransport(url={self.url!r})"

    async def send(self, key: str, emails: Sequence[OutgoingEmail]) -> list[str]:
        """Post the batch; Resend's ids in order, or ``EmailRetry`` / ``EmailRejected``."""
        body = b"[" + b",".join(e.payload.encode() for e in emails) + b"]"
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        }
        try:
            response = await self.client.post(self.url, content=body, headers=headers, timeout=self.timeout_s)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # No connection was made, so nothing was sent: a definite refusal (SPEC §7.4).
            raise EmailRetry(f"Resend unreachable: {exc.__class__.__name__}", ambiguous=False) from exc
        except httpx.HTTPError as exc:
            # A timeout or a reset may come after Resend accepted the batch: delivery is unknown.
            raise EmailRetry(f"Resend unreachable: {exc.__class__.__name__}", ambiguous=True) from exc
        status = response.status_code
        if 200 <= status < 300:
            return _provider_ids(response.content, len(emails))
        reason = _resend_error(response.content)
        retry_after = response.headers.get("retry-after")
        wait_s = parse_retry_after(retry_after) if retry_after else None
        period = QUOTA_ERRORS.get(reason.split(":")[0].strip()) if status == 429 else None
        if period is not None:
            # Not a rate: the day's or the month's emails are used up. Waiting 60 s and asking again would
            # spend a request a minute all day for nothing.
            raise EmailQuotaExceeded(f"Resend answered 429: {reason}", period, wait_s)
        if status == 429:
            raise EmailRetry(f"Resend answered 429: {reason}", wait_s or 60.0, ambiguous=False, pause_all=True)
        if status >= 500:
            raise EmailRetry(f"Resend answered {status}: {reason}", wait_s, ambiguous=True)
        if status == 409 and "concurrent" in reason:
            raise EmailRetry(f"Resend is still processing this key: {reason}", 5.0, ambiguous=True)
        if status in (401, 403):
            # Our key, not the emails: keep them and keep trying (status and health show the failure).
            raise EmailRetry(f"Resend refused the API key ({status}): {reason}", 300.0, ambiguous=False, pause_all=True)
        raise EmailRejected(f"Resend answered {status}: {reason}")


def _provider_ids(content: bytes, count: int) -> list[str]:
    try:
        body = orjson.loads(content)
        ids = [str(item["id"]) for item in body["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        logger.warning("Resend accepted a batch but its answer has no ids")
        return [""] * count
    return ids + [""] * (count - len(ids))


def _resend_error(content: bytes) -> str:
    try:
        body: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:200].decode("utf-8", "replace")
    if isinstance(body, dict):
        name, message = body.get("name", ""), body.get("message", "")
        return f"{name}: {message}".strip(": ")[:500]
    return ""
