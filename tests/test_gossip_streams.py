"""Inbound gossip streams: every cap at its edge, over real TCP sockets.

A node under test runs ``GossipNode`` on 127.0.0.1 with small caps. Hostile
or idle connections are raw TCP streams, from other loopback source
addresses (127.0.0.2, ...) where the test needs several sources; a member's
messages come from a second ``GossipNode`` with the same key, or from a raw
stream sealed by a ``Sealer`` holding that key. Each cap is tested one under
(served) and one over (refused and counted by reason). Conditions are waited
on under generous ``trio.fail_after`` deadlines; no fixed sleeps, except the
pacing of a deliberately slow sender.
"""
from __future__ import annotations

import random
import struct
import tracemalloc
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from gossip.config import Config
from gossip.seal import STREAM_CONTEXT, Keyring, Sealer
from gossip.seal_shell import new_sealer
from gossip.streams import (
    HEAD_FRAME_MAX_BYTES,
    PUSH_PULL,
    READ_CHUNK_BYTES,
    REFUSE_REASONS,
    USER,
    USER_REPLY,
    StreamGate,
    StreamRefused,
    decode_head,
    encode_head,
)
from gossip.transport import FramedStream, TransportStats
from gossip.udp import GossipNode, RequestError
from node.observe.metrics_shell import NodeMetrics

K1 = bytes(range(32))
DEADLINE_S = 30
LEN = struct.Struct(">I")


def small_config(**changes) -> Config:
    base = dict(
        streams_inbound_max=16,
        streams_unauth_max=8,
        streams_unauth_per_source_max=2,
        stream_head_timeout_s=DEADLINE_S,  # idle test connections stay until closed
        stream_timeout_s=DEADLINE_S,
        request_frame_max_bytes=64 * 1024,
        stream_buffer_budget_bytes=1024 * 1024,
        stream_members_min=16,
    )
    base.update(changes)
    return Config.local().replace(**base)


async def wait_for(cond, what: str, timeout_s: float = DEADLINE_S) -> None:
    try:
        with trio.fail_after(timeout_s):
            while not cond():
                await trio.sleep(0.005)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}") from None


