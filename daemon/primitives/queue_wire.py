"""The queue's wire format: the stream entry's envelope, its parsing, and the named objects the queue scripts
take and return (``daemon.jobs`` holds what a job is).

One stream entry carries a batch of sections (field ``batch``: JSON ``[[term, class_nbr, attempts], ...]``,
and ``enqueued_ms``), because every command Redis runs is billed and a command per section would cost more
than the check; ``parse_stream_entry`` reads it into one ``Job`` per section (each naming its entry), and a
section that is not a job into a ``Malformed`` of its own, so a bad section never takes its batchmates with
it. An entry of the old layout (one section in the fields ``id``, ``term``, ``class_nbr``, ``attempts``,
``enqueued_ms``) still reads as a batch of one, so work queued before an upgrade is finished.

No I/O. The same rules run in Lua (``primitives/lua/queue_lib.lua``, ``q_not_a_job``) when the
cycle script reads entries itself, so an entry fares the same whichever path takes it; the tests run one
table of entries through both. The wire format between Python and Lua is named: ``JobWire`` and
``DoneWire`` are JSON objects (cjson tables in Lua), never positional arrays.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypedDict

import orjson

from daemon.jobs import PRINTABLE, Action, Done, Job, Malformed

MAX_ATTEMPTS_FIELD: Final = 1000
MAX_ENQUEUED_MS: Final = 2**53  # anything larger is not a time, and would not survive Lua's doubles
_WHOLE: Final = re.compile(rb"[0-9]+")

# The reasons an entry is not a job. queue_lib.lua's q_not_a_job gives the same ones in the same order, so
# an entry fares the same whether the blocking reader or the settle script takes it.
NO_FIELDS: Final = "malformed entry: no term or class_nbr"
NOT_PRINTABLE: Final = "malformed entry: term or class_nbr is not printable ASCII"
ID_MISMATCH: Final = "malformed entry: id does not match term and class_nbr"
NOT_WHOLE: Final = "malformed entry: attempts or enqueued_ms is not a whole number"
OUT_OF_RANGE: Final = "malformed entry: attempts or enqueued_ms out of range"
NOT_A_BATCH: Final = "malformed entry: batch is not a list of sections"
NOT_A_SECTION: Final = "malformed section: not [term, class_nbr, attempts]"


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
    if not (PRINTABLE.fullmatch(term) and PRINTABLE.fullmatch(class_nbr)):
        return malformed(NOT_PRINTABLE)
    if raw.get(b"id") != term + b"-" + class_nbr:
        return malformed(ID_MISMATCH)
    attempts, enqueued = raw.get(b"attempts", b"0"), raw.get(b"enqueued_ms", b"0")
    if not (_WHOLE.fullmatch(attempts) and _WHOLE.fullmatch(enqueued)):
        return malformed(NOT_WHOLE)
    # Digits counted before their value, as q_not_a_job does: "00001" and a zero-padded time are out of range
    # on both paths, and a time past 2^53 is too (Lua compares it as digits, never as a rounded double).
    if len(attempts) > 4 or int(attempts) > MAX_ATTEMPTS_FIELD:
        return malformed(OUT_OF_RANGE)
    if len(enqueued) > 16 or int(enqueued) > MAX_ENQUEUED_MS:
        return malformed(OUT_OF_RANGE)
    job_id = (term + b"-" + class_nbr).decode("ascii")
    return Job(eid, job_id, term.decode("ascii"), class_nbr.decode("ascii"), int(attempts), int(enqueued))


def parse_stream_entry(entry_id: bytes | str, fields: dict[bytes, bytes] | dict[str, str]) -> list[Job | Malformed]:
    """Every section of a stream entry (either layout) as a job, or why it is not one; never raises.

    The same rules as ``q_sections`` and ``q_bad_section`` in queue_lib.lua, in the same order.
    """
    raw = {_bytes(k): _bytes(v) for k, v in fields.items()}
    if b"batch" not in raw:
        return [parse_entry(entry_id, fields)]
    eid = _bytes(entry_id).decode("ascii", "replace")
    enqueued = raw.get(b"enqueued_ms", b"0")
    try:
        batch = orjson.loads(raw[b"batch"])
    except orjson.JSONDecodeError:
        batch = None
    if not isinstance(batch, list) or not batch or not _WHOLE.fullmatch(enqueued) or len(enqueued) > 16:
        shown = {k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace") for k, v in raw.items()}
        return [Malformed(eid, shown, NOT_A_BATCH)]
    found: list[Job | Malformed] = []
    for section in batch:
        reason = _bad_section(section)
        if reason is not None:
            found.append(Malformed(eid, {"section": orjson.dumps(section).decode()}, reason))
            continue
        term, class_nbr, attempts = section
        found.append(Job(eid, f"{term}-{class_nbr}", term, class_nbr, int(attempts), int(enqueued)))
    return found


def _bad_section(section: Any) -> str | None:
    if (
        not isinstance(section, list)
        or len(section) < 3  # [term, class_nbr, attempts]
        or not isinstance(section[0], str)
        or not isinstance(section[1], str)
        or isinstance(section[2], bool)
        or not isinstance(section[2], int | float)
    ):
        return NOT_A_SECTION
    if not (PRINTABLE.fullmatch(section[0].encode()) and PRINTABLE.fullmatch(section[1].encode())):
        return NOT_PRINTABLE
    if section[2] < 0 or section[2] > MAX_ATTEMPTS_FIELD or section[2] != int(section[2]):
        return OUT_OF_RANGE
    return None


def batch_wire(sections: list[tuple[str, str, int]]) -> str:
    """A batch entry's ``batch`` field (as queue_lib.lua's ``q_add`` writes it)."""
    return orjson.dumps([list(s) for s in sections]).decode()


class JobWire(TypedDict):
    """A job as the queue scripts take and return it. Numbers travel as strings: cjson rounds past 14 digits."""

    entry_id: str
    id: str
    term: str
    class_nbr: str
    attempts: str
    enqueued_ms: str


class DoneWire(TypedDict):
    """A settled delivery as ``queue_cycle`` takes it (a section in ``settle[].jobs`` of its payload)."""

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


class EntryWire(TypedDict):
    """A stream entry whose every section is settled, as ``queue_cycle`` takes it (``settle`` in its payload)."""

    entry_id: str
    jobs: list[DoneWire]


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
    """A section the cycle script read and validated itself (``fetched`` in its reply)."""
    return Job(
        str(wire["entry_id"]),
        str(wire["id"]),
        str(wire["term"]),
        str(wire["class_nbr"]),
        int(wire["attempts"]),
        int(wire["enqueued_ms"]),
    )


def done_wire(done: Done) -> DoneWire:
    """``done`` as ``queue_cycle`` takes it."""
    if isinstance(done.job, Malformed):
        return {
            "entry_id": done.job.entry_id,
            "id": done.job.fields.get("id", ""),
            "action": "poison",
            "delay_ms": 0,
            "term": "",
            "class_nbr": "",
            "attempts": 0,
            "enqueued_ms": 0,
            "error": done.error,
            "raw": orjson.dumps(done.job.fields).decode(),
        }
    j = done.job
    return {
        "entry_id": j.entry_id,
        "id": j.id,
        "action": done.action,
        "delay_ms": int(done.delay_s * 1000),
        "term": j.term,
        "class_nbr": j.class_nbr,
        "attempts": done.attempts,
        "enqueued_ms": j.enqueued_ms,
        "error": done.error,
        "raw": "",
    }
