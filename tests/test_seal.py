"""Tests for gossip.seal: envelope, keyring rotation, rejection reasons, replay window."""
from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip.seal import (
    EVICT_BATCH,
    MAX_SENDER_NAME_BYTES,
    MAX_TRACKED_SENDERS,
    REJECT_REASONS,
    REPLAY_WINDOW,
    Keyring,
    KeyringError,
    PacketRejected,
    Sealer,
)
from gossip.seal_shell import generate_key, new_sealer, read_keyring

K1 = bytes(range(32))
K2 = bytes(range(1, 17))
K3 = bytes(range(2, 26))


def det_nonce(seed: int = 0):
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def pair(keys_a=(K1,), keys_b=(K1,), **kw):
    a = Sealer(Keyring(list(keys_a)), "alpha", 1000, nonce=det_nonce(1), **kw)
    b = Sealer(Keyring(list(keys_b)), "beta", 2000, nonce=det_nonce(2), **kw)
    return a, b


def reason_of(sealer: Sealer, data: bytes) -> str:
    with pytest.raises(PacketRejected) as info:
        sealer.open(data)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


# -- keyring ---------------------------------------------------------------


def test_keyring_basics():
    ring = Keyring([K1, K2, K1])
    assert ring.primary == K1
    assert ring.keys() == [K1, K2]
    ring.install(K3)
    ring.use(K3)
    assert ring.keys() == [K3, K1, K2]
    ring.remove(K1)
    assert ring.keys() == [K3, K2]
    with pytest.raises(KeyringError, match="primary"):
        ring.remove(K3)
    with pytest.raises(KeyringError, match="not installed"):
        ring.use(K1)
    with pytest.raises(KeyringError, match="not installed"):
        ring.remove(K1)
    with pytest.raises(KeyringError, match="16, 24 or 32"):
        ring.install(b"short")
    with pytest.raises(KeyringError):
        Keyring([])
    assert len(Keyring.fingerprint(K1)) == 8
    assert Keyring.fingerprint(K1) != Keyring.fingerprint(K2)


def test_generate_is_a_valid_aes256_key():
    text = generate_key()
    assert len(base64.b64decode(text)) == 32
    assert generate_key() != text
    assert Keyring([Keyring.decode_key(text)]).primary == base64.b64decode(text)


