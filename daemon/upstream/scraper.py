"""The scraper client: ``POST {SCRAPER_URL}/scrape`` and strict validation of what comes back.

It knows nothing of the queue or the breaker; it maps wire outcomes onto the error tree, and each error
class says whether the breaker should count it (``ScrapeError.breaker_failure``):

* 200 with a body that validates -> an ``Observation``; any other 200 -> ``InvalidScrape`` (a failure,
  never a state change: a missing seat count must not read as 0 and fake a fill);
* 500 whose error says the section was not found -> ``SectionNotFound`` (the job completes);
* 400 -> ``ScrapeRejected`` (permanent); 429 -> ``ScrapeRateLimited`` with Retry-After;
* 401/403, other statuses, timeouts, connection errors -> ``ScrapeError``.
"""

from __future__ import annotations

import re
from typing import Any, Final

import anyio
import httpx
import orjson

from daemon.config import scrape_url
from daemon.detect import Observation
from daemon.errors import (
    InvalidScrape,
    ScrapeError,
    ScrapeRateLimited,
    ScrapeRejected,
    SectionNotFound,
)

MAX_BODY_BYTES: Final = 1_000_000
MAX_TEXT: Final = 2000
MAX_SEATS: Final = 100_000
DEFAULT_RETRY_AFTER_S: Final = 60.0
MAX_RETRY_AFTER_S: Final = 3600.0
_NOT_FOUND = re.compile(r"not\s+found", re.IGNORECASE)


class Scraper:
    def __init__(self, client: httpx.AsyncClient, base_url: str, token: str, timeout_s: float = 90) -> None:
        self.client = client
        self.url = scrape_url(base_url)
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"Scraper(url={self.url!r})"

    async def scrape(self, term: str, class_nbr: str) -> Observation:
        body = orjson.dumps({"sectionNumber": class_nbr, "term": term})
        try:
            # httpx's timeout bounds each phase; this bounds the whole call, so a job cannot outlive it.
            with anyio.fail_after(self.timeout_s):
                async with self.client.stream(
                    "POST", self.url, content=body, headers=self._headers, timeout=self.timeout_s
                ) as response:
                    content = await _read_capped(response)
        except TimeoutError as exc:
            raise ScrapeError(f"scraper timed out after {self.timeout_s:g}s") from exc
        except httpx.TimeoutException as exc:
            raise ScrapeError(f"scraper timed out after {self.timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise ScrapeError(f"scraper unreachable: {exc.__class__.__name__}") from exc
        return interpret(response.status_code, content, response.headers.get("retry-after"))


async def _read_capped(response: httpx.Response) -> bytes:
    """The body, or InvalidScrape as soon as it grows past MAX_BODY_BYTES (it is never fully buffered)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidScrape(f"scraper body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def interpret(status: int, content: bytes, retry_after: str | None = None) -> Observation:
    """Map one scraper response onto an observation or an error of the tree."""
    if len(content) > MAX_BODY_BYTES:
        raise InvalidScrape(f"scraper body too large ({len(content)} bytes)")
    message = _error_message(content)
    if status == 200:
        try:
            return parse_observation(orjson.loads(content))
        except orjson.JSONDecodeError as exc:
            raise InvalidScrape("scraper answered 200 with a body that is not JSON") from exc
    if status == 500 and _NOT_FOUND.search(message):
        raise SectionNotFound(f"scraper: {message}")
    if status == 400:
        raise ScrapeRejected(f"scraper rejected the request (400): {message}")
    if status == 429:
        raise ScrapeRateLimited(f"scraper rate limit (429): {message}", parse_retry_after(retry_after))
    if status in (401, 403):
        raise ScrapeError(f"scraper refused our token ({status})")
    raise ScrapeError(f"scraper answered {status}: {message}")


def _error_message(content: bytes) -> str:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:200].decode("utf-8", "replace")
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:500]
    return ""


def parse_retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (seconds form); a sane default otherwise."""
    if value is None:
        return DEFAULT_RETRY_AFTER_S
    try:
        seconds = float(value.strip())
    except ValueError:
        return DEFAULT_RETRY_AFTER_S
    if seconds != seconds:  # NaN
        return DEFAULT_RETRY_AFTER_S
    return min(MAX_RETRY_AFTER_S, max(1.0, seconds))


def parse_observation(body: Any) -> Observation:
    """Validate a 200 body; raise ``InvalidScrape`` saying what is wrong."""
    if not isinstance(body, dict) or body.get("success") is not True:
        raise InvalidScrape("scraper body is not {success: true, ...}")
    data = body.get("data")
    if not isinstance(data, dict):
        raise InvalidScrape("scraper body has no data object")
    problems: list[str] = []

    def text(name: str, *, required: bool) -> str | None:
        value = data.get(name)
        if value is None:
            if required:
                problems.append(f"{name} is missing")
            return None
        if not isinstance(value, str) or len(value) > MAX_TEXT or (required and not value.strip()):
            problems.append(f"{name} is not a usable string")
            return None
        return value

    def count(name: str, *, required: bool) -> int | None:
        value = data.get(name)
        if value is None:
            if required:
                problems.append(f"{name} is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEATS:
            problems.append(f"{name} is not a seat count")
            return None
        return value

    observation_fields = {
        "subject": text("subject", required=True),
        "catalog_nbr": text("catalog_nbr", required=True),
        "title": text("title", required=False),
        "instructor": text("instructor", required=True),
        "seats_available": count("seats_available", required=True),
        "seats_capacity": count("seats_capacity", required=True),
        "non_reserved_seats": count("non_reserved_seats", required=False),
        "location": text("location", required=False),
        "meeting_times": text("meeting_times", required=False),
    }
    if problems:
        raise InvalidScrape("invalid scraper data: " + "; ".join(problems))
    return Observation(**observation_fields)  # type: ignore[arg-type]
