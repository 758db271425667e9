"""What a job is: the stream entry's envelope, its parsing, and the settled outcome the queue script takes.

Pure domain, no I/O. The same rules run in Lua (``primitives/lua/queue_lib.lua``, ``q_not_a_job``) when the
cycle script reads entries itself, so an entry fares the same whichever path takes it; the tests run one
table of entries through both. The wire format between Python and Lua is named: ``JobWire`` and
``DoneWire`` are JSON objects (cjson tables in Lua), never positional arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict

import orjson


@dataclass(frozen=True)
class Job:
    """One delivery of a section check. ``attempts`` were spent before this one."""

    entry_id: str
    id: str
    term: str
    class_nbr: str
    attempts: int
    enqueued_ms: int

    @property
    def attempt(self) -> int:
        """1 for the first delivery, 2 for the first retry, ..."""
        return self.attempts + 1


@dataclass(frozen=True)
class Malformed:
    """A stream entry that is not a job: it goes to the dead-letter stream as it is."""

    entry_id: str
    fields: dict[str, str]
    reason: str


MAX_ATTEMPTS_FIELD: Final = 1000
MAX_ENQUEUED_MS: Final = 2**53  # anything larger is not a time, and would not survive Lua's doubles
_PRINTABLE: Final = re.compile(rb"[!-~]+")  # printable ASCII, no blanks: what term and class numbers are
_WHOLE: Final = re.compile(rb"[0-9]+")

# The reasons an entry is not a job. queue_lib.lua's q_not_a_job gives the same ones in the same order, so
# an entry fares the same whether the blocking reader or the settle script takes it.
NO_FIELDS: Final = "malformed entry: no term or class_nbr"
NOT_PRINTABLE: Final = "malformed entry: term or class_nbr is not printable ASCII"
ID_MISMATCH: Final = "malformed entry: id does not match term and class_nbr"
NOT_WHOLE: Final = "malformed entry: attempts or enqueued_ms is not a whole number"
OUT_OF_RANGE: Final = "malformed entry: attempts or enqueued_ms out of range"


def usable_section(term: str, class_nbr: str) -> bool:
    """Whether (term, class_nbr) can travel as a job: printable ASCII without blanks."""
    return bool(_PRINTABLE.fullmatch(term.encode())) and bool(_PRINTABLE.fullmatch(class_nbr.encode()))


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def parse_entry(entry_id: bytes | str, fields: dict[bytes, bytes] | dict[str, str]) -> Job | Malformed:
    """A job from a stream entry, or why it is not one. Never raises: whatever is in the stream is data."""
    eid = _bytes(entry_id).decode("ascii", "replace")
    raw = {_bytes(k): _bytes(v) for k, v in fields.items()}
    shown = {k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace") for k, v in raw.items()}

    def malformed(reason: str) -> Malformed:
        return Malformed(eid, shown, reason)

    term, class_nbr = raw.get(b"term", b""), raw.get(b"class_nbr", b"")
    if not term or not class_nbr:
        return malformed(NO_FIELDS)
    if not (_PRINTABLE.fullmatch(term) and _PRINTABLE.fullmatch(class_nbr)):
        return malformed(NOT_PRINTABLE)
    if raw.get(b"id") != term + b"-" + class_nbr:
        return malformed(ID_MISMATCH)
    attempts, enqueued = raw.get(b"attempts", b"0"), raw.get(b"enqueued_ms", b"0")
    if not (_WHOLE.fullmatch(attempts) and _WHOLE.fullmatch(enqueued)):
        return malformed(NOT_WHOLE)
    if int(attempts) > MAX_ATTEMPTS_FIELD or int(enqueued) > MAX_ENQUEUED_MS:
        return malformed(OUT_OF_RANGE)
    job_id = (term + b"-" + class_nbr).decode("ascii")
    return Job(eid, job_id, term.decode("ascii"), class_nbr.decode("ascii"), int(attempts), int(enqueued))


Action = Literal["ack", "retry", "defer", "requeue", "dead", "poison"]
"""How a delivery was settled: ack (done), retry (spends an attempt), defer (spends none), requeue (back to the
stream now, spends none: interrupted by shutdown), dead (dead-letter), poison (not a job: dead-letter as is)."""


class JobWire(TypedDict):
    """A job as the queue scripts take and return it. Numbers travel as strings: cjson rounds past 14 digits."""

    entry_id: str
    id: str
    term: str
    class_nbr: str
    attempts: str
    enqueued_ms: str


class DoneWire(TypedDict):
    """A settled delivery as ``queue_cycle`` takes it (``done`` in its payload)."""

    entry_id: str
    id: str
    action: Action
    delay_ms: int
    term: str
    class_nbr: str
    attempts: int
    enqueued_ms: int
    error: str
    raw: str  # a poison entry's fields as JSON, kept in its dead letter


def job_wire(job: Job) -> JobWire:
    """``job`` as the scripts name its fields."""
    return {
        "entry_id": job.entry_id,
        "id": job.id,
        "term": job.term,
        "class_nbr": job.class_nbr,
        "attempts": str(job.attempts),
        "enqueued_ms": str(job.enqueued_ms),
    }


def job_from_wire(wire: dict[str, Any]) -> Job:
    """A job the cycle script read and validated itself (``fetched`` in its reply)."""
    return Job(
        str(wire["entry_id"]),
        str(wire["id"]),
        str(wire["term"]),
        str(wire["class_nbr"]),
        int(wire["attempts"]),
        int(wire["enqueued_ms"]),
    )


@dataclass(frozen=True)
class Done:
    """A settled delivery: the job (or the entry that was not one), what to do with it, and why."""

    job: Job | Malformed
    action: Action
    delay_s: float = 0.0
    error: str = ""
    attempts: int = 0  # attempts spent after this delivery (what a retry carries forward)

    def wire(self) -> DoneWire:
        """As ``queue_cycle`` takes it."""
        if isinstance(self.job, Malformed):
            return {
                "entry_id": self.job.entry_id,
                "id": self.job.fields.get("id", ""),
                "action": "poison",
                "delay_ms": 0,
                "term": "",
                "class_nbr": "",
                "attempts": 0,
                "enqueued_ms": 0,
                "error": self.error,
                "raw": orjson.dumps(self.job.fields).decode(),
            }
        j = self.job
        return {
            "entry_id": j.entry_id,
            "id": j.id,
            "action": self.action,
            "delay_ms": int(self.delay_s * 1000),
            "term": j.term,
            "class_nbr": j.class_nbr,
            "attempts": self.attempts,
            "enqueued_ms": j.enqueued_ms,
            "error": self.error,
            "raw": "",
        }
