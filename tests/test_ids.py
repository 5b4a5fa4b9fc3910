"""Request ids are valid ULIDs with the current time and do not repeat."""

from __future__ import annotations

import time

from ulid import ULID

from orq_proxy.ids import new_request_id


def test_request_ids_are_ulids_of_now() -> None:
    """Each id parses as a ULID whose timestamp is the generation time; 10,000 ids are distinct."""
    before = time.time()
    ids = [new_request_id() for _ in range(10_000)]
    after = time.time()
    assert len(set(ids)) == len(ids)
    for rid in (ids[0], ids[-1]):
        assert len(rid) == 26
        parsed = ULID.from_str(rid)
        assert str(parsed) == rid
        assert before - 0.001 <= parsed.timestamp <= after + 0.001
    assert all(c in "0123456789ABCDEFGHJKMNPQRSTVWXYZ" for c in "".join(ids[:100]))
