"""peerd membership: SWIM + Lifeguard over sealed UDP.

Cores (pure, no I/O): :mod:`gossip.swim` (the ``Swim`` coordinator: packet
dispatch, timers, gossip rounds) built from :mod:`gossip.swimstate` (its
state and shared primitives), :mod:`gossip.merge` (alive/suspect/dead
precedence), :mod:`gossip.probe` (direct and indirect probes),
:mod:`gossip.pushpull` (push-pull and joins) and :mod:`gossip.settle`
(simulator-only settled start); :mod:`gossip.members` and
:mod:`gossip.records` (member records), :mod:`gossip.fastnew` (constructors
for the compiled build), :mod:`gossip.suspicion` (Lifeguard suspicion
timeouts), :mod:`gossip.broadcast` (transmit-limited queue),
:mod:`gossip.wire` (msgpack codec), :mod:`gossip.seal` (AES-GCM envelope),
:mod:`gossip.config`, :mod:`gossip.effects`, :mod:`gossip.addr` (address
text forms).
Shells (trio, OS): :mod:`gossip.udp`, :mod:`gossip.transport`,
:mod:`gossip.stream_messages_shell` (sealed stream frames),
:mod:`gossip.seal_shell` (key files, OS randomness). This package re-exports
the core API only, so importing it never pulls in trio. The whole house is
drawn in docs/ARCHITECTURE.md.
"""
from .config import Config as Config
from .effects import Addr as Addr
from .effects import Effect as Effect
from .effects import EventKind as EventKind
from .effects import MemberEvent as MemberEvent
from .effects import SendPacket as SendPacket
from .effects import StartPushPull as StartPushPull
from .effects import UserMessage as UserMessage
from .members import Member as Member
from .members import MemberState as MemberState
from .swim import Swim as Swim
from .swim import SwimStats as SwimStats
from .wire import LocalProtocolError as LocalProtocolError
from .wire import RemoteProtocolError as RemoteProtocolError

__all__ = [
    "Addr", "Config", "Effect", "EventKind", "LocalProtocolError", "Member", "MemberEvent",
    "MemberState", "RemoteProtocolError", "SendPacket", "StartPushPull", "Swim", "SwimStats",
    "UserMessage",
]
