"""peerd membership: SWIM + Lifeguard over sealed UDP.

Cores (pure, no I/O): :mod:`gossip.swim` (membership state machine),
:mod:`gossip.suspicion` (Lifeguard suspicion timeouts),
:mod:`gossip.broadcast` (transmit-limited queue), :mod:`gossip.wire`
(msgpack codec), :mod:`gossip.seal` (envelope), :mod:`gossip.config`.
Shells (trio): :mod:`gossip.udp`, :mod:`gossip.transport`. This package
re-exports the core API only, so importing it never pulls in trio.
"""
from .config import Config as Config
from .effects import Addr as Addr
from .effects import Effect as Effect
from .effects import EventKind as EventKind
from .effects import MemberEvent as MemberEvent
from .effects import SendPacket as SendPacket
from .effects import StartPushPull as StartPushPull
from .effects import UserMessage as UserMessage
from .swim import Member as Member
from .swim import MemberState as MemberState
from .swim import Swim as Swim
from .swim import SwimStats as SwimStats
from .wire import LocalProtocolError as LocalProtocolError
from .wire import RemoteProtocolError as RemoteProtocolError

__all__ = [
    "Addr", "Config", "Effect", "EventKind", "LocalProtocolError", "Member", "MemberEvent",
    "MemberState", "RemoteProtocolError", "SendPacket", "StartPushPull", "Swim", "SwimStats",
    "UserMessage",
]
