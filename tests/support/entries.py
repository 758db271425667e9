"""The table of stream entries that are not jobs, and why: one rule, run through both read paths.

``queue_wire.parse_entry`` (the blocking read, in Python) and ``q_not_a_job`` (the cycle script, in Lua) must give
the same reason for each; tests/unit/test_queue_units.py runs the table through the first, and
tests/integration/test_queue.py through a real Redis, both paths.
"""

from __future__ import annotations


def fields(**overrides: str) -> dict[str, str]:
    """A valid entry's fields, with ``overrides`` (the value ``"<absent>"`` removes the field)."""
    base = {"id": "2261-12431", "term": "2261", "class_nbr": "12431", "attempts": "1", "enqueued_ms": "1736960000000"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v != "<absent>"}


MALFORMED: list[tuple[dict[str, str], str]] = [
    (fields(term="<absent>"), "malformed entry: no term or class_nbr"),
    (fields(class_nbr="<absent>"), "malformed entry: no term or class_nbr"),
    (fields(term=""), "malformed entry: no term or class_nbr"),
    ({}, "malformed entry: no term or class_nbr"),
    (fields(id="<absent>"), "malformed entry: id does not match term and class_nbr"),
    (fields(id="2261-99999"), "malformed entry: id does not match term and class_nbr"),
    (fields(id="12431-2261"), "malformed entry: id does not match term and class_nbr"),
    (fields(term="22 61", id="22 61-12431"), "malformed entry: term or class_nbr is not printable ASCII"),
    (fields(class_nbr="1243é", id="2261-1243é"), "malformed entry: term or class_nbr is not printable ASCII"),
    (fields(attempts="two"), "malformed entry: attempts or enqueued_ms is not a whole number"),
    (fields(attempts="1.5"), "malformed entry: attempts or enqueued_ms is not a whole number"),
    (fields(attempts="nan"), "malformed entry: attempts or enqueued_ms is not a whole number"),
    (fields(attempts="1e3"), "malformed entry: attempts or enqueued_ms is not a whole number"),
    (fields(enqueued_ms="yesterday"), "malformed entry: attempts or enqueued_ms is not a whole number"),
    (fields(attempts="-1"), "malformed entry: attempts or enqueued_ms is not a whole number"),
    (fields(attempts="1001"), "malformed entry: attempts or enqueued_ms out of range"),
    (fields(enqueued_ms=str(2**64)), "malformed entry: attempts or enqueued_ms out of range"),
    # Python and Lua once disagreed on these (Lua counted digits, Python read the value; Lua rounded past 2^53).
    (fields(attempts="00001"), "malformed entry: attempts or enqueued_ms out of range"),
    (fields(enqueued_ms="0" * 4 + "1736960000000"), "malformed entry: attempts or enqueued_ms out of range"),
    (fields(enqueued_ms=str(2**53 + 1)), "malformed entry: attempts or enqueued_ms out of range"),
    (fields(enqueued_ms="9999999999999999"), "malformed entry: attempts or enqueued_ms out of range"),
]

# Entries at the edges of the range that are jobs on both paths.
VALID: list[dict[str, str]] = [
    fields(attempts="1000"),
    fields(attempts="0"),
    fields(enqueued_ms=str(2**53)),
    fields(enqueued_ms="0001736960000000"),
]
