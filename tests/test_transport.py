"""Tests for gossip.transport: UDP+TCP on one port, framing, memory network."""
from __future__ import annotations

import socket
import struct

import pytest
import trio

from gossip.transport import (
    FrameTooLarge,
    MemoryNetwork,
    StreamClosed,
    UdpTcpTransport,
)
from gossip.addr import format_addr, parse_addr


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "text, addr",
    [
        ("127.0.0.1:7946", ("127.0.0.1", 7946)),
        ("[::1]:80", ("::1", 80)),
        ("node-a:1", ("node-a", 1)),
    ],
)
def test_parse_and_format(text, addr):
    assert parse_addr(text) == addr
    assert format_addr(addr) == text


@pytest.mark.parametrize("text", ["", "::1:80", "host", "h:x", "h:70000", "[::1", ":5"])
def test_parse_errors_name_the_text(text):
    with pytest.raises(ValueError, match="bad address"):
        parse_addr(text)


def test_parse_default_port():
    assert parse_addr("h", default_port=5) == ("h", 5)
    assert parse_addr("[::1]", default_port=5) == ("::1", 5)


async def echo_frames(stream):
    try:
        while True:
            await stream.send_frame(b"re:" + await stream.recv_frame())
    except (StreamClosed, FrameTooLarge):
        pass
    finally:
        await stream.aclose()


async def _udp_tcp_round_trip(host: str):
    a = await UdpTcpTransport.open((host, 0))
    b = await UdpTcpTransport.open((host, 0))
    try:
        assert a.local_addr[1] != 0 and a.local_addr[0] == host
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_streams, echo_frames)
            with trio.fail_after(10):
                await a.send_to(b.local_addr, b"hello")
                src, data = await b.recv()
                assert data == b"hello" and src == a.local_addr
                s = await a.connect(b.local_addr)  # TCP on the same port as UDP
                await s.send_frame(b"x" * 100_000)
                assert await s.recv_frame() == b"re:" + b"x" * 100_000
                await s.aclose()
            nursery.cancel_scope.cancel()
        assert a.stats.udp_packets_sent == 1 and b.stats.udp_bytes_received == 5
        assert a.stats.tcp_bytes_sent == 100_004 and a.stats.streams_opened == 1
        assert b.stats.streams_accepted == 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_udp_tcp_same_port_ipv4():
    await _udp_tcp_round_trip("127.0.0.1")


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
async def test_udp_tcp_same_port_ipv6():
    await _udp_tcp_round_trip("::1")


async def test_bind_conflict_is_a_clear_error():
    a = await UdpTcpTransport.open(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError, match="cannot bind 127.0.0.1:"):
            await UdpTcpTransport.open(a.local_addr)
    finally:
        await a.aclose()


async def test_oversized_frame_drops_connection():
    b = await UdpTcpTransport.open(("127.0.0.1", 0))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve_streams, echo_frames)
            with trio.fail_after(10):
                raw = await trio.open_tcp_stream(*b.local_addr)
                await raw.send_all(struct.pack(">I", 5 * 1024 * 1024) + b"zz")
                # server closes the connection without replying
                while await raw.receive_some(100):
                    pass
                await raw.aclose()
                while b.stats.frames_oversized == 0:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        await b.aclose()


async def test_send_to_unresolvable_counts_error():
    a = await UdpTcpTransport.open(("127.0.0.1", 0))
    try:
        await a.send_to(("::1", 9), b"x")  # IPv6 target from an IPv4 socket
        await a.send_to(("no-such-host.invalid", 9), b"x")
        assert a.stats.udp_send_errors == 2
    finally:
        await a.aclose()


async def test_memory_network_packets_streams_and_faults(autojump_clock):
    net = MemoryNetwork()
    a, b = net.transport(), net.transport()
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve_streams, echo_frames)
        await a.send_to(b.local_addr, b"one")
        assert await b.recv() == (a.local_addr, b"one")

        dropped = []

        def lossy(src, dst, data):
            if data == b"drop":
                dropped.append(data)
                return
            net.deliver(src, dst, data)
            if data == b"dup":
                net.deliver(src, dst, data)

        net.route_packet = lossy
        for msg in (b"drop", b"dup", b"end"):
            await a.send_to(b.local_addr, msg)
        got = [(await b.recv())[1] for _ in range(3)]
        assert got == [b"dup", b"dup", b"end"] and dropped == [b"drop"]

        s = await a.connect(b.local_addr)
        await s.send_frame(b"hi")
        assert await s.recv_frame() == b"re:hi"
        await s.aclose()

        net.route_stream = lambda src, dst: False
        with pytest.raises(OSError):
            await a.connect(b.local_addr)
        with pytest.raises(OSError):
            await a.connect(("10.9.9.9", 1))
        nursery.cancel_scope.cancel()
