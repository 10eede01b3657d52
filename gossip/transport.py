"""Transports: best-effort packets and reliable framed streams (trio shell code).

After memberlist's ``transport.go``: packets may be lost, duplicated or
reordered; streams are reliable and ordered. Two implementations:

* ``UdpTcpTransport``: one UDP socket and one TCP listener on the same port
  (IPv4 or IPv6). Binding to port 0 binds UDP first, then TCP on the port UDP
  got, retrying on a conflict.
* ``MemoryNetwork``: in-process transports wired to each other over trio
  memory channels (memberlist's ``MockNetwork``, trio's private ``FakeNet``),
  with a ``route_packet`` fault hook, for shell tests under ``MockClock``.

Streams carry length-prefixed frames: 4-byte big-endian length, then the
payload. A frame announced longer than the reader's ``max_bytes`` (default
4 MiB) drops the connection and is counted (``frames_oversized``); a frame
is read in chunks of at most ``READ_CHUNK_BYTES`` (64 KiB), so it takes
memory as its bytes arrive, not as its header announces. What a message on
a stream looks like, and which limits apply, is ``gossip/streams.py``.

Nothing here decides protocol; it moves bytes and counts them.
"""
from __future__ import annotations

import errno
import ipaddress
import socket as _stdsocket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

import trio
import trio.testing

from gossip.addr import format_addr
from gossip.effects import Addr
from gossip.streams import READ_CHUNK_BYTES, REFUSE_REASONS

__all__ = [
    "Addr",
    "FrameTooLarge",
    "FramedStream",
    "MemoryNetwork",
    "MemoryTransport",
    "Stream",
    "StreamClosed",
    "Transport",
    "TransportStats",
    "UdpTcpTransport",
    "MAX_FRAME_BYTES",
    "MAX_DATAGRAM_BYTES",
]

MAX_FRAME_BYTES = 4 * 1024 * 1024
"""Frame limit of ``send_frame``/``recv_frame`` when the caller gives none.
The gossip shell passes the limits derived in ``gossip/config.py``
(``push_pull_frame_max_bytes(n)``, ``request_frame_max_bytes``) and reads
a frame only after its sealed head opened (``gossip/streams.py``)."""

MAX_DATAGRAM_BYTES = 65535
_LEN = struct.Struct(">I")
_BIND_RETRIES = 32
_PACKET_QUEUE = 1024  # memory transport: datagrams buffered per receiver (then dropped, as UDP does)


class StreamClosed(Exception):
    """The peer closed the stream (or it broke) before a full frame arrived."""


class FrameTooLarge(Exception):
    """A frame header announced more than the allowed bytes."""


@dataclass
class TransportStats:
    """Counters (monotonic) for one transport."""

    udp_packets_sent: int = 0
    udp_bytes_sent: int = 0
    udp_packets_received: int = 0
    udp_bytes_received: int = 0
    udp_send_errors: int = 0
    udp_max_datagram_bytes: int = 0
    tcp_bytes_sent: int = 0
    tcp_bytes_received: int = 0
    streams_opened: int = 0
    streams_accepted: int = 0
    frames_oversized: int = 0
    streams_rejected: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REFUSE_REASONS})
    """Inbound streams closed by the gossip shell, by reason
    (``gossip.streams.REFUSE_REASONS``)."""

    def reject_stream(self, reason: str) -> None:
        self.streams_rejected[reason] = self.streams_rejected.get(reason, 0) + 1

    def snapshot(self) -> "TransportStats":
        copy = {f.name: getattr(self, f.name) for f in fields(self)}
        copy["streams_rejected"] = dict(self.streams_rejected)
        return TransportStats(**copy)


def _family_of(host: str) -> int | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return _stdsocket.AF_INET6 if ip.version == 6 else _stdsocket.AF_INET


# -- streams -----------------------------------------------------------------


class Stream(Protocol):
    """A reliable, ordered, framed byte stream."""

    peer: Addr

    async def send_frame(self, data: bytes) -> None: ...

    async def recv_frame(self, max_bytes: int = MAX_FRAME_BYTES) -> bytes: ...

    async def aclose(self) -> None: ...


