"""Effects: what the sans-IO membership core asks its shell to do.

A core never performs I/O. Every public core method returns a list of these
frozen values; the trio shell (``gossip/udp.py``) or the simulator
(``sim/``) carries them out in order.

``Addr`` is ``(host, port)``; host is a string (IPv4 dotted quad, IPv6 without
brackets, or a name the shell resolves).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class SendPacket:
    """Send one datagram to ``addr``. ``data`` is plaintext (the compound
    body); the shell seals it. The core guarantees
    ``len(data) <= config.packet_budget - seal overhead``."""

    addr: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class StartPushPull:
    """Open a reliable stream to ``addr`` and send ``data`` (our full state).
    The shell hands the peer's reply to ``core.handle_push_pull_reply`` or
    reports failure with ``core.push_pull_failed``."""

    addr: Addr
    data: bytes
    join: bool


class EventKind(enum.Enum):
    JOIN = "join"          # member became alive (first seen, or came back)
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"
    UPDATE = "update"      # alive member changed address, tags or meta
    REAPED = "reaped"      # dead/left member removed after the reap interval


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """Membership change, emitted in the order the core decided it."""

    kind: EventKind
    member: "object"  # gossip.swim.Member snapshot (frozen)


@dataclass(frozen=True, slots=True)
class UserMessage:
    """An opaque payload for the node layer, received from ``sender``
    (piggybacked broadcast or direct user packet)."""

    sender: str
    data: bytes


Effect = SendPacket | StartPushPull | MemberEvent | UserMessage
