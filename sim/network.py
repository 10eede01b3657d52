"""Virtual network between simulated nodes: seeded delay, loss, duplication,
reordering, asymmetric reachability, partitions and a datagram size limit.

Modelled on TigerBeetle's ``src/testing/packet_simulator.zig``: every fault is
an option with a doc comment, every random choice comes from one seeded
``random.Random`` owned by the network, and nothing here knows what a packet
means. The network carries *sealed* bytes (``sim/cluster.py`` seals at the
sender and opens at the receiver with the real ``gossip.seal.Sealer``), so
the sizes it counts and limits are the sizes a real node would put on the
wire.

Theory of operation
-------------------
Datagrams (``transmit``): each one is judged once, at send time, in this
order: oversize -> dropped (``oversize``); sender and receiver in different
partition groups -> dropped (``partition``); the directed link ``src -> dst``
blocked -> dropped (``blocked``, this is how "A hears B but B does not hear
A" is built); loss draw -> dropped (``loss``). A surviving datagram is
delivered after ``one_way_delay_min_s + Exp(mean - min)`` seconds, so
datagrams on one link overtake each other (reordering comes from jitter,
as on a real network with several paths). With probability
``packet_replay_probability`` a second copy is delivered with its own delay
(duplication).

Streams (``stream``): push-pull runs over TCP in a real node. A stream is
modelled as reliable and in order: it succeeds iff both directions of the
link are open (TCP needs both) at the moment it starts, and takes one
one-way delay per direction plus the time the far end needs to get to it.
Timeouts (a peer crashed or paused too long) are decided by the cluster,
which knows the nodes' state.

Node indices, not addresses, are used here; the cluster maps addresses.
"""
from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass
from math import log as _log

from sim.loop import Trace

__all__ = ["NetworkOptions", "Network", "DROP_REASONS"]

_heappush = heapq.heappush

# Why a datagram did not arrive. Appended only (reports and traces use them).
DROP_REASONS = (
    "loss",          # random loss draw on the link
    "partition",     # sender and receiver are in different partition groups
    "blocked",       # the directed link src -> dst is cut (asymmetric fault)
    "oversize",      # larger than datagram_size_max_bytes
    "down",          # receiver crashed (or gone) when the datagram arrived
    "unknown_addr",  # no node listens on the destination address
    "queue_full",    # receiver paused and its socket buffer was full
    "rejected",      # receiver's Sealer refused it (key, epoch, garbage)
)


@dataclass(frozen=True, slots=True)
class NetworkOptions:
    """Fault and timing knobs of the virtual network (all seeded).

    Defaults model one LAN: ~0.5 ms one-way, no faults. Scenarios and the CLI
    replace fields with ``dataclasses.replace``.
    """

    # Minimum one-way delay of any datagram or stream segment. Precedent:
    # switched LAN round trips of 0.3-1 ms.
    one_way_delay_min_s: float = 0.0002
    # Mean one-way delay. Each delay is min + Exp(mean - min); the exponential
    # tail is the jitter that reorders datagrams on one link.
    one_way_delay_mean_s: float = 0.0005
    # Probability that a datagram is lost on any link (flaky networks).
    packet_loss_probability: float = 0.0
    # Probability that a delivered datagram is delivered a second time
    # (TigerBeetle calls this replay).
    packet_replay_probability: float = 0.0
    # Datagrams larger than this are dropped and counted (``oversize``). 1472
    # is the UDP payload that fits a 1500-byte Ethernet MTU unfragmented; the
    # SWIM core's 1400-byte budget (memberlist's default) stays below it.
    datagram_size_max_bytes: int = 1472
    # A push-pull stream that gets no reply within this long fails and the
    # initiator hears ``push_pull_failed``. None: the gossip Config's
    # ``stream_timeout_s`` (the real shell enforces that one; memberlist's
    # TCPTimeout is 10 s).
    stream_timeout_s: float | None = None
    # Datagrams a paused node's socket buffer holds before dropping more
    # (``queue_full``): about 200 KB of 1400-byte datagrams.
    paused_buffer_packets_max: int = 150

    def __post_init__(self) -> None:
        if not 0.0 <= self.packet_loss_probability <= 1.0:
            raise ValueError("packet_loss_probability must be within [0, 1]")
        if not 0.0 <= self.packet_replay_probability <= 1.0:
            raise ValueError("packet_replay_probability must be within [0, 1]")
        if not 0.0 <= self.one_way_delay_min_s <= self.one_way_delay_mean_s:
            raise ValueError("need 0 <= one_way_delay_min_s <= one_way_delay_mean_s")
        if self.datagram_size_max_bytes <= 0:
            raise ValueError("datagram_size_max_bytes must be positive")


