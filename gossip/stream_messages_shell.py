"""Stream messages (shell): one sealed message over a framed stream, a head
announcing the sealed body's length then the body, both sealed by the stream
sealer (``StreamMessages``).

A message is ``seal(head)`` then ``seal(kind byte + payload)``; the head
(:func:`gossip.streams.encode_head`) carries the kind and the body's length,
so a receiver refuses an oversized body before reading it. Limits per kind:
push-pull bodies scale with the members known
(``Config.push_pull_frame_max_bytes``), every other kind has
``Config.request_frame_max_bytes``. A frame that does not open in the stream
context is tried in the datagram one (peers of an earlier release sealed
frames as datagrams). :class:`gossip.udp.GossipNode` uses one per node for
the streams it serves and opens; admission and budgets are
:mod:`gossip.streams`' (``StreamGate``).
"""
from __future__ import annotations

from collections.abc import Callable

from gossip.config import Config
from gossip.seal import PacketRejected, Sealer
from gossip.streams import HEAD_FRAME_MAX_BYTES, PUSH_PULL, StreamRefused, decode_head, encode_head
from gossip.transport import FramedStream, FrameTooLarge

__all__ = ["StreamMessages"]


class StreamMessages:
    """Send and receive sealed stream messages for one node.

    Args:
        config: the node's membership knobs (frame limits).
        sealer: the datagram sealer (opens frames of earlier releases).
        stream_sealer: the sealer of the stream context (seals and opens).
        members_known: the number of members known now (push-pull limit).
        reject: called with the seal's reason when a frame does not open
            (the node counts it as a rejected packet).
    """

    def __init__(self, config: Config, sealer: Sealer, stream_sealer: Sealer,
                 members_known: Callable[[], int], reject: Callable[[str], None]) -> None:
        self.config = config
        self.sealer = sealer
        self.stream_sealer = stream_sealer
        self._members_known = members_known
        self._reject = reject

    def body_limit(self, kind: int) -> int:
        """Largest body accepted or sent for a message of ``kind``."""
        if kind == PUSH_PULL:
            return self.config.push_pull_frame_max_bytes(self._members_known())
        return self.config.request_frame_max_bytes

    async def send(self, stream: FramedStream, kind: int, payload: bytes) -> None:
        """Send a head announcing the sealed body's length, then the body.

        Raises:
            FrameTooLarge: the body is over the kind's limit (nothing sent).
            StreamClosed: the connection broke.
        """
        limit = self.body_limit(kind)
        body_len = 1 + len(payload) + self.stream_sealer.overhead()
        if body_len > limit:
            raise FrameTooLarge(f"refusing to send a body of {body_len} bytes (limit {limit})")
        head = self.stream_sealer.seal(encode_head(kind, body_len))
        body = self.stream_sealer.seal(bytes((kind,)) + payload)
        assert len(body) == body_len, (len(body), body_len)
        await stream.send_frame(head, HEAD_FRAME_MAX_BYTES)
        await stream.send_frame(body, limit)

    def open_frame(self, frame: bytes, max_bytes: int) -> tuple[str, bytes]:
        """Open a stream frame: sealed in the stream context, or by a peer of
        an earlier release in the datagram one (its frames and datagrams share
        one sequence space, so the datagram replay table is the right one)."""
        try:
            return self.stream_sealer.open(frame, max_bytes=max_bytes)
        except PacketRejected as exc:
            if exc.reason != "wrong_key" or self.stream_sealer.insecure:
                raise
            try:
                return self.sealer.open(frame, max_bytes=max_bytes)
            except PacketRejected:
                raise exc from None

    async def recv_head(self, stream: FramedStream) -> tuple[str, int, int]:
        """Read and open a head: ``(sender, kind, body length)``.

        Raises:
            StreamRefused: ``oversized``, ``unauthenticated`` (the seal's
                reason is counted as a rejected packet too), ``malformed``.
            StreamClosed: EOF before a whole head.
        """
        try:
            frame = await stream.recv_frame(HEAD_FRAME_MAX_BYTES)
        except FrameTooLarge as exc:
            raise StreamRefused("oversized", f"head: {exc}") from None
        try:
            sender, plain = self.open_frame(frame, HEAD_FRAME_MAX_BYTES)
        except PacketRejected as exc:
            self._reject(exc.reason)
            raise StreamRefused("unauthenticated", f"head: {exc}") from None
        kind, body_len = decode_head(plain)
        return sender, kind, body_len

    async def recv_body(self, stream: FramedStream, sender: str, kind: int, body_len: int) -> bytes:
        """Read the body a head announced and open it; its payload.

        Raises:
            StreamRefused: ``malformed`` (length, sender or kind differ from
                the head), ``unauthenticated`` (does not open).
            StreamClosed: EOF before the whole body.
        """
        try:
            frame = await stream.recv_frame(body_len)
        except FrameTooLarge:
            raise StreamRefused("malformed", f"body frame longer than the {body_len} bytes announced") from None
        if len(frame) != body_len:
            raise StreamRefused("malformed", f"body frame of {len(frame)} bytes, {body_len} announced")
        try:
            body_sender, body = self.open_frame(frame, body_len)
        except PacketRejected as exc:
            self._reject(exc.reason)
            raise StreamRefused("unauthenticated", f"body: {exc}") from None
        if body_sender != sender or body[:1] != bytes((kind,)):
            raise StreamRefused("malformed", "body of another sender or kind than its head")
        return body[1:]

    async def recv(self, stream: FramedStream) -> tuple[str, int, bytes]:
        """Read one message (client side: a reply): ``(sender, kind, payload)``."""
        sender, kind, body_len = await self.recv_head(stream)
        limit = self.body_limit(kind)
        if body_len > limit:
            raise StreamRefused("oversized", f"body of {body_len} bytes announced, limit {limit}")
        return sender, kind, await self.recv_body(stream, sender, kind, body_len)
