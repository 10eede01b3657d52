"""Every knob of the membership core, with its default, formula and trade-off.

Modelled on hashicorp/memberlist ``config.go``: one frozen value, profiles
as classmethods (``Config.lan()`` = memberlist's ``DefaultLANConfig``,
``Config.local()`` = fast timers for tests and the simulator). Derived
quantities (retransmit limit, suspicion bounds, push-pull scaling) are methods
here so that the core, the simulator and the docs share one formula.

Times are floats in seconds (``_s``), sizes in bytes (``_bytes``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["Config"]

# memberlist pushPullScaleThreshold: push-pull interval starts doubling above
# this many members.
PUSH_PULL_SCALE_THRESHOLD = 32

# Fixed part of a push-pull body: its msgpack header (type, version, join
# flag, sender name <= 128 bytes, array header) and the seal's envelope.
PUSH_PULL_FRAME_BASE_BYTES = 512


@dataclass(frozen=True, slots=True)
class Config:
    """Membership configuration. Build with ``Config.lan()`` or
    ``Config.local()`` and adjust with ``cfg.replace(probe_interval_s=2.0)``.
    """

    # -- failure detection --------------------------------------------------
    probe_interval_s: float = 1.0
    """Time between probe rounds (one member pinged per round, members taken
    in a shuffled round-robin order). Scaled by the local awareness
    (``interval * (awareness + 1)``). Lower = faster detection, more packets
    (about 2 datagrams per member per interval)."""

    probe_timeout_s: float = 0.5
    """How long to wait for a direct ack before asking ``indirect_checks``
    members to probe for us. Should be around the 99th percentile RTT; also
    scaled by awareness. The indirect phase lasts until the end of the
    (scaled) probe interval, so keep it well below ``probe_interval_s``."""

    indirect_checks: int = 3
    """Members asked to ping a target that missed its direct ack (SWIM
    ping-req). More = fewer false suspicions from one bad path, more
    packets on failure. They also reply NACK when the target stays silent
    (Lifeguard), which tells us whether *we* are the slow one."""

    probe_suspect_share: float = 0.5
    """Share of probe rounds spent, while some member is suspect, on a random
    suspect member out of the round-robin turn (peerd addition; memberlist:
    0). Its ping carries the SUSPECT, so a live member refutes within about
    a probe interval even when the first direct notice was lost (e.g. a
    partition that healed); a dead one collects independent confirmations
    sooner. Costs: healthy members are probed less often while suspicions
    last."""

    suspicion_mult: int = 4
    """Suspicion timeout minimum:
    ``suspicion_mult * max(1, log10(max(1, N))) * probe_interval_s``
    (memberlist ``suspicionTimeout``; N = members alive or suspect, self
    included). Higher = more time to refute, slower detection. Also sets the
    number of independent confirmations that shrink a suspicion to the
    minimum: ``k = suspicion_mult - 2`` (0 when ``N - 2 < k``)."""

    suspicion_max_timeout_mult: int = 6
    """Suspicion timeout maximum = ``suspicion_max_timeout_mult * min``. A
    lone suspicion waits this long; each independent confirmation shrinks it
    toward the minimum as ``log(c+1)/log(k+1)`` (Lifeguard LHA-Suspicion)."""

    # -- dissemination ------------------------------------------------------
    retransmit_mult: int = 4
    """Each broadcast is sent at most ``retransmit_mult * ceil(log10(N+1))``
    times (memberlist ``retransmitLimit``). Higher = more reliable spread
    under loss, more bytes."""

    gossip_interval_s: float = 0.2
    """Period of the gossip round that flushes queued broadcasts to
    ``gossip_nodes`` random members. A round runs only when something is
    queued; when the queue was idle for a full interval the first round runs
    at once, so news spreads at network speed and is then rate limited."""

    gossip_fresh_interval_s: float = 0.02
    """Fresh news (sent fewer than half its retransmit limit) does not wait
    for the next gossip round: a round runs as soon as this long has passed
    since the previous one. News then
    crosses the cluster in a few network hops instead of a few gossip
    intervals, for the same number of transmissions (the retransmit limit
    bounds them) but less packing per datagram. 0 = only every
    ``gossip_interval_s`` (memberlist behaviour)."""

    gossip_fresh_burst: int = 4
    """At most this many gossip rounds back to back (fast or not); the
    budget refills by one round per ``gossip_interval_s``. A lone piece of
    news still crosses the cluster at network speed, but a steady stream of
    news (suspicions under heavy loss, churn) gossips at the memberlist rate
    of one round per ``gossip_interval_s``, so the messages a member sends
    per second do not grow with the cluster. Ignored when
    ``gossip_fresh_interval_s`` is 0."""

    gossip_nodes: int = 3
    """Fan-out of each gossip round. More = faster spread, more packets."""

    gossip_to_the_dead_s: float = 30.0
    """Keep gossiping to members dead for less than this long, so a member
    wrongly declared dead learns it and refutes. Bytes vs. recovery."""

    broadcast_queue_max: int = 1024
    """Cap on queued broadcasts; beyond it the most-transmitted (then oldest)
    are dropped. Bounds memory under churn; push-pull repairs what is lost."""

    # -- anti-entropy and join ----------------------------------------------
    push_pull_interval_s: float = 30.0
    """Period of the full-state TCP exchange with one random member. Scaled
    up with N like memberlist ``pushPullScale``: unchanged up to 32 members,
    then multiplied by ``ceil(log2(N) - log2(32)) + 1`` (doubles per
    doubling). 0 disables periodic push-pull (join still uses it)."""

    reconnect_interval_s: float = 30.0
    """Every this long, if some members are dead (not left), push-pull with
    one of them at random (serf ``reconnect_interval``, default 30 s). This
    heals a partition after both sides declared each other dead: the dead
    member learns it, refutes, and the two views merge. memberlist alone
    relies on gossip-to-the-dead. 0 disables. Cost: one stream per interval
    while anyone is dead."""

    stream_timeout_s: float = 10.0
    """How long a push-pull may take (memberlist ``TCPTimeout``). The shell
    enforces it; the core also forgets a join attempt not answered within it
    and retries."""

    join_retry_initial_s: float = 0.5
    """First delay before retrying the seeds when no join push-pull
    succeeded (or when this member later finds itself alone)."""

    join_retry_max_s: float = 30.0
    """Cap of the exponential join backoff (doubling from the initial).
    Retries never stop while no peer is alive."""

    # -- local health (Lifeguard) -------------------------------------------
    awareness_max_multiplier: int = 8
    """Local health score range is ``0 .. awareness_max_multiplier - 1``;
    probe interval and timeout are multiplied by ``score + 1``. +1 per failed
    probe (or per missing NACK when NACKs were expected) and per time we are
    suspected, -1 per successful direct probe. Higher = a struggling member
    slows down more instead of accusing healthy peers."""

    # -- sizes ----------------------------------------------------------------
    packet_budget_bytes: int = 1400
    """Largest datagram on the wire, seal included (fits a 1500 MTU with
    IP/UDP headers)."""

    seal_overhead_bytes: int = 96
    """Bytes reserved for the envelope added by ``gossip/seal.py``:
    1 version + 1 key hint + 12 nonce + 16 GCM tag + header (sender name,
    epoch, sequence). The core's plaintext is at most
    ``packet_budget_bytes - seal_overhead_bytes`` (= ``payload_budget_bytes``)."""

    meta_max_bytes: int = 512
    """Largest opaque metadata blob per member (memberlist MetaMaxSize)."""

    # -- streams (TCP push-pull and request/response) ------------------------
    # Every stream message is a small sealed head (kind and body length),
    # then the sealed body (``gossip/streams.py``). Until its head opened
    # under a key of the ring a stream is *unauthenticated*: it holds at most
    # ``streams.HEAD_FRAME_MAX_BYTES`` plus one read chunk, and the caps below
    # bound how many such streams exist. A body buffer is sized only from an
    # authenticated head, and never beyond the limits derived here.
    streams_inbound_max: int = 64
    """Inbound streams served at once, authenticated or not; one more is
    closed at accept (``too_many_streams``). Authenticated streams last up
    to ``stream_timeout_s`` (a push-pull, a node request and its handler)."""

    streams_unauth_max: int = 32
    """Inbound streams whose head has not opened yet, per node; one more is
    closed at accept, before any byte is read (``too_many_unauthenticated``).
    A member's head follows its connect at once, so a member's stream is
    unauthenticated for about one round trip and 32 leave ample room for a
    join storm. What anyone who can reach the port can make the node hold:
    ``streams_unauth_max * (HEAD_FRAME_MAX_BYTES + READ_CHUNK_BYTES)``
    (32 x 64.1 KiB = 2 MiB) plus a trio task and a socket each. Lower =
    less to hold; but connections that send nothing occupy a slot for
    ``stream_head_timeout_s``, and while a flood from many addresses fills
    every slot, members' streams are refused too (push-pull retries at its
    next interval, a node request fails with an error)."""

    streams_unauth_per_source_max: int = 8
    """Inbound unauthenticated streams per source IP address (the port is
    ignored); one more is closed at accept (``too_many_from_source``). Keeps
    one address from taking all ``streams_unauth_max`` slots; a member
    rarely has more than one or two streams to us in their first round
    trip. Behind one NAT address several members share this cap."""

    stream_head_timeout_s: float = 2.0
    """A stream's head (about 100 bytes) must arrive within this long after
    accept, or the connection is dropped (``timeout``). Slow-loris
    connections hold an unauthenticated slot at most this long. Higher =
    tolerates slower links, lets idle connections hold slots longer."""

    stream_members_min: int = 1024
    """Cluster size the push-pull frame limit assumes at least, whatever
    this member knows: a member that knows only itself (joining) accepts
    the full state of a cluster of this many members whose rows are all at
    the largest size a datagram allows. Rows are usually much smaller
    (~100-700 bytes), so in practice a joiner accepts far larger clusters.
    See ``push_pull_frame_max_bytes``."""

    request_frame_max_bytes: int = 4 * 1024 * 1024
    """Largest body of a request, reply or error on a user stream (the node
    layer's replication pushes, anti-entropy steps, run-now and key
    operations). These messages do not grow with the cluster size: an
    anti-entropy digest step is <= 8 KiB + 512 bytes per differing bucket
    (<= 520 KiB), entries are shipped in batches the node layer keeps under
    this limit. Bigger = larger batches, more memory per authenticated
    stream (<= ``stream_buffer_budget_bytes`` in total)."""

    stream_buffer_budget_bytes: int = 32 * 1024 * 1024
    """Bytes of message bodies all inbound streams may buffer at once
    (reserved from the authenticated head's announced length before the
    first body byte is read). A body that does not fit what is left is
    refused (``buffer_budget``) and the sender retries later. Bounds what
    members (key holders) can make a node buffer at once, whatever they
    send: 32 MiB = 8 request frames of 4 MiB, or 12 push-pulls of a
    1000-member cluster at the worst-case row size. Must be at least the
    largest single frame limit at the cluster sizes in use."""

    # -- housekeeping ---------------------------------------------------------
    reap_interval_s: float = 3600.0
    """Dead and left members stay listed (with their state) this long, then
    are removed with a REAPED event (serf ``reconnect_timeout``-like). Longer
    = better stale-message protection and visibility, more memory."""

    dead_reclaim: bool = True
    """Accept a new address for a dead or left member when it comes back with
    a higher incarnation (memberlist ``DeadNodeReclaimTime`` = 0 means never;
    here True means at once). False: a new address is always a conflict."""

    # -- derived quantities -------------------------------------------------
    @property
    def payload_budget_bytes(self) -> int:
        """Largest plaintext compound the core emits."""
        return self.packet_budget_bytes - self.seal_overhead_bytes

    def retransmit_limit(self, n: int) -> int:
        """``retransmit_mult * ceil(log10(n + 1))`` (memberlist)."""
        return self.retransmit_mult * math.ceil(math.log10(max(1, n) + 1))

    def suspicion_min_s(self, n: int) -> float:
        """Minimum suspicion timeout for ``n`` live members."""
        node_scale = max(1.0, math.log10(max(1.0, float(n))))
        return self.suspicion_mult * node_scale * self.probe_interval_s

    def suspicion_max_s(self, n: int) -> float:
        """Maximum suspicion timeout for ``n`` live members."""
        return self.suspicion_max_timeout_mult * self.suspicion_min_s(n)

    def suspicion_k(self, n: int) -> int:
        """Confirmations needed to reach the minimum timeout."""
        k = self.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        return max(0, k)

    def push_pull_row_max_bytes(self) -> int:
        """Upper bound of one member's row in a push-pull state: a member's
        alive message (name, address, incarnation, tags, meta) must fit one
        datagram's payload (``payload_budget_bytes``, checked when a member
        starts or updates), and a row holds the same fields plus a state
        byte. 1304 bytes at the default packet budget."""
        return self.payload_budget_bytes

    def push_pull_frame_max_bytes(self, n: int) -> int:
        """Largest push-pull body accepted from a stream, for ``n`` members
        known (all states: dead and left members are in the state until
        reaped):

            ``PUSH_PULL_FRAME_BASE_BYTES + push_pull_row_max_bytes()
              * max(stream_members_min, 2 * n)``

        The factor 2 leaves room for members the sender knows and we do not
        yet; ``stream_members_min`` lets a joiner take in a whole cluster.
        Defaults: 1.27 MiB up to 512 members, 2.5 MiB at 1000 (the old fixed
        limit of 4 MiB held 3,200 worst-case rows), 12.4 MiB at 5000.
        Trade-off: a push-pull whose state is over the receiver's limit
        fails (counted as ``oversized``); a larger limit lets a member make
        a peer buffer more (bounded by ``stream_buffer_budget_bytes``)."""
        rows = max(self.stream_members_min, 2 * max(1, n))
        return PUSH_PULL_FRAME_BASE_BYTES + self.push_pull_row_max_bytes() * rows

    def push_pull_interval_for(self, n: int) -> float:
        """Push-pull period scaled with ``n`` (memberlist pushPullScale)."""
        if n <= PUSH_PULL_SCALE_THRESHOLD:
            return self.push_pull_interval_s
        mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1.0
        return self.push_pull_interval_s * mult

    # -- profiles -------------------------------------------------------------
    @classmethod
    def lan(cls) -> "Config":
        """memberlist DefaultLANConfig: probe 1 s, timeout 500 ms, 3 indirect
        checks, suspicion mult 4 (max 6x), retransmit mult 4, gossip 200 ms
        to 3 members, gossip to the dead 30 s, push-pull 30 s."""
        return cls()

    @classmethod
    def local(cls) -> "Config":
        """Fast timers for tests and simulations on one machine."""
        return cls(
            probe_interval_s=0.2,
            probe_timeout_s=0.1,
            gossip_interval_s=0.05,
            gossip_fresh_interval_s=0.005,
            push_pull_interval_s=5.0,
            suspicion_mult=3,
            gossip_to_the_dead_s=5.0,
            reap_interval_s=30.0,
            join_retry_initial_s=0.1,
            join_retry_max_s=2.0,
            stream_timeout_s=2.0,
            stream_head_timeout_s=1.0,
            reconnect_interval_s=2.0,
        )

    def replace(self, **changes) -> "Config":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        def pos(name: str) -> None:
            if not getattr(self, name) > 0:
                raise ValueError(f"Config.{name} must be > 0, got {getattr(self, name)!r}")

        for name in ("probe_interval_s", "probe_timeout_s", "gossip_interval_s",
                     "join_retry_initial_s", "join_retry_max_s", "stream_timeout_s",
                     "reap_interval_s", "stream_head_timeout_s"):
            pos(name)
        for name in ("suspicion_mult", "suspicion_max_timeout_mult", "retransmit_mult",
                     "awareness_max_multiplier", "gossip_nodes", "broadcast_queue_max",
                     "gossip_fresh_burst", "streams_inbound_max", "streams_unauth_max",
                     "streams_unauth_per_source_max", "stream_members_min",
                     "request_frame_max_bytes", "stream_buffer_budget_bytes"):
            pos(name)
        if not 0.0 <= self.probe_suspect_share <= 1.0:
            raise ValueError("Config.probe_suspect_share must be within 0..1")
        if self.indirect_checks < 0:
            raise ValueError("Config.indirect_checks must be >= 0")
        if (self.push_pull_interval_s < 0 or self.gossip_to_the_dead_s < 0
                or self.gossip_fresh_interval_s < 0 or self.reconnect_interval_s < 0):
            raise ValueError("Config intervals must be >= 0")
        if self.payload_budget_bytes < 256:
            raise ValueError("Config.packet_budget_bytes - seal_overhead_bytes must be >= 256")
        if self.stream_buffer_budget_bytes < self.request_frame_max_bytes:
            raise ValueError("Config.stream_buffer_budget_bytes must be >= request_frame_max_bytes "
                             "(else no request could ever be read)")
        if not 0 <= self.meta_max_bytes <= 1024:
            raise ValueError("Config.meta_max_bytes must be within 0..1024")
