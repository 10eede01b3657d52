"""Node-to-node codec: round trip, and any bytes decode or raise PeerProtocolError."""
from hypothesis import given, strategies as st

import pytest

from node import peerwire


@pytest.mark.parametrize(
    "msg",
    [
        {"t": "push", "entries": [b"a", b"b"]},
        {"t": "ae", "wall": 1.5, "msg": b"\x00"},
        {"t": "run_now", "task_id": "t1"},
        {"t": "backfill", "task_id": "t", "start": 1, "end": 2, "dry_run": True},
        {"t": "key", "op": "install", "key": "abc"},
        {"t": "reply", "ok": True, "wall": 2.0, "body": {"x": 1}, "error": ""},
    ],
)
def test_round_trip(msg):
    assert peerwire.decode(peerwire.encode(msg)) == msg


@given(st.binary(max_size=512))
def test_random_bytes_never_raise_other_errors(data):
    try:
        peerwire.decode(data)
    except peerwire.PeerProtocolError:
        pass


@given(st.dictionaries(st.sampled_from(["t", "task_id", "start", "end", "dry_run", "ok", "wall", "entries", "op", "key", "msg"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=5),
                                 st.binary(max_size=5), st.lists(st.integers(0, 9), max_size=3))))
def test_random_maps_validated(d):
    import msgpack

    try:
        msg = peerwire.decode(msgpack.packb(d, use_bin_type=True))
    except peerwire.PeerProtocolError:
        return
    # accepted: every declared field has its declared type
    for name, types in peerwire._FIELDS[msg["t"]].items():
        assert isinstance(msg[name], types)


def test_wrong_field_type_named():
    import msgpack

    with pytest.raises(peerwire.PeerProtocolError, match="task_id"):
        peerwire.decode(msgpack.packb({"t": "run_now", "task_id": 7}))
    with pytest.raises(peerwire.PeerProtocolError, match="dry_run"):
        peerwire.decode(msgpack.packb({"t": "backfill", "task_id": "a", "start": 1, "end": 2, "dry_run": 1}))