class Holder:
    """A node whose stream handler answers b'ok', or waits on ``release``
    when the request is b'hold'."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.held = 0

    async def handle(self, sender: str, data: bytes) -> bytes:
        if data == b"hold":
            self.held += 1
            await self.release.wait()
        return b"ok"


@asynccontextmanager
async def node_pair(config: Config):
    """The node under test (with a Holder) and a keyholder client node."""
    async with trio.open_nursery() as nursery:
        server = GossipNode(config, "server", bind=("127.0.0.1", 0), keyring=Keyring([K1]))
        client = GossipNode(config, "client", bind=("127.0.0.1", 0), keyring=Keyring([K1]))
        await nursery.start(server.run)
        await nursery.start(client.run)
        holder = Holder()
        server.set_stream_handler(holder.handle)
        try:
            yield server, client, holder
        finally:
            holder.release.set()
            nursery.cancel_scope.cancel()


def rejected(node: GossipNode) -> dict[str, int]:
    return node.statistics().transport.streams_rejected


def gate(node: GossipNode):
    return node.statistics().streams


async def idle_connection(node: GossipNode, source: str) -> trio.SocketStream:
    """A connection from ``source`` that sends nothing (holds an
    unauthenticated slot if admitted)."""
    return await trio.open_tcp_stream(*node.bound_addr, local_address=source)


async def wait_closed_by_peer(stream: trio.SocketStream) -> None:
    """Read until the server closes the connection."""
    with trio.fail_after(DEADLINE_S):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass


def raw_sealer(name: str = "raw") -> Sealer:
    return new_sealer(Keyring([K1]), name, epoch=random.randrange(1, 2**40), context=STREAM_CONTEXT)


def head_frame(sealer: Sealer, kind: int, body_len: int) -> bytes:
    head = sealer.seal(encode_head(kind, body_len))
    return LEN.pack(len(head)) + head


def body_frame(sealer: Sealer, kind: int, payload: bytes) -> bytes:
    body = sealer.seal(bytes((kind,)) + payload)
    return LEN.pack(len(body)) + body


def body_len_for(sealer: Sealer, payload_len: int) -> int:
    return 1 + payload_len + sealer.overhead()


async def read_reply(stream: trio.SocketStream, sealer: Sealer) -> tuple[int, bytes]:
    framed = FramedStream(stream, ("server", 0), TransportStats())
    with trio.fail_after(DEADLINE_S):
        _s, head = sealer.open(await framed.recv_frame(HEAD_FRAME_MAX_BYTES))
        kind, n = decode_head(head)
        _s, body = sealer.open(await framed.recv_frame(n), max_bytes=n)
    return kind, body[1:]


# -- pure parts ------------------------------------------------------------------


def test_gate_caps_table():
    g = StreamGate(inbound_max=4, unauth_max=3, unauth_per_source_max=2, buffer_budget_bytes=100)
    assert g.admit("a") is None and g.admit("a") is None
    assert g.admit("a") == "too_many_from_source"
    assert g.admit("b") is None
    assert g.admit("c") == "too_many_unauthenticated"
    g.authenticated("a")  # one of a's streams opened its head: a slot frees
    assert g.admit("a") is None
    assert g.admit("d") == "too_many_streams"  # 4 open (one authenticated)
    g.close("a", authenticated=True)
    assert g.statistics().open == 3 and g.statistics().unauthenticated == 3
    assert g.reserve(100) and not g.reserve(1)
    g.release(60)
    assert g.reserve(60) and not g.reserve(1)
    for src in ("a", "a", "b"):
        g.close(src, authenticated=False)
    assert g.statistics() == type(g.statistics())(open=0, unauthenticated=0, sources=0, buffered_bytes=100)


@pytest.mark.parametrize("n,rows", [(1, 1024), (512, 1024), (513, 1026), (1000, 2000), (5000, 10000)])
def test_push_pull_frame_limit_formula(n, rows):
    c = Config.lan()
    assert c.push_pull_row_max_bytes() == c.payload_budget_bytes == 1304
    assert c.push_pull_frame_max_bytes(n) == 512 + 1304 * rows


def test_push_pull_limit_holds_a_full_state_of_1000_members():
    """A 1000-member state whose rows are as large as the core lets a
    member's alive be (it must fit one datagram) fits the limit that a
    member knowing only itself (a joiner) applies."""
    from gossip import wire

    c = Config.lan()
    alive_max = c.payload_budget_bytes - wire.COMPOUND_HEADER_MAX_BYTES - 32  # Swim._check_alive
    rows = []
    for i in range(1000):
        name = f"member-{i:04d}-" + "x" * 36  # 48 bytes, the longest sender name
        meta = bytes(c.meta_max_bytes)
        tags: dict[str, str] = {}
        while True:  # add tag bytes until the alive message is at its largest
            trial = dict(tags, **{f"k{len(tags)}": "v" * 32})
            if len(wire.encode_msg(wire.Alive(1, name, "10.0.0.1", 7946, trial, meta))) > alive_max:
                break
            tags = trial
        row = wire.MemberRecord(name, "10.0.0.1", 7946, 1, tags, meta, wire.WireState.ALIVE)
        assert len(wire.encode_push_pull([row], False)) - len(wire.encode_push_pull([], False)) <= c.push_pull_row_max_bytes()
        rows.append(row)
    sealed = 1 + len(wire.encode_push_pull(rows, False, "member-0000")) + c.seal_overhead_bytes
    assert 1_000_000 < sealed <= c.push_pull_frame_max_bytes(1), (sealed, c.push_pull_frame_max_bytes(1))


def test_config_rejects_budget_below_request_limit():
    with pytest.raises(ValueError, match="stream_buffer_budget_bytes"):
        Config.lan().replace(stream_buffer_budget_bytes=1024)


def test_head_decoding_refuses_what_is_not_a_head():
    assert decode_head(encode_head(USER, 10)) == (USER, 10)
    for bad in (b"", bytes((PUSH_PULL,)) + b"xxxxx", struct.pack(">BBI", 5, 9, 10), struct.pack(">BBI", 5, 1, 0)):
        with pytest.raises(StreamRefused) as info:
            decode_head(bad)
        assert info.value.reason == "malformed"


async def test_frame_read_takes_memory_as_bytes_arrive():
    """A frame announcing 4 MiB of which 100 bytes arrived holds ~one read
    chunk, not 4 MiB."""
    a, b = trio.testing.memory_stream_pair()
    reader = FramedStream(b, ("peer", 1), TransportStats())
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.recv_frame, 8 * 1024 * 1024)
            await a.send_all(LEN.pack(4 * 1024 * 1024) + bytes(100))
            await trio.testing.wait_all_tasks_blocked()
            _current, peak = tracemalloc.get_traced_memory()
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert peak < 4 * READ_CHUNK_BYTES, peak


# -- caps at their edge, real sockets --------------------------------------------------


async def test_per_source_cap_edge():
    async with node_pair(small_config(streams_unauth_per_source_max=2)) as (server, client, _h):
        idle = [await idle_connection(server, "127.0.0.1")]
        await wait_for(lambda: gate(server).unauthenticated == 1, "one idle stream held")
        # under: the second stream from 127.0.0.1 is admitted and served
        assert await client.request(server.bound_addr, b"x") == b"ok"
        idle.append(await idle_connection(server, "127.0.0.1"))
        await wait_for(lambda: gate(server).unauthenticated == 2, "two idle streams held")
        # over: a third from the same address is closed at accept
        with pytest.raises(RequestError):
            await client.request(server.bound_addr, b"x", timeout_s=DEADLINE_S)
        assert rejected(server)["too_many_from_source"] == 1
        # another address still gets in
        idle.append(await idle_connection(server, "127.0.0.2"))
        await wait_for(lambda: gate(server).unauthenticated == 3, "a stream from 127.0.0.2 held")
        # the metric reads the transport statistics
        owner = type("NodeLike", (), {"gossip": server, "snapshot": lambda self: {"gossip": {}}})()
        text = NodeMetrics(owner.snapshot).text().decode()
        assert 'peerd_gossip_streams_rejected_total{reason="too_many_from_source"} 1.0' in text
        for reason in REFUSE_REASONS:
            assert f'peerd_gossip_streams_rejected_total{{reason="{reason}"}}' in text
        for s in idle:
            await s.aclose()
        await wait_for(lambda: gate(server).open == 0, "idle streams released")


async def test_unauthenticated_node_cap_edge():
    cfg = small_config(streams_unauth_max=4, streams_unauth_per_source_max=2)
    async with node_pair(cfg) as (server, client, _h):
        idle = [await idle_connection(server, src) for src in ("127.0.0.2", "127.0.0.2", "127.0.0.3")]
        await wait_for(lambda: gate(server).unauthenticated == 3, "three idle streams held")
        # under: the fourth unauthenticated slot serves a member
        assert await client.request(server.bound_addr, b"x") == b"ok"
        idle.append(await idle_connection(server, "127.0.0.3"))
        await wait_for(lambda: gate(server).unauthenticated == 4, "four idle streams held")
        # over: a fifth, from an address with no stream yet, is refused
        with pytest.raises(RequestError):
            await client.request(server.bound_addr, b"x", timeout_s=DEADLINE_S)
        assert rejected(server)["too_many_unauthenticated"] == 1
        late = await idle_connection(server, "127.0.0.4")
        await wait_closed_by_peer(late)
        assert rejected(server)["too_many_unauthenticated"] == 2
        assert rejected(server)["too_many_from_source"] == 0
        for s in idle:
            await s.aclose()
        await wait_for(lambda: gate(server).open == 0, "idle streams released")
        assert await client.request(server.bound_addr, b"x") == b"ok"


async def test_inbound_streams_cap_edge():
    async with node_pair(small_config(streams_inbound_max=3)) as (server, client, holder):
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(client.request, server.bound_addr, b"hold", DEADLINE_S)
            await wait_for(lambda: holder.held == 2, "two authenticated streams held")
            # under: the third stream is served
            assert await client.request(server.bound_addr, b"x") == b"ok"
            nursery.start_soon(client.request, server.bound_addr, b"hold", DEADLINE_S)
            await wait_for(lambda: holder.held == 3, "three authenticated streams held")
            assert gate(server).open == 3 and gate(server).unauthenticated == 0
            # over: a fourth is closed at accept
            with pytest.raises(RequestError):
                await client.request(server.bound_addr, b"x", timeout_s=DEADLINE_S)
            assert rejected(server)["too_many_streams"] == 1
            holder.release.set()
        assert await client.request(server.bound_addr, b"x") == b"ok"


async def test_head_length_edge():
    async with node_pair(small_config()) as (server, _client, _h):
        # under: a head frame of exactly the limit is read (and fails to open)
        s = await idle_connection(server, "127.0.0.1")
        garbage = b"\x01" + random.Random(1).randbytes(HEAD_FRAME_MAX_BYTES - 1)  # sealed-looking, no key opens it
        await s.send_all(LEN.pack(HEAD_FRAME_MAX_BYTES) + garbage)
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["unauthenticated"] == 1, "garbage head counted")
        assert rejected(server)["oversized"] == 0
        assert server.statistics().rejected["wrong_key"] == 1
        # over: one byte more is refused from its length alone
        s = await idle_connection(server, "127.0.0.1")
        await s.send_all(LEN.pack(HEAD_FRAME_MAX_BYTES + 1))
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["oversized"] == 1, "oversized head counted")
        # an old-style frame announcing 4 MiB is refused the same way
        s = await idle_connection(server, "127.0.0.1")
        await s.send_all(LEN.pack(4 * 1024 * 1024) + bytes(64 * 1024))
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["oversized"] == 2, "4 MiB announcement counted")
        assert server.statistics().transport.tcp_bytes_received < 2 * READ_CHUNK_BYTES + 2 * HEAD_FRAME_MAX_BYTES


async def test_request_body_limit_edge():
    cfg = small_config()
    limit = cfg.request_frame_max_bytes
    async with node_pair(cfg) as (server, client, _h):
        # under: a request whose sealed body is exactly the limit is served
        payload = bytes(limit - 1 - client.stream_sealer.overhead())
        assert await client.request(server.bound_addr, payload) == b"ok"
        # the sending member refuses one byte more itself
        with pytest.raises(RequestError, match="limit"):
            await client.request(server.bound_addr, payload + b"x")
        # over: a head announcing one byte more is refused before the body
        sealer = raw_sealer()
        s = await idle_connection(server, "127.0.0.1")
        await s.send_all(head_frame(sealer, USER, limit + 1))
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["oversized"] == 1, "oversized body counted")


async def test_push_pull_body_limit_edge():
    cfg = small_config()
    async with node_pair(cfg) as (server, _client, _h):
        limit = cfg.push_pull_frame_max_bytes(1)  # the server knows only itself
        assert limit == 512 + 16 * cfg.payload_budget_bytes
        sealer = raw_sealer()
        # under: exactly the limit is read; the (garbage) state goes to the core
        before = server.core.statistics().rejected.get("malformed", 0)
        s = await idle_connection(server, "127.0.0.1")
        payload = bytes(limit - body_len_for(sealer, 0))
        await s.send_all(head_frame(sealer, PUSH_PULL, limit) + body_frame(sealer, PUSH_PULL, payload))
        await wait_closed_by_peer(s)
        await wait_for(lambda: server.core.statistics().rejected.get("malformed", 0) > before,
                       "the core judged the state")
        assert rejected(server)["oversized"] == 0
        # over
        s = await idle_connection(server, "127.0.0.1")
        await s.send_all(head_frame(sealer, PUSH_PULL, limit + 1))
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["oversized"] == 1, "oversized push-pull counted")


async def test_buffer_budget_edge():
    budget = 100 * 1024
    cfg = small_config(stream_buffer_budget_bytes=budget)
    limit = cfg.request_frame_max_bytes
    async with node_pair(cfg) as (server, client, holder):
        ov = client.stream_sealer.overhead()
        async with trio.open_nursery() as nursery:
            # a held request reserves its sealed body
            nursery.start_soon(client.request, server.bound_addr, b"hold" + bytes(0), DEADLINE_S)
            await wait_for(lambda: holder.held == 1, "one request held")
            held_bytes = gate(server).buffered_bytes
            assert held_bytes == 1 + 4 + ov
            # a second held request of the largest size
            sealer = raw_sealer()
            big = bytes(limit - body_len_for(sealer, 0))
            s_big = await idle_connection(server, "127.0.0.1")
            await s_big.send_all(head_frame(sealer, USER, limit))
            await wait_for(lambda: gate(server).buffered_bytes == held_bytes + limit, "big body reserved")
            left = budget - held_bytes - limit
            # under: a body of exactly what is left is served
            s = await idle_connection(server, "127.0.0.1")
            payload = bytes(left - body_len_for(sealer, 0))
            await s.send_all(head_frame(sealer, USER, left) + body_frame(sealer, USER, payload))
            assert await read_reply(s, sealer) == (USER_REPLY, b"ok")
            await s.aclose()
            # over: one byte more is refused
            s = await idle_connection(server, "127.0.0.1")
            await s.send_all(head_frame(sealer, USER, left + 1))
            await wait_closed_by_peer(s)
            await wait_for(lambda: rejected(server)["buffer_budget"] == 1, "budget refusal counted")
            await s_big.send_all(body_frame(sealer, USER, big))
            assert await read_reply(s_big, sealer) == (USER_REPLY, b"ok")
            holder.release.set()
        await wait_for(lambda: gate(server).buffered_bytes == 0, "reservations released")


async def test_head_deadline_edge():
    cfg = small_config(stream_head_timeout_s=1.0)
    async with node_pair(cfg) as (server, _client, _h):
        # under: a head trickled in two pieces within the deadline is served
        sealer = raw_sealer()
        s = await idle_connection(server, "127.0.0.1")
        head = head_frame(sealer, USER, body_len_for(sealer, 2))
        await s.send_all(head[:10])
        await trio.sleep(0.3)  # pacing of a slow sender, well inside 1 s
        await s.send_all(head[10:] + body_frame(sealer, USER, b"hi"))
        assert await read_reply(s, sealer) == (USER_REPLY, b"ok")
        assert rejected(server)["timeout"] == 0
        # over: a connection that sends nothing is dropped at the deadline
        s = await idle_connection(server, "127.0.0.1")
        t0 = trio.current_time()
        await wait_closed_by_peer(s)
        assert trio.current_time() - t0 >= 0.9
        await wait_for(lambda: rejected(server)["timeout"] == 1, "head timeout counted")
        assert gate(server).open == 0


async def test_message_deadline_for_a_stalled_body():
    cfg = small_config(stream_timeout_s=1.5, stream_head_timeout_s=1.0)
    async with node_pair(cfg) as (server, _client, _h):
        sealer = raw_sealer()
        s = await idle_connection(server, "127.0.0.1")
        body = body_frame(sealer, USER, bytes(10_000))
        await s.send_all(head_frame(sealer, USER, len(body) - 4) + body[:5000])
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["timeout"] == 1, "stalled body counted")
        assert gate(server).buffered_bytes == 0 and gate(server).open == 0


async def test_body_must_match_its_head():
    async with node_pair(small_config()) as (server, _client, _h):
        sealer = raw_sealer()
        # announced 100, sent a 90-byte frame
        s = await idle_connection(server, "127.0.0.1")
        body = body_frame(sealer, USER, bytes(90 - body_len_for(sealer, 0)))
        await s.send_all(head_frame(sealer, USER, 100) + body)
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["malformed"] == 1, "short body counted")
        # a body sealed by another sender than the head
        other = raw_sealer("other")
        s = await idle_connection(server, "127.0.0.1")
        n = body_len_for(sealer, 5)
        await s.send_all(head_frame(sealer, USER, n) + body_frame(other, USER, bytes(5 + len("raw") - len("other"))))
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["malformed"] == 2, "foreign body counted")


async def test_a_peer_of_an_earlier_release_still_streams():
    """Frames sealed in the datagram context (peers of releases before
    stream frames had their own) are still read and answered; a frame that
    opens in neither context is refused as before."""
    async with node_pair(small_config()) as (server, _client, _h):
        legacy = new_sealer(Keyring([K1]), "old", epoch=random.randrange(1, 2**40))
        s = await idle_connection(server, "127.0.0.1")
        await s.send_all(head_frame(legacy, USER, body_len_for(legacy, 2)) + body_frame(legacy, USER, b"hi"))
        assert await read_reply(s, raw_sealer()) == (USER_REPLY, b"ok")
        assert rejected(server)["unauthenticated"] == 0
        stranger = new_sealer(Keyring([b"z" * 32]), "stranger", epoch=1, context=STREAM_CONTEXT)
        s = await idle_connection(server, "127.0.0.1")
        await s.send_all(head_frame(stranger, USER, body_len_for(stranger, 2)))
        await wait_closed_by_peer(s)
        await wait_for(lambda: rejected(server)["unauthenticated"] == 1, "stranger refused")
