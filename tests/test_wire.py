"""Codec: round trips, and hostile bytes only ever raise RemoteProtocolError."""
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.wire import (
    Ack, Alive, Dead, IndirectPing, LocalProtocolError, MemberRecord, Nack, Ping,
    RemoteProtocolError, Suspect, UnknownMsg, User, WireState,
)

names = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S"), include_characters=" "),
                min_size=1, max_size=32)
u64 = st.integers(0, wire.UINT64_MAX)
ports = st.integers(0, 65535)
hosts = st.sampled_from(["127.0.0.1", "::1", "10.0.0.7", "node-a.example"])
tags = st.dictionaries(names.filter(lambda s: len(s) <= 16), st.text(max_size=20), max_size=5)
meta = st.binary(max_size=wire.META_MAX_BYTES)

msgs = st.one_of(
    st.builds(Ping, u64, names, names),
    st.builds(IndirectPing, u64, names, hosts, ports, st.booleans(), names),
    st.builds(Ack, u64),
    st.builds(Nack, u64),
    st.builds(Suspect, u64, names, names),
    st.builds(Alive, u64, names, hosts, ports, tags, meta),
    st.builds(Dead, u64, names, names),
    st.builds(User, names, st.text(max_size=10), st.binary(max_size=200)),
)
records = st.builds(MemberRecord, names, hosts, ports, u64, tags, meta, st.sampled_from(WireState))


@given(st.lists(msgs, max_size=12))
def test_compound_round_trip(ms):
    data = wire.encode_compound(ms)
    assert wire.decode_compound(data) == ms
    assert sum(wire.encoded_size(m) for m in ms) + (1 if len(ms) < 16 else 3) == len(data)


@settings(max_examples=50)
@given(st.lists(records, max_size=8), st.booleans(), names)
def test_push_pull_round_trip(rs, join, sender):
    pp = wire.decode_push_pull(wire.encode_push_pull(rs, join, sender))
    assert pp.members == tuple(rs) and pp.join == join and pp.sender == sender


def _only_remote(fn, data):
    try:
        fn(data)
    except RemoteProtocolError as exc:
        assert exc.reason in {"malformed", "oversized", "unknown_version"}


@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_other(data):
    _only_remote(wire.decode_compound, data)
    _only_remote(wire.decode_push_pull, data)


@given(st.lists(msgs, min_size=1, max_size=6), st.data())
def test_truncations_and_bit_flips(ms, data):
    enc = wire.encode_compound(ms)
    cut = data.draw(st.integers(0, len(enc) - 1))
    _only_remote(wire.decode_compound, enc[:cut])
    pos = data.draw(st.integers(0, len(enc) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(enc)
    flipped[pos] ^= 1 << bit
    _only_remote(wire.decode_compound, bytes(flipped))


@given(st.lists(records, min_size=1, max_size=4), st.data())
def test_push_pull_truncations_and_flips(rs, data):
    enc = wire.encode_push_pull(rs, False, "x")
    cut = data.draw(st.integers(0, len(enc) - 1))
    _only_remote(wire.decode_push_pull, enc[:cut])
    pos = data.draw(st.integers(0, len(enc) - 1))
    flipped = bytearray(enc)
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    _only_remote(wire.decode_push_pull, bytes(flipped))


# well-formed msgpack of the wrong shape
shapes = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
              st.text(max_size=20), st.binary(max_size=20)),
    lambda ch: st.one_of(st.lists(ch, max_size=8), st.dictionaries(st.text(max_size=5), ch, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=50)
@given(st.lists(st.one_of(shapes, st.lists(shapes, max_size=7).map(lambda l: [5] + l)), max_size=5))
def test_wrong_shapes_are_remote_errors(items):
    try:
        data = msgpack.packb(items, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    _only_remote(wire.decode_compound, data)
    _only_remote(wire.decode_push_pull, data)


@pytest.mark.parametrize("bad", [
    [[5, -1, "n", "h", 1, {}, b""]],                 # negative incarnation
    [[5, 1, "", "h", 1, {}, b""]],                   # empty name
    [[5, 1, "n" * 129, "h", 1, {}, b""]],            # long name
    [[5, 1, "n", "h", 70000, {}, b""]],              # bad port
    [[5, 1, "n", "h", 1, {"k": 1}, b""]],            # tag value not str
    [[5, 1, "n", "h", 1, {}, b"x" * 513]],           # meta too big
    [[5, True, "n", "h", 1, {}, b""]],               # bool is not an int
    [[0, 1, "a"]],                                   # ping arity
    [[1, 1, "t", "h", 1, 1, "s"]],                   # nack flag not bool
    [[8, 1, True, "s", []]],                         # push-pull inside a datagram
    [["x"]],
    [[]],
    {"a": 1},
])
def test_specific_malformed(bad):
    data = msgpack.packb(bad, use_bin_type=True)
    with pytest.raises(RemoteProtocolError) as ei:
        wire.decode_compound(data)
    assert ei.value.reason == "malformed"


def test_unknown_type_is_skippable():
    data = msgpack.packb([[99, "future"], [2, 7]], use_bin_type=True)
    assert wire.decode_compound(data) == [UnknownMsg(99), Ack(7)]


def test_oversized_and_version():
    with pytest.raises(RemoteProtocolError) as ei:
        wire.decode_compound(b"\x90" + b"\x00" * (70 * 1024))
    assert ei.value.reason == "oversized"
    with pytest.raises(RemoteProtocolError) as ei:
        wire.decode_push_pull(msgpack.packb([8, 99, False, "s", []]))
    assert ei.value.reason == "unknown_version"


def test_local_errors_on_bad_fields():
    with pytest.raises(LocalProtocolError):
        Alive(1, "n", "h", 1, {}, b"x" * 600)
    with pytest.raises(LocalProtocolError):
        Ping(-1, "a", "b")
    with pytest.raises(LocalProtocolError):
        Suspect(1, "", "b")
    with pytest.raises(LocalProtocolError):
        Alive(1, "n", "h", 1, {"k": 3}, b"")


def test_dead_left_flag_and_tags_read_only():
    assert Dead(3, "a", "a").left and not Dead(3, "a", "b").left
    a = Alive(1, "n", "h", 1, {"k": "v"}, b"")
    with pytest.raises(TypeError):
        a.tags["k"] = "w"  # type: ignore[index]
    assert wire.decode_compound(wire.encode_compound([a]))[0].tags == {"k": "v"}