def test_from_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(
        "# cluster keys\n\n"
        f"{base64.b64encode(K1).decode()}  # primary\n"
        f"   {base64.b64encode(K2).decode()}\n"
    )
    ring = read_keyring(path)
    assert ring.keys() == [K1, K2]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("not*base64\n", ":1: key is not valid base64"),
        (f"# c\n{base64.b64encode(b'x' * 10).decode()}\n", ":2: key must be 16, 24 or 32"),
        ("# only a comment\n", "no key found"),
    ],
)
def test_from_file_errors_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "bad.keys"
    path.write_text(content)
    with pytest.raises(KeyringError) as info:
        read_keyring(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_from_file_missing(tmp_path):
    with pytest.raises(KeyringError, match="cannot read"):
        read_keyring(tmp_path / "nope")


# -- sealer construction ----------------------------------------------------


def test_no_key_refuses_to_start():
    with pytest.raises(KeyringError, match="refusing to start"):
        new_sealer(None, "a", 1)
    new_sealer(None, "a", 1, insecure=True)  # explicit opt-in works


@pytest.mark.parametrize("name", ["", "x" * (MAX_SENDER_NAME_BYTES + 1), "é" * 25])
def test_bad_sender_name(name):
    with pytest.raises(ValueError, match="node name"):
        new_sealer(Keyring([K1]), name, 1)


def test_overhead_fits_config_budget():
    s = new_sealer(Keyring([K1]), "n" * MAX_SENDER_NAME_BYTES, 1)
    assert s.overhead(MAX_SENDER_NAME_BYTES) <= 96
    body = b"x" * 100
    assert len(s.seal(body)) == len(body) + s.overhead()
    ins = new_sealer(None, "n", 1, insecure=True)
    assert len(ins.seal(body)) == len(body) + ins.overhead()


# -- round trip and reasons ------------------------------------------------


def test_round_trip_both_ways():
    a, b = pair()
    for i in range(5):
        body = bytes([i]) * (i * 100)
        assert b.open(a.seal(body)) == ("alpha", body)
        assert a.open(b.seal(body)) == ("beta", body)


def test_insecure_round_trip_and_cross_rejection():
    i1 = new_sealer(None, "i1", 5, insecure=True)
    i2 = new_sealer(None, "i2", 5, insecure=True)
    s = new_sealer(Keyring([K1]), "s", 5)
    assert i2.open(i1.seal(b"hello")) == ("i1", b"hello")
    assert reason_of(s, i1.seal(b"x")) == "wrong_key"
    assert reason_of(i1, s.seal(b"x")) == "wrong_key"


def test_wrong_key():
    a, b = pair(keys_b=(K2,))
    assert reason_of(b, a.seal(b"body")) == "wrong_key"


def test_truncated():
    a, b = pair()
    sealed = a.seal(b"body")
    assert reason_of(b, b"") == "truncated"
    assert reason_of(b, sealed[:20]) == "truncated"  # shorter than nonce + tag
    # cut in the ciphertext: fails authentication -> wrong_key (cannot tell apart)
    assert reason_of(b, sealed[:-1]) in ("wrong_key", "truncated")
    ins = new_sealer(None, "i", 1, insecure=True)
    assert reason_of(ins, ins.seal(b"")[:5]) == "truncated"


def test_oversized():
    a, b = pair(max_packet_bytes=200)
    assert reason_of(b, a.seal(b"x" * 300)) == "oversized"
    # a larger per-call limit (stream frames) accepts it
    assert b.open(a.seal(b"x" * 300), max_bytes=1000)[1] == b"x" * 300


def test_unknown_version():
    a, b = pair()
    sealed = a.seal(b"body")
    assert reason_of(b, bytes([7]) + sealed[1:]) == "unknown_version"


def test_malformed_authenticated_header():
    ring = Keyring([K1])
    b = new_sealer(ring, "beta", 1)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = b"\x00" * 12
    # name length 0 inside a correctly sealed packet
    bad = bytes([1]) + nonce + AESGCM(K1).encrypt(nonce, b"\x00" + b"\x00" * 16, b"\x01")
    assert reason_of(b, bad) == "malformed"
    # invalid utf-8 name
    bad = bytes([1]) + nonce + AESGCM(K1).encrypt(nonce, b"\x01\xff" + b"\x00" * 16, b"\x01")
    assert reason_of(b, bad) == "malformed"


def test_version_byte_is_authenticated():
    # flipping the version byte to 0 on a secure receiver is wrong_key; the
    # AAD also binds it, so a future version cannot be spoofed onto v1 data.
    a, b = pair()
    sealed = a.seal(b"body")
    assert reason_of(b, b"\x00" + sealed[1:]) == "wrong_key"


# -- replay ----------------------------------------------------------------


def test_replay_of_captured_packet_rejected():
    a, b = pair()
    p = a.seal(b"ping")
    assert b.open(p)[1] == b"ping"
    assert reason_of(b, p) == "replay"
    assert b.open(a.seal(b"next"))[1] == b"next"
    assert reason_of(b, p) == "replay"


def test_reordering_within_window_accepted():
    a, b = pair()
    packets = [a.seal(bytes([i % 256])) for i in range(300)]
    # shuffle only locally (within 100 positions), as a network would
    order = sorted(range(300), key=lambda i: i + random.Random(i).randint(0, 100))
    for i in order:
        assert b.open(packets[i])[1] == bytes([i % 256])
    for i in order:
        assert reason_of(b, packets[i]) == "replay"


def test_too_old_rejected():
    a, b = pair()
    old = a.seal(b"old")
    for _ in range(REPLAY_WINDOW):
        b.open(a.seal(b"new"))
    assert reason_of(b, old) == "replay"
    # one just inside the window is still accepted
    a2, b2 = pair()
    first = a2.seal(b"x")
    for _ in range(REPLAY_WINDOW - 1):
        b2.open(a2.seal(b"y"))
    assert b2.open(first)[1] == b"x"


def test_restart_epochs():
    ring = Keyring([K1])
    b = new_sealer(ring, "beta", 1)
    old = new_sealer(ring, "alpha", 100)
    captured = old.seal(b"before restart")
    new = new_sealer(ring, "alpha", 200)  # restarted: higher epoch, seq from 1 again
    assert b.open(new.seal(b"hello"))[1] == b"hello"
    assert reason_of(b, captured) == "replay"
    assert b.open(new.seal(b"again"))[1] == b"again"


def test_replay_table_bounded_and_least_recently_heard_evicted():
    ring = Keyring([K1])
    b = new_sealer(ring, "beta", 1)
    senders = [Sealer(ring, f"s{i}", 1, nonce=det_nonce(i)) for i in range(MAX_TRACKED_SENDERS + 10)]
    first = [s.seal(b"first") for s in senders[:3]]
    for p in first:
        b.open(p)
    for s in senders[3:MAX_TRACKED_SENDERS]:
        b.open(s.seal(b"x"))
    assert b.tracked_senders() == MAX_TRACKED_SENDERS
    b.open(senders[0].seal(b"again"))  # s0 heard again: now the most recent
    for s in senders[MAX_TRACKED_SENDERS:]:
        b.open(s.seal(b"x"))
    # one overflow forgot the least recently heard eighth at once
    assert b.tracked_senders() == MAX_TRACKED_SENDERS - EVICT_BATCH + 9
    assert reason_of(b, first[0]) == "replay"  # s0 still tracked
    # s1 and s2 were evicted: their old packet passes once (documented), then not
    assert b.open(first[1])[1] == b"first"
    assert reason_of(b, first[1]) == "replay"
    for s in senders[-10:]:
        p = s.seal(b"y")
        assert b.open(p)[1] == b"y" and reason_of(b, p) == "replay"


class _WindowModel:
    """The replay rule written plainly: per sender the highest epoch and
    every seq accepted in it; a seq is new if unseen and within the window
    below the highest."""

    def __init__(self) -> None:
        self.epoch: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}

    def check(self, sender: str, epoch: int, seq: int) -> bool:
        if sender not in self.epoch or epoch > self.epoch[sender]:
            self.epoch[sender], self.seen[sender] = epoch, {seq}
            return True
        if epoch < self.epoch[sender]:
            return False
        seen = self.seen[sender]
        if seq in seen or seq <= max(seen) - REPLAY_WINDOW:
            return False
        seen.add(seq)
        return True


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 3),
                          st.one_of(st.integers(1, 40), st.integers(1, 3 * REPLAY_WINDOW))),
                max_size=300))
