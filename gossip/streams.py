"""Stream messages and inbound stream admission (sans-IO).

No sockets, no clock, no trio: the shell (``gossip/udp.py``) asks
``StreamGate`` before it reads and tells it what happened; this module
decides.

Theory of operation
-------------------
A gossip stream (TCP) carries messages; each message is two length-prefixed
frames (4-byte big-endian length, then the bytes)::

    head frame:  seal(HEAD | kind | body length (uint32 BE))   <= HEAD_FRAME_MAX_BYTES
    body frame:  seal(kind | payload)                          == the announced length

``kind`` is ``PUSH_PULL``, ``USER`` (a request), ``USER_REPLY`` or
``USER_ERROR``. The head is sealed like a datagram (AES-GCM, sender name,
boot epoch, sequence number under the replay window), so opening it proves
the peer holds a key of the ring before the node sizes any buffer from what
it says. Without the head, the 4-byte length of a frame is the only thing
readable before the whole frame is in memory: the AES-GCM envelope hides
the sender and authenticates only once complete.

Rules
-----
1. Admission, at accept, before a byte is read (``StreamGate.admit``): a
   stream is refused when ``streams_inbound_max`` streams are open
   (``too_many_streams``), when ``streams_unauth_max`` streams are still
   unauthenticated (``too_many_unauthenticated``), or when
   ``streams_unauth_per_source_max`` of those come from the same IP address
   (``too_many_from_source``).
2. The head: its announced length is checked against
   ``HEAD_FRAME_MAX_BYTES`` before it is read (``oversized``); it must arrive
   within ``stream_head_timeout_s`` (``timeout``); it must open under the
   keyring (``unauthenticated``; the seal's own reason is also counted in
   the packet rejections) and decode (``malformed``). Then, and only then,
   the stream leaves the unauthenticated caps (``StreamGate.authenticated``).
3. The body: an announced length over the kind's limit is ``oversized``
   (push-pull: ``Config.push_pull_frame_max_bytes(n)``; requests, replies and
   errors: ``Config.request_frame_max_bytes``); more than what is left of
   ``stream_buffer_budget_bytes`` is ``buffer_budget``. The body frame's
   length must equal the announcement and the body must open as the same
   sender and kind (``malformed``). It is read in chunks of at most
   ``READ_CHUNK_BYTES``; the whole message must arrive within
   ``stream_timeout_s`` of accept (``timeout``).
4. Every refusal closes the connection and is counted once by reason
   (``REFUSE_REASONS``, ``peerd_gossip_streams_rejected_total{reason}``).

Memory an inbound stream can make the node hold: unauthenticated, at most
``HEAD_FRAME_MAX_BYTES + READ_CHUNK_BYTES``; authenticated, its reserved
body (all of them together <= ``stream_buffer_budget_bytes``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PUSH_PULL", "USER", "USER_REPLY", "USER_ERROR", "HEAD", "KINDS",
    "HEAD_FRAME_MAX_BYTES", "READ_CHUNK_BYTES", "REFUSE_REASONS",
    "StreamRefused", "StreamGate", "GateStatistics", "encode_head", "decode_head",
]

# Type bytes of the plaintext of a stream frame (append only).
PUSH_PULL: Final = 1
USER: Final = 2
USER_REPLY: Final = 3
USER_ERROR: Final = 4
HEAD: Final = 5
KINDS: Final = (PUSH_PULL, USER, USER_REPLY, USER_ERROR)

_HEAD_BODY = struct.Struct(">BBI")  # HEAD, kind, body length

HEAD_FRAME_MAX_BYTES: Final = 128
"""Largest head frame: 1 version + 12 nonce + 16 tag + 1 + 48 (sender
name) + 16 (epoch, seq) + 6 (head body) = 100 bytes sealed, 84 insecure;
rounded up."""

READ_CHUNK_BYTES: Final = 64 * 1024
"""Most bytes asked of the socket per read: a frame grows only by what
actually arrived, never by what its header announced."""

REFUSE_REASONS: Final = (
    "too_many_streams",
    "too_many_unauthenticated",
    "too_many_from_source",
    "oversized",
    "timeout",
    "unauthenticated",
    "malformed",
    "buffer_budget",
)


class StreamRefused(Exception):
    """An inbound stream message is refused; ``reason`` is in REFUSE_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REFUSE_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def encode_head(kind: int, body_len: int) -> bytes:
    """Plaintext of a head announcing a body of ``body_len`` sealed bytes."""
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind}")
    if not 0 < body_len <= 0xFFFFFFFF:
        raise ValueError(f"body length {body_len} out of range")
    return _HEAD_BODY.pack(HEAD, kind, body_len)