class FramedStream:
    """Length-prefixed frames over any trio ``Stream``.

    Args:
        stream: the underlying byte stream.
        peer: remote address (for logs; for TCP an ephemeral port).
        stats: counters to update.
    """

    def __init__(self, stream: trio.abc.Stream, peer: Addr, stats: TransportStats) -> None:
        self._stream = stream
        self.peer = peer
        self._stats = stats
        self._buf = bytearray()

    async def send_frame(self, data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> None:
        """Send one frame.

        Raises:
            FrameTooLarge: ``data`` is over ``max_bytes`` (nothing sent).
            StreamClosed: the connection broke.
        """
        if len(data) > max_bytes:
            raise FrameTooLarge(f"refusing to send {len(data)} bytes (limit {max_bytes})")
        payload = _LEN.pack(len(data)) + data
        try:
            await self._stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise StreamClosed(str(exc)) from None
        self._stats.tcp_bytes_sent += len(payload)

    async def _read_exactly(self, n: int) -> bytes:
        # Ask for at most one chunk at a time: socket.recv(k) allocates k
        # bytes before it knows how many arrive.
        buf = self._buf
        while len(buf) < n:
            try:
                chunk = await self._stream.receive_some(READ_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise StreamClosed(str(exc)) from None
            if not chunk:
                raise StreamClosed("peer closed the stream")
            self._stats.tcp_bytes_received += len(chunk)
            buf += chunk
        if len(buf) == n:
            out = bytes(buf)
            buf.clear()
            return out
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def recv_frame(self, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
        """Read one frame.

        Raises:
            StreamClosed: EOF or a broken connection.
            FrameTooLarge: the header announced more than ``max_bytes``
                (counted; the caller must drop the connection).
        """
        (length,) = _LEN.unpack(await self._read_exactly(_LEN.size))
        if length > max_bytes:
            self._stats.frames_oversized += 1
            raise FrameTooLarge(f"frame of {length} bytes > {max_bytes}")
        return await self._read_exactly(length)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass


StreamHandler = Callable[[FramedStream], Awaitable[None]]


class Transport(Protocol):
    """What the gossip shell needs from a network."""

    local_addr: Addr
    stats: TransportStats

    async def send_to(self, addr: Addr, data: bytes) -> None:
        """Send one datagram, best effort. Never raises for network errors."""

    async def recv(self) -> tuple[Addr, bytes]:
        """Next datagram ``(source address, bytes)``."""

    async def connect(self, addr: Addr) -> FramedStream:
        """Open a framed stream. Raises ``OSError`` on failure."""

    async def serve_streams(
        self, handler: StreamHandler, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept streams until cancelled, running ``handler`` for each in
        its own task; the handler owns (and closes) the stream."""

    async def aclose(self) -> None: ...


# -- UDP + TCP ---------------------------------------------------------------


class UdpTcpTransport:
    """A UDP socket and a TCP listener bound to the same host and port.

    Build with ``await UdpTcpTransport.open(bind)``.
    """

    def __init__(self, udp: trio.socket.SocketType, listener: trio.SocketListener, local_addr: Addr) -> None:
        self._udp = udp
        self._listener = listener
        self.local_addr = local_addr
        self.family = udp.family
        self.stats = TransportStats()
        self._resolved: dict[Addr, tuple] = {}

    @classmethod
    async def open(cls, bind: Addr) -> "UdpTcpTransport":
        """Bind UDP then TCP on ``bind`` (port 0: any free port, same for both).

        Raises:
            OSError: the address cannot be bound (message names it).
        """
        host, port = bind
        family = _family_of(host)
        if family is None:
            infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_DGRAM)
            if not infos:
                raise OSError(f"cannot resolve bind host {host!r}")
            family = infos[0][0]
            host = infos[0][4][0]
        last_exc: OSError | None = None
        for _ in range(_BIND_RETRIES if port == 0 else 1):
            udp = trio.socket.socket(family, _stdsocket.SOCK_DGRAM)
            tcp = None
            try:
                if family == _stdsocket.AF_INET6:
                    udp.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
                await udp.bind((host, port))
                bound_port = udp.getsockname()[1]
                tcp = trio.socket.socket(family, _stdsocket.SOCK_STREAM)
                tcp.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
                if family == _stdsocket.AF_INET6:
                    tcp.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
                await tcp.bind((host, bound_port))
                tcp.listen(128)
            except OSError as exc:
                udp.close()
                if tcp is not None:
                    tcp.close()
                last_exc = exc
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue
                raise OSError(exc.errno, f"cannot bind {format_addr(bind)}: {exc.strerror}") from None
            return cls(udp, trio.SocketListener(tcp), (host, bound_port))
        raise OSError(
            errno.EADDRINUSE, f"cannot bind {format_addr(bind)}: no free UDP+TCP port pair ({last_exc})"
        )

    async def _resolve(self, addr: Addr) -> tuple | None:
        cached = self._resolved.get(addr)
        if cached is not None:
            return cached
        host, port = addr
        fam = _family_of(host)
        if fam == self.family:
            target: tuple = (host, port)
        else:
            try:
                infos = await trio.socket.getaddrinfo(
                    host, port, family=self.family, type=_stdsocket.SOCK_DGRAM
                )
            except OSError:
                return None
            if not infos:
                return None
            target = infos[0][4]
        if len(self._resolved) > 4096:
            self._resolved.clear()
        self._resolved[addr] = target
        return target

    async def send_to(self, addr: Addr, data: bytes) -> None:
        target = await self._resolve(addr)
        if target is None:
            self.stats.udp_send_errors += 1
            return
        try:
            await self._udp.sendto(data, target)
        except OSError:
            self.stats.udp_send_errors += 1
            return
        self.stats.udp_packets_sent += 1
        self.stats.udp_bytes_sent += len(data)
        if len(data) > self.stats.udp_max_datagram_bytes:
            self.stats.udp_max_datagram_bytes = len(data)

    async def recv(self) -> tuple[Addr, bytes]:
        while True:
            try:
                data, src = await self._udp.recvfrom(MAX_DATAGRAM_BYTES)
            except ConnectionResetError:
                continue  # ICMP port unreachable surfacing on some platforms
            self.stats.udp_packets_received += 1
            self.stats.udp_bytes_received += len(data)
            return (src[0], src[1]), data

    async def connect(self, addr: Addr) -> FramedStream:
        host, port = addr
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            raise
        except Exception as exc:  # e.g. gaierror subclasses are OSError; be safe
            raise OSError(str(exc)) from None
        self.stats.streams_opened += 1
        return FramedStream(stream, addr, self.stats)

    async def serve_streams(
        self, handler: StreamHandler, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await self._listener.accept()
                except OSError:
                    # EMFILE and friends: back off briefly instead of spinning
                    await trio.sleep(0.05)
                    continue
                self.stats.streams_accepted += 1
                try:
                    peer = stream.socket.getpeername()
                    peer_addr: Addr = (peer[0], peer[1])
                except OSError:
                    peer_addr = ("?", 0)
                nursery.start_soon(handler, FramedStream(stream, peer_addr, self.stats))

    async def aclose(self) -> None:
        self._udp.close()
        with trio.CancelScope(shield=True):
            await self._listener.aclose()


# -- in-memory network -----------------------------------------------------------


class MemoryNetwork:
    """In-process network of ``MemoryTransport``s (for shell tests).

    ``route_packet(src, dst, data)`` is called for every datagram; the
    default delivers it. Replace it to drop, duplicate or rewrite packets;
    call ``deliver(src, dst, data)`` to hand one on. ``route_stream(src, dst)``
    returns False to refuse a stream connection (partition).
    """

    def __init__(self) -> None:
        self._transports: dict[Addr, MemoryTransport] = {}
        self.route_packet: Callable[[Addr, Addr, bytes], None] = self.deliver
        self.route_stream: Callable[[Addr, Addr], bool] = lambda src, dst: True
        self.packets_dropped = 0
        self._next_port = 7000

    def transport(self, addr: Addr | None = None) -> "MemoryTransport":
        """A new transport at ``addr`` (port 0 or None: the next free port)."""
        if addr is None:
            addr = ("10.0.0.1", 0)
        if addr[1] == 0:
            self._next_port += 1
            addr = (addr[0], self._next_port)
        if addr in self._transports:
            raise OSError(errno.EADDRINUSE, f"{format_addr(addr)} already in use")
        t = MemoryTransport(self, addr)
        self._transports[addr] = t
        return t

    def deliver(self, src: Addr, dst: Addr, data: bytes) -> None:
        """Put a datagram in ``dst``'s queue (dropped if absent or full)."""
        t = self._transports.get(dst)
        if t is None or t._closed:
            self.packets_dropped += 1
            return
        try:
            t._packets_send.send_nowait((src, data))
        except trio.WouldBlock:
            self.packets_dropped += 1
            return
        t.stats.udp_packets_received += 1
        t.stats.udp_bytes_received += len(data)

    def _unregister(self, t: "MemoryTransport") -> None:
        if self._transports.get(t.local_addr) is t:
            del self._transports[t.local_addr]


class MemoryTransport:
    """One endpoint of a ``MemoryNetwork``."""

    def __init__(self, network: MemoryNetwork, addr: Addr) -> None:
        self.network = network
        self.local_addr = addr
        self.stats = TransportStats()
        self._packets_send, self._packets_recv = trio.open_memory_channel[tuple[Addr, bytes]](_PACKET_QUEUE)
        self._streams_send, self._streams_recv = trio.open_memory_channel[FramedStream](64)
        self._closed = False

    async def send_to(self, addr: Addr, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            return
        self.stats.udp_packets_sent += 1
        self.stats.udp_bytes_sent += len(data)
        self.stats.udp_max_datagram_bytes = max(self.stats.udp_max_datagram_bytes, len(data))
        self.network.route_packet(self.local_addr, addr, bytes(data))

    async def recv(self) -> tuple[Addr, bytes]:
        return await self._packets_recv.receive()

    async def connect(self, addr: Addr) -> FramedStream:
        await trio.lowlevel.checkpoint()
        target = self.network._transports.get(addr)
        if target is None or target._closed or not self.network.route_stream(self.local_addr, addr):
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"connection to {format_addr(addr)} refused")
        a, b = trio.testing.memory_stream_pair()
        try:
            target._streams_send.send_nowait(FramedStream(b, self.local_addr, target.stats))
        except trio.WouldBlock:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "backlog full") from None
        self.stats.streams_opened += 1
        return FramedStream(a, addr, self.stats)

    async def serve_streams(
        self, handler: StreamHandler, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for stream in self._streams_recv:
                self.stats.streams_accepted += 1
                nursery.start_soon(handler, stream)

    async def aclose(self) -> None:
        self._closed = True
        self.network._unregister(self)
        await trio.lowlevel.checkpoint()