def test_replay_window_matches_the_plain_rule(packets):
    b = new_sealer(Keyring([K1]), "beta", 1)
    model = _WindowModel()
    for i, (sender, epoch, seq) in enumerate(packets):
        try:
            b._check_replay(sender, epoch, seq)
            accepted = True
        except PacketRejected as exc:
            assert exc.reason == "replay"
            accepted = False
        assert accepted == model.check(sender, epoch, seq), f"packet {i}: {(sender, epoch, seq)}"


def test_forged_packets_do_not_touch_replay_window():
    a, b = pair()
    forger = new_sealer(Keyring([K2]), "alpha", 10**12)
    reason_of(b, forger.seal(b"evil"))
    assert b.open(a.seal(b"fine"))[1] == b"fine"


# -- rotation --------------------------------------------------------------


def test_rotation_in_order_never_rejects():
    rings = [Keyring([K1]) for _ in range(3)]
    sealers = [Sealer(r, f"n{i}", 1, nonce=det_nonce(i)) for i, r in enumerate(rings)]

    def all_talk():
        for i, s in enumerate(sealers):
            for j, t in enumerate(sealers):
                if i != j:
                    assert t.open(s.seal(b"m"))[0] == f"n{i}"

    all_talk()
    for r in rings:  # install everywhere
        r.install(K2)
        all_talk()
    for r in rings:  # use everywhere; mixed primaries still open
        r.use(K2)
        all_talk()
    for r in rings:  # remove the old key
        r.remove(K1)
        all_talk()
    assert all(r.keys() == [K2] for r in rings)


def test_rotation_out_of_order_rejects():
    ra, rb = Keyring([K1]), Keyring([K1])
    a = new_sealer(ra, "a", 1)
    b = new_sealer(rb, "b", 1)
    ra.install(K2)
    ra.use(K2)  # b does not have K2 yet
    assert reason_of(b, a.seal(b"m")) == "wrong_key"


# -- fuzz ------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_random_bytes_only_rejected(data):
    _, b = pair()
    try:
        b.open(data)
    except PacketRejected as exc:
        assert exc.reason in REJECT_REASONS


@given(st.binary(max_size=300))
def test_random_bytes_insecure_only_rejected(data):
    ins = new_sealer(None, "i", 1, insecure=True)
    try:
        ins.open(data)
    except PacketRejected as exc:
        assert exc.reason in REJECT_REASONS


@given(body=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=400))
def test_truncations_rejected(body, cut):
    a, b = pair()
    sealed = a.seal(body)
    cut = min(cut, len(sealed) - 1)
    with pytest.raises(PacketRejected):
        b.open(sealed[:cut])


@given(body=st.binary(max_size=200), bit=st.integers(min_value=0))
def test_bit_flips_rejected(body, bit):
    a, b = pair()
    sealed = bytearray(a.seal(body))
    bit %= len(sealed) * 8
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(PacketRejected):
        b.open(bytes(sealed))


def test_stream_frames_count_apart_from_datagrams():
    """A stream frame sealed before a burst of datagrams still opens: stream
    frames have their own sequence numbers and replay table (context
    ``STREAM_CONTEXT``). A frame of one context never opens in the other."""
    from gossip.seal import REPLAY_WINDOW, STREAM_CONTEXT
    ring = Keyring([b"k" * 32])
    dgram, stream = new_sealer(ring, "alpha", 7), new_sealer(ring, "alpha", 7, context=STREAM_CONTEXT)
    rd, rs = new_sealer(ring, "beta", 9), new_sealer(ring, "beta", 9, context=STREAM_CONTEXT)
    head = stream.seal(b"head")                 # waits in the accept queue...
    for _ in range(2 * REPLAY_WINDOW):          # ...while datagrams go by
        rd.open(dgram.seal(b"ping"))
    assert rs.open(head) == ("alpha", b"head")
    for frame, wrong in ((stream.seal(b"x"), rd), (dgram.seal(b"y"), rs)):
        with pytest.raises(PacketRejected):
            wrong.open(frame)