def decode_head(body: bytes) -> tuple[int, int]:
    """``(kind, body length)`` from an opened head.

    Raises:
        StreamRefused: ``malformed`` (not a head, unknown kind, length 0).
    """
    if len(body) != _HEAD_BODY.size:
        raise StreamRefused("malformed", f"head of {len(body)} bytes, expected {_HEAD_BODY.size}")
    tag, kind, body_len = _HEAD_BODY.unpack(body)
    if tag != HEAD:
        raise StreamRefused("malformed", f"first frame of type {tag}, expected a head")
    if kind not in KINDS:
        raise StreamRefused("malformed", f"unknown stream kind {kind}")
    if body_len == 0:
        raise StreamRefused("malformed", "empty body announced")
    return kind, body_len


@dataclass(frozen=True)
class GateStatistics:
    """What a ``StreamGate`` holds now."""

    open: int
    unauthenticated: int
    sources: int
    buffered_bytes: int


class StreamGate:
    """Counts inbound streams and decides admission (rule 1) and body
    reservations (rule 3, ``buffer_budget``).

    Args:
        inbound_max: ``Config.streams_inbound_max``.
        unauth_max: ``Config.streams_unauth_max``.
        unauth_per_source_max: ``Config.streams_unauth_per_source_max``.
        buffer_budget_bytes: ``Config.stream_buffer_budget_bytes``.

    A stream admitted from ``source`` must end with exactly one
    ``close(source, authenticated)``; ``authenticated`` says whether
    ``authenticated(source)`` was called for it.
    """

    def __init__(self, *, inbound_max: int, unauth_max: int, unauth_per_source_max: int,
                 buffer_budget_bytes: int) -> None:
        self.inbound_max = inbound_max
        self.unauth_max = unauth_max
        self.unauth_per_source_max = unauth_per_source_max
        self.buffer_budget_bytes = buffer_budget_bytes
        self._open = 0
        self._unauth = 0
        self._by_source: dict[str, int] = {}  # unauthenticated streams per source; no zero entries
        self._buffered = 0

    @classmethod
    def from_config(cls, config) -> "StreamGate":
        return cls(
            inbound_max=config.streams_inbound_max,
            unauth_max=config.streams_unauth_max,
            unauth_per_source_max=config.streams_unauth_per_source_max,
            buffer_budget_bytes=config.stream_buffer_budget_bytes,
        )

    def admit(self, source: str) -> str | None:
        """Take an unauthenticated slot for a stream from ``source`` (an IP
        address); return the refusal reason instead when over a cap."""
        if self._open >= self.inbound_max:
            return "too_many_streams"
        if self._unauth >= self.unauth_max:
            return "too_many_unauthenticated"
        held = self._by_source.get(source, 0)
        if held >= self.unauth_per_source_max:
            return "too_many_from_source"
        self._open += 1
        self._unauth += 1
        self._by_source[source] = held + 1
        return None

    def _drop_unauth(self, source: str) -> None:
        self._unauth -= 1
        held = self._by_source[source] - 1
        if held:
            self._by_source[source] = held
        else:
            del self._by_source[source]

    def authenticated(self, source: str) -> None:
        """The stream's head opened: it leaves the unauthenticated caps."""
        self._drop_unauth(source)

    def close(self, source: str, authenticated: bool) -> None:
        """The stream ended."""
        self._open -= 1
        if not authenticated:
            self._drop_unauth(source)

    def reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of body buffer; False when over the budget."""
        if nbytes < 0 or self._buffered + nbytes > self.buffer_budget_bytes:
            return False
        self._buffered += nbytes
        return True

    def release(self, nbytes: int) -> None:
        """Give back a reservation."""
        self._buffered -= nbytes
        assert self._buffered >= 0, self._buffered

    def statistics(self) -> GateStatistics:
        return GateStatistics(
            open=self._open,
            unauthenticated=self._unauth,
            sources=len(self._by_source),
            buffered_bytes=self._buffered,
        )
