from __future__ import annotations

from runplane_common.ids import has_prefix, new_id


def test_ids_are_prefixed_and_time_sortable() -> None:
    ids = [new_id("run") for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(has_prefix(i, "run") for i in ids)
    assert not has_prefix(ids[0], "batch")