class Network:
    """Routing decisions and fault state for ``n`` node indices.

    Args:
        n: number of node slots (indices ``0..n-1``).
        options: the fault knobs.
        rng: the network's own RNG (derived from the root seed).
        heap: the event loop's heap; delivered datagrams are pushed onto it as
            ``(at_s, seq, deliver_kind, dst, src, data)``.
        next_seq: the loop's sequence counter.
        deliver_kind: the entry kind the cluster dispatches deliveries on.
    """

    __slots__ = (
        "n", "options", "rng", "heap", "next_seq", "deliver_kind", "group",
        "partitioned", "blocked", "link_loss", "loss", "replay", "size_max",
        "delay_min_s", "delay_extra_mean_s", "drops", "sent_msgs", "sent_bytes",
        "trace", "_lambd",
    )

    def __init__(self, n: int, options: NetworkOptions, rng: random.Random,
                 heap: list, next_seq: Callable[[], int], deliver_kind: int,
                 trace: Trace | None = None) -> None:
        self.n = n
        self.options = options
        self.rng = rng
        self.heap = heap
        self.next_seq = next_seq
        self.deliver_kind = deliver_kind
        self.trace = trace
        # Partition group of each node; all 0 when healed.
        self.group = [0] * n
        self.partitioned = False
        # Directed links cut: (src, dst) means dst does not hear src.
        self.blocked: set[tuple[int, int]] = set()
        # Per-link loss overrides: (src, dst) -> probability.
        self.link_loss: dict[tuple[int, int], float] = {}
        self.set_options(options)
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.sent_msgs = [0] * n
        self.sent_bytes = [0] * n

    # -- fault controls -------------------------------------------------------

    def set_options(self, options: NetworkOptions) -> None:
        """Replace the knobs (e.g. to turn loss on and off mid-run)."""
        self.options = options
        self.loss = options.packet_loss_probability
        self.replay = options.packet_replay_probability
        self.size_max = options.datagram_size_max_bytes
        self.delay_min_s = options.one_way_delay_min_s
        self.delay_extra_mean_s = options.one_way_delay_mean_s - options.one_way_delay_min_s
        # rng.expovariate(lambd) is -log(1 - random()) / lambd: transmit()
        # inlines it (same draws, same floats)
        self._lambd = 1.0 / self.delay_extra_mean_s if self.delay_extra_mean_s > 0 else 0.0

    def partition(self, groups: list[list[int]]) -> None:
        """Split nodes into groups; nodes not listed form one more group.

        Datagrams and streams pass only within a group.
        """
        self.group = [len(groups)] * self.n
        for g, members in enumerate(groups):
            for i in members:
                self.group[i] = g
        self.partitioned = True

    def heal(self) -> None:
        """Remove partitions, blocked links and per-link loss overrides."""
        self.group = [0] * self.n
        self.partitioned = False
        self.blocked.clear()
        self.link_loss.clear()

    def block(self, src: int, dst: int) -> None:
        """Cut the directed link: ``dst`` stops hearing ``src``."""
        self.blocked.add((src, dst))

    def unblock(self, src: int, dst: int) -> None:
        self.blocked.discard((src, dst))

    def grow(self, n: int) -> None:
        """Make room for node indices up to ``n - 1`` (nodes joining later)."""
        extra = n - self.n
        if extra > 0:
            self.group.extend([0] * extra if not self.partitioned else [max(self.group, default=0)] * extra)
            self.sent_msgs.extend([0] * extra)
            self.sent_bytes.extend([0] * extra)
            self.n = n

    # -- datagrams ------------------------------------------------------------

    def reachable(self, src: int, dst: int) -> bool:
        """Whether a datagram from ``src`` could reach ``dst`` (ignoring loss)."""
        if self.partitioned and self.group[src] != self.group[dst]:
            return False
        return (src, dst) not in self.blocked

    def transmit(self, now_s: float, src: int, dst: int, data: bytes) -> None:
        """Send one sealed datagram; schedule its delivery or count its drop."""
        size = len(data)
        self.sent_msgs[src] += 1
        self.sent_bytes[src] += size
        trace = self.trace
        if size > self.size_max:
            self._drop(now_s, src, dst, "oversize")
            return
        if self.partitioned and self.group[src] != self.group[dst]:
            self._drop(now_s, src, dst, "partition")
            return
        if self.blocked and (src, dst) in self.blocked:
            self._drop(now_s, src, dst, "blocked")
            return
        rng = self.rng
        loss = self.loss
        if self.link_loss:
            loss = self.link_loss.get((src, dst), loss)
        if loss and rng.random() < loss:
            self._drop(now_s, src, dst, "loss")
            return
        lambd = self._lambd
        at_s = now_s + self.delay_min_s + -_log(1.0 - rng.random()) / lambd \
            if lambd else now_s + self.delay_min_s
        _heappush(self.heap, (at_s, self.next_seq(), self.deliver_kind, dst, src, data))
        if trace is not None:
            trace.append((now_s, "p", src, dst, size, at_s))
        if self.replay and rng.random() < self.replay:
            at2_s = now_s + self.delay_min_s + rng.expovariate(1.0 / self.delay_extra_mean_s) \
                if self.delay_extra_mean_s > 0 else now_s + self.delay_min_s
            heapq.heappush(self.heap, (at2_s, self.next_seq(), self.deliver_kind, dst, src, data))
            if trace is not None:
                trace.append((now_s, "r", src, dst, size, at2_s))

    def _drop(self, now_s: float, src: int, dst: int, reason: str) -> None:
        self.drops[reason] += 1
        if self.trace is not None:
            self.trace.append((now_s, "x", src, dst, reason))

    def count_drop(self, now_s: float, src: int, dst: int, reason: str) -> None:
        """Count a drop decided by the cluster (receiver down, buffer full...)."""
        self._drop(now_s, src, dst, reason)

    # -- streams --------------------------------------------------------------

    def stream_open(self, src: int, dst: int) -> bool:
        """Whether a TCP stream between ``src`` and ``dst`` can work now."""
        return self.reachable(src, dst) and self.reachable(dst, src)

    def delay_s(self) -> float:
        """One one-way delay draw (for stream segments)."""
        if self.delay_extra_mean_s > 0:
            return self.delay_min_s + self.rng.expovariate(1.0 / self.delay_extra_mean_s)
        return self.delay_min_s

    def count_stream(self, src: int, size: int) -> None:
        """Count a stream segment of ``size`` sealed bytes sent by ``src``."""
        self.sent_msgs[src] += 1
        self.sent_bytes[src] += size
