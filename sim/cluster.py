"""Simulated nodes driving the real SWIM core, and the cluster event loop.

Each :class:`SimNode` wraps one ``gossip.swim.Swim`` core and one
``gossip.seal.Sealer``, exactly as the trio shell (``gossip/udp.py``) wraps
them for a real node: datagrams are sealed at the sender and opened at the
receiver (rejections go to ``core.note_rejected``), push-pull state travels
as sealed stream frames, and the core's timers are driven by
``core.next_deadline()`` / ``core.tick(now)``. No protocol decision is made
here.

Theory of operation
-------------------
One :class:`~sim.loop.EventLoop` holds every pending thing as a tuple
``(time_s, seq, kind, a, b, c)``; kinds are the ``K_*`` constants below.
``run`` pops entries in order and dispatches. Per-node timers are armed
lazily: after anything touches a core we ask for its next deadline and push a
timer entry only if it is earlier than the one already armed; each push bumps
the node's ``timer_gen`` and stale entries are skipped when popped.

Clocks: node ``i`` sees ``now = rate_i * t + offset_i`` where ``t`` is virtual
time; offsets differ by up to ``clock_offset_max_s`` and rates by up to
``clock_drift_max_ppm`` (TigerBeetle ``TimeSim``). Deadlines convert back
with ``t = (deadline - offset) / rate``.

Around the loop, by concern: the event kinds are in ``sim/kinds.py``; how
the cluster forms at t=0 (join, warm, settled) in ``sim/bootstrap.py``;
push-pull's modelled TCP streams in ``sim/streams.py``; faults from
``sim/scenarios.py`` (crash, restart, leave, pause, partition, drift) are
applied by ``sim/faults.py``; the report is built by ``sim/report.py``.
The datagram path, timers and effects stay here: they are the hot loop that
sim/accel.py compiles.

Determinism: one root seed; the network, the cluster's own choices and every
node's core get child RNGs from ``child_rng(seed, label)``; nothing iterates
an unsorted set or dict of ``str`` on a decision path. AES-GCM nonces are a
boot number unique in the run and a counter (``_SimNonce``): deterministic,
never repeated under the run's one key.

App hook: a node may carry ``apps`` (objects with ``on_member_event(event,
now)``, ``handle_user(sender, data, now)``, ``tick(now)``,
``next_deadline()``, each returning a list of effects) so the scheduler and
store cores can ride on the same node later. An app's ``tick`` runs when its
own deadline is due; its gossip effects are carried out like the core's, any
other effect goes to ``Cluster.app_effect(node, effect, t_s)``.
"""
from __future__ import annotations

import gc
import heapq
import math
import struct
import time as _wallclock  # only for wall_seconds in the report, never on a decision path
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Final, Protocol

from gossip.effects import MemberEvent, SendPacket, StartPushPull, UserMessage
from gossip.seal import Keyring, PacketRejected, Sealer
from gossip.swim import Swim
from sim.bootstrap import boot_cluster
from sim.faults import apply_fault, resume
from sim.kinds import (K_CHECK, K_DELIVER, K_FAULT, K_INJECT, K_JOIN, K_PP_FAIL, K_PP_REPLY, K_PP_REQ,
                       K_RESUME, K_STOP, K_TIMER)
from sim.loop import EventLoop, Trace, child_rng
from sim.metrics import Metrics
from sim.network import Network, NetworkOptions
from sim.report import cluster_report, load_mark
from sim.scenarios import Fault
from sim.streams import pp_reply, pp_request, start_push_pull

try:  # compiled by mypyc (sim/accel.py), Cluster must allow sim/app.py's AppCluster
    from mypy_extensions import mypyc_attr
except ImportError:  # plain runs need no mypy: the decorator is then a no-op
    def mypyc_attr(*_args: Any, **_kwargs: Any) -> Any:  # type: ignore[misc]
        return lambda cls: cls

__all__ = ["ClusterOptions", "SimNode", "Cluster", "NodeApp", "node_names", "simulate"]

# Tag set by ``core.update_local`` to measure dissemination (see sim/metrics.py).
UPDATE_TAG = "simu"
INF: Final = math.inf


def node_names(n: int) -> list[str]:
    """The names of an ``n``-node cluster: ``n000``, ``n001``, ..."""
    width = max(3, len(str(n - 1)))
    return [f"n{i:0{width}d}" for i in range(n)]


class NodeApp(Protocol):
    """An extra per-node core (scheduler, store) riding on a simulated node."""

    def on_member_event(self, event: MemberEvent, now: float) -> list: ...
    def handle_user(self, sender: str, data: bytes, now: float) -> list: ...
    def tick(self, now: float) -> list: ...
    def next_deadline(self) -> float: ...


class _RunGC:
    """The cyclic garbage collector during ``Cluster.run``.

    A run allocates millions of short-lived, acyclic objects (heap entries,
    datagrams, effects) next to about N^2 long-lived member records. With the
    default thresholds the collector keeps re-scanning the long-lived ones:
    at N=1000 that was 12-14 % of a compiled run's CPU (py-spy:
    ``gc_collect_main`` and ``_Node`` traversal) while it found ~600 cyclic
    objects in 160 virtual s. So: no collection during the bootstrap, then
    the bootstrap's objects are frozen (``gc.freeze``: never scanned) and
    young objects are collected every 100 000 allocations instead of 700.
    Cycles are still collected. On exit everything is put back; if the
    process had frozen objects of its own, nothing is frozen or unfrozen.
    The trace does not depend on any of this.
    """

    GEN0_THRESHOLD = 100_000

    def __enter__(self) -> "_RunGC":
        self._enabled = gc.isenabled()
        self._thresholds = gc.get_threshold()
        self._frozen = False
        gc.disable()
        return self

    def booted(self) -> None:
        if not self._frozen and gc.get_freeze_count() == 0:
            self._frozen = True
            gc.freeze()
        gc.set_threshold(self.GEN0_THRESHOLD, 50, 100)
        if self._enabled:
            gc.enable()

    def __exit__(self, *exc: object) -> None:
        if self._frozen:
            gc.unfreeze()
        gc.set_threshold(*self._thresholds)
        if self._enabled:
            gc.enable()
        else:
            gc.disable()


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """Everything a run depends on besides the schedule (all seeded)."""

    nodes: int = 20
    seed: int = 0
    # Seeds every node joins through (the first ``seeds`` nodes).
    seeds: int = 3
    # How the cluster forms at t=0. "join": every node calls core.join(seeds)
    # at a random time in [0, join_stagger_s] (the real thing; at N=1000 the
    # resulting gossip storm is most of the run's cost). "warm": every node's
    # join push-pull with n000 is completed at t=0 without latency (see
    # sim.bootstrap.warm_bootstrap), then the run proceeds normally. "settled":
    # warm, then every core forgets its queued membership news
    # (``Swim.settle``): a cluster formed long ago, whose members hold the
    # same full view and have nothing left to say (the warm start's ~10^6
    # redundant re-broadcasts are skipped; steady-state runs and the speed
    # figure without the start-up).
    bootstrap: str = "join"
    # Nodes start joining over [0, join_stagger_s] (uniform, seeded).
    join_stagger_s: float = 0.5
    # Clock offsets between nodes differ by up to this much (monotonic
    # clocks start anywhere; SWIM must only use differences).
    clock_offset_max_s: float = 5.0
    # Clock rates differ from 1 by up to this many parts per million
    # (quartz is within ~100 ppm).
    clock_drift_max_ppm: float = 100.0
    # A leaving node keeps running this long so its leave broadcast spreads.
    leave_linger_s: float = 1.0
    # An update (``core.update_local``) is injected this often for the
    # dissemination measure; None: 20 probe intervals (20 s on lan). Each
    # update costs every node a few gossip rounds, so keep it sparse or it
    # inflates msgs_per_node_per_s. 0 disables.
    update_interval_s: float | None = None
    # Convergence is re-checked at most this often (only when views changed).
    check_interval_s: float = 0.1
    # Keep the last records of the trace for failure reports (0 = none).
    trace_keep: int = 0
    # (from_s, to_s): also report the load per running member between these
    # virtual times (``load_window`` in the report), e.g. steady state after
    # a warm start's broadcasts have drained. None: not measured.
    load_window_s: tuple[float, float] | None = None
    network: NetworkOptions = field(default_factory=NetworkOptions)


def _state_code(state: Any) -> tuple[bool, bool, bool]:
    """(in_view, is_dead, is_suspect) from a MemberState (by name)."""
    code = _STATE_CODES.get(id(state))
    if code is not None and code[1] is state:
        return code[0]
    name = getattr(state, "name", None) or str(state)
    name = name.upper()
    res = (name in ("ALIVE", "SUSPECT"), name == "DEAD", name == "SUSPECT")
    if len(_STATE_CODES) < 64:
        _STATE_CODES[id(state)] = (res, state)  # keeps ``state`` alive: its id stays unique
    return res


# id(enum member) -> (value, member): enum ``.name``/``.value`` are Python-level
# properties and enum hashing is Python-level in 3.11; ids of the few members
# seen are cheap keys (the member is kept referenced, so its id is not reused).
_STATE_CODES: dict[int, tuple] = {}
_KIND_VALUES: dict[int, tuple] = {}


def _kind_value(kind: Any) -> Any:
    """``kind.value`` of an EventKind, memoized by identity."""
    v = _KIND_VALUES.get(id(kind))
    if v is not None and v[1] is kind:
        return v[0]
    value = kind.value
    if len(_KIND_VALUES) < 64:
        _KIND_VALUES[id(kind)] = (value, kind)
    return value


_NONCE_PACK: Final = struct.Struct(">IQ").pack


class _SimNonce:
    """The AES-GCM nonces of one simulated node boot: 4 bytes of a boot
    number unique in the run, then an 8-byte counter. Never repeated under
    the run's one key, deterministic, and cheap: ``Random.randbytes`` per
    datagram was 1.7 % of a compiled 1000-node run. (A real node draws
    ``os.urandom``; nonce bytes never reach the trace, only sizes do.)"""

    __slots__ = ("_prefix", "_n")

    def __init__(self, boot: int) -> None:
        self._prefix = boot & 0xFFFFFFFF
        self._n = 0

    def __call__(self, size: int) -> bytes:
        self._n += 1
        return _NONCE_PACK(self._prefix, self._n)


def _shared_key_sealers(keyring: Any) -> Callable:
    """The default ``sealer_factory``: every node seals under ``keyring``.
    (A module-level helper, not a closure in ``Cluster.__init__``: mypyc
    cannot compile a nested def that rebinds a parameter.)"""

    def sealer_factory(name, epoch, nonce, _k=keyring):
        return Sealer(_k, name, epoch, nonce=nonce)
    return sealer_factory


class SimNode:
    """One simulated process: a core, its sealer, its clock and its faults."""

    __slots__ = (
        "idx", "name", "addr", "core", "sealer", "rate", "offset", "up", "leaving",
        "paused_until", "pause_token", "pending", "timer_at", "timer_gen", "want_d", "epoch",
        "boots", "apps", "tags", "meta",
    )

    def __init__(self, idx: int, name: str, addr: tuple[str, int], rate: float, offset: float) -> None:
        self.idx = idx
        self.name = name
        self.addr = addr
        self.core: Any = None
        self.sealer: Any = None
        self.rate = rate
        self.offset = offset
        self.up = False
        self.leaving = False
        self.paused_until = 0.0
        self.pause_token = 0
        self.pending: list[tuple] = []
        self.timer_at = INF
        self.timer_gen = 0
        # The node-local deadline _arm last computed (core and apps); a
        # lower bound of the real one, since a deadline only moves earlier
        # through a call that _arm follows. -INF: unknown.
        self.want_d = -INF
        self.epoch = 0
        self.boots = 0
        self.apps: list = []
        self.tags: dict[str, str] = {}
        self.meta = b""

    def local(self, t_s: float) -> float:
        """This node's clock reading at virtual time ``t_s``."""
        return self.rate * t_s + self.offset


@mypyc_attr(allow_interpreted_subclasses=True)
class Cluster:
    """N simulated nodes on one virtual network, driven by one event loop.

    Args:
        config: the ``gossip.config.Config`` every core runs with.
        options: cluster, clock and network options (with the seed).
        schedule: faults to apply (``sim.scenarios``).
        core_factory: builds a core; defaults to ``gossip.swim.Swim``.
        sealer_factory: ``(keyring, name, epoch, nonce) -> Sealer``; defaults
            to ``gossip.seal.Sealer`` under one shared keyring.
    """

    def __init__(self, config, options: ClusterOptions, schedule: Sequence[Fault] = (), *,
                 core_factory: Callable | None = None, sealer_factory: Callable | None = None,
                 app_factory: Callable[["SimNode"], list] | None = None) -> None:
        if options.nodes < 1:
            raise ValueError("need at least one node")
        lw = options.load_window_s
        if lw is not None and not (len(lw) == 2 and 0 <= lw[0] < lw[1]):
            raise ValueError(f"load_window_s {lw!r}: need (from_s, to_s) with 0 <= from_s < to_s")
        self.config = config
        self.options = options
        self.seed = options.seed
        self.loop = EventLoop()
        self.trace = Trace(keep=options.trace_keep)
        self.rng = child_rng(options.seed, "cluster")
        net_rng = child_rng(options.seed, "network")
        self.net = Network(options.nodes, options.network, net_rng, self.loop.heap,
                           self.loop.next_seq, K_DELIVER, self.trace)
        if options.network.stream_timeout_s is None:
            self.net.set_options(replace(options.network, stream_timeout_s=config.stream_timeout_s))
        self.base_network = self.net.options
        gossip_interval_s = getattr(config, "gossip_interval_s", None) or config.probe_interval_s
        self.metrics = Metrics(gossip_interval_s)
        self.app_factory = app_factory
        self.app_effect: Callable[[SimNode, Any, float], None] | None = None
        self.stats: dict[str, Any] = {"rejected": {}, "timer_spins": 0, "pp_started": 0, "pp_failed": 0,
                                      "pp_ok": 0, "paused_deferred": 0, "events": 0, "idle_ticks": 0,
                                      "unknown_effects": 0}
        if core_factory is None:
            core_factory = Swim
        self.core_factory = core_factory
        if sealer_factory is None:
            keyring = Keyring([child_rng(options.seed, "key").randbytes(32)])
            sealer_factory = _shared_key_sealers(keyring)
        self.sealer_factory = sealer_factory

        names = node_names(options.nodes)
        clock_rng = child_rng(options.seed, "clocks")
        self.nodes: list[SimNode] = []
        self.by_name: dict[str, SimNode] = {}
        self.by_addr: dict[tuple[str, int], int] = {}
        for i in range(options.nodes):
            name = names[i]
            addr = (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 7946)
            rate = 1.0 + clock_rng.uniform(-1.0, 1.0) * options.clock_drift_max_ppm * 1e-6
            offset = 1000.0 + clock_rng.uniform(0.0, options.clock_offset_max_s)
            node = SimNode(i, name, addr, rate, offset)
            self.nodes.append(node)
            self.by_name[name] = node
            self.by_addr[addr] = i
        self.seed_addrs = [self.nodes[i].addr for i in range(min(options.seeds, options.nodes))]
        self.schedule = sorted(schedule)
        for f in self.schedule:
            if f.node is not None and f.node not in self.by_name:
                raise ValueError(f"fault {f.kind} at {f.at_s}s names unknown node {f.node!r}")
        self.update_interval_s = (options.update_interval_s if options.update_interval_s is not None
                                  else 20.0 * config.probe_interval_s)
        self.spin_examples: list[tuple] = []
        self.on_spin: Callable[[SimNode, float], None] | None = None  # debugging hook
        # A timer entry that fires after the core's deadline moved later (the
        # probe's ack came before its timeout) does not tick the core, as
        # gossip/udp.py's timer loop does not. False (tests only) ticks at
        # every wake-up, as the simulator did before 2026-11-27.
        self.skip_idle_ticks = True
        self._update_uid = 0
        self._boots_total = 0  # node boots so far: each one's nonce prefix
        self.end_s = 0.0
        self.wall_s = 0.0
        self._measure_start: tuple[float, int, int, float] | None = None
        # counter snapshots at the load window's bounds (options.load_window_s)
        self._load_marks: list[tuple[float, int, int, float]] = []
        self._up_node_s = 0.0
        self._up_count = 0
        self._up_count_t = 0.0

    # -- node lifecycle ------------------------------------------------------

    def _boot(self, node: SimNode, t_s: float, join_at_s: float | None) -> None:
        node.boots += 1
        node.epoch = int(t_s * 1000) + node.boots  # wall-clock ms at start, strictly increasing
        rng = child_rng(self.seed, "node", node.name, node.boots)
        node.core = self.core_factory(self.config, node.name, node.addr, rng=rng,
                                      now=node.local(t_s), tags=dict(node.tags), meta=node.meta,
                                      incarnation=0)
        self._boots_total += 1
        node.sealer = self.sealer_factory(node.name, node.epoch, _SimNonce(self._boots_total))
        node.up = True
        node.leaving = False
        node.paused_until = 0.0
        node.pending = []
        node.timer_at = INF
        node.timer_gen += 1
        node.want_d = -INF
        node.apps = self.app_factory(node) if self.app_factory else []
        self._count_up(t_s, +1)
        self.metrics.node_up(node.name, t_s)
        self.trace.append((t_s, "boot", node.idx, node.boots))
        if join_at_s is not None:
            self.loop.schedule(join_at_s, K_JOIN, node.idx, node.boots)
        self._arm(node, t_s)

    def _kill(self, node: SimNode, t_s: float, *, crashed: bool) -> None:
        if not node.up:
            return
        node.up = False
        node.core = None
        node.sealer = None
        node.pending = []
        node.paused_until = 0.0
        node.timer_at = INF
        node.timer_gen += 1
        node.want_d = -INF
        node.apps = []
        self._count_up(t_s, -1)
        self.metrics.node_down(node.name, t_s, crashed=crashed)
        self.trace.append((t_s, "down", node.idx, crashed))

    def _count_up(self, t_s: float, delta: int) -> None:
        self._up_node_s += self._up_count * (t_s - self._up_count_t)
        self._up_count_t = t_s
        self._up_count += delta

    # -- timers ------------------------------------------------------------------

    def _arm(self, node: SimNode, t_s: float) -> None:
        core: Swim = node.core
        d = core.next_deadline()
        if node.apps:
            for app in node.apps:
                ad = app.next_deadline()
                if ad < d:
                    d = ad
        if d is None:
            d = INF
        node.want_d = d
        if d == INF:
            return
        self._arm_at(node, t_s, d)

    def _arm_at(self, node: SimNode, t_s: float, d: float) -> None:
        """Arm ``node``'s timer for its local deadline ``d`` (finite)."""
        rate, offset = node.rate, node.offset
        at_s = (d - offset) / rate
        if rate * at_s + offset < d:  # float rounding: the core must see now >= d
            at_s = math.nextafter(at_s, INF)
            if rate * at_s + offset < d:
                at_s = math.nextafter(math.nextafter(at_s, INF), INF)
        if at_s < t_s:
            at_s = t_s
        if at_s < node.timer_at:
            node.timer_at = at_s
            node.timer_gen += 1
            heapq.heappush(self.loop.heap, (at_s, self.loop.next_seq(), K_TIMER, node.idx, node.timer_gen, None))

    # -- effects -------------------------------------------------------------------

    def _effects(self, node: SimNode, effects: list | None, t_s: float) -> None:
        if not effects:
            return
        for e in effects:
            tp = type(e)
            if tp is SendPacket:
                sealer: Sealer = node.sealer
                sealed = sealer.seal(e.data)
                dst = self.by_addr.get(e.addr)
                if dst is None:
                    self.net.count_stream(node.idx, len(sealed))
                    self.net.count_drop(t_s, node.idx, -1, "unknown_addr")
                else:
                    self.net.transmit(t_s, node.idx, dst, sealed)
            elif tp is MemberEvent:
                m = e.member
                in_view, is_dead, is_suspect = _state_code(m.state)
                self.metrics.member_event(node.name, m.name, in_view, is_dead, is_suspect, t_s,
                                          m.tags)
                self.trace.append((t_s, "m", node.idx, m.name, _kind_value(e.kind),
                                   m.incarnation))
                if node.apps:
                    now = node.local(t_s)
                    for app in node.apps:
                        self._app_effects(node, app.on_member_event(e, now), t_s)
            elif tp is UserMessage:
                self.trace.append((t_s, "u", node.idx, e.sender, len(e.data)))
                if node.apps:
                    now = node.local(t_s)
                    for app in node.apps:
                        self._app_effects(node, app.handle_user(e.sender, e.data, now), t_s)
            elif tp is StartPushPull:
                start_push_pull(self, node, e, t_s)
            else:
                self.stats["unknown_effects"] += 1

    def _app_effects(self, node: SimNode, effects, t_s: float) -> None:
        for e in effects or ():
            if type(e) in (SendPacket, StartPushPull, MemberEvent, UserMessage):
                self._effects(node, [e], t_s)
            elif self.app_effect is not None:
                self.app_effect(node, e, t_s)

    def _reject(self, node: SimNode, reason: str, t_s: float) -> None:
        r = self.stats["rejected"]
        r[reason] = r.get(reason, 0) + 1
        self._effects(node, node.core.note_rejected(reason), t_s)

    # -- faults (sim/faults.py) -----------------------------------------------------------

    def _apply_fault(self, f: Fault, t_s: float) -> None:
        """Apply one fault (``sim.faults.apply_fault``). A method, not a
        direct call, so sim/app.py's ``AppCluster`` can extend it."""
        apply_fault(self, f, t_s)

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch_node(self, entry: tuple, node: SimNode, t_s: float) -> None:
        """Handle a node-bound entry (delivery, stream, failure) at ``t_s``."""
        kind = entry[2]
        if kind == K_DELIVER:
            self._deliver(node, entry[4], entry[5], t_s)
        elif kind == K_PP_REQ:
            pp_request(self, node, entry[4], entry[5], t_s)
        elif kind == K_PP_REPLY:
            pp_reply(self, node, entry[4], entry[5], t_s)
        elif kind == K_PP_FAIL:
            if node.boots == entry[5]:
                self.stats["pp_failed"] += 1
                self._effects(node, node.core.push_pull_failed(entry[4], node.local(t_s)), t_s)
        if node.up:
            self._arm(node, t_s)

    def _deliver(self, node: SimNode, src: int, data: bytes, t_s: float) -> None:
        # typed locals: compiled (sim/accel.py) these are native calls
        sealer: Sealer = node.sealer
        core: Swim = node.core
        try:
            _sender, body = sealer.open(data)
        except PacketRejected as exc:
            self.net.drops["rejected"] += 1
            self.trace.append((t_s, "x", src, node.idx, "rejected:" + exc.reason))
            self._reject(node, exc.reason, t_s)
            return
        # node.local(t_s), inlined
        self._effects(node, core.handle_packet(self.nodes[src].addr, body,
                                               node.rate * t_s + node.offset), t_s)

    def _inject_update(self, t_s: float) -> None:
        if self.net.partitioned:
            return
        candidates = [n for n in self.nodes if n.up and not n.leaving and n.paused_until <= t_s]
        if not candidates:
            return
        node = candidates[self.rng.randrange(len(candidates))]
        self._update_uid += 1
        uid = self._update_uid
        self.metrics.update_injected(uid, node.name, t_s)
        self.trace.append((t_s, "inject", node.idx, uid))
        self._effects(node, node.core.update_local(node.local(t_s), tags={UPDATE_TAG: str(uid)}), t_s)
        self._arm(node, t_s)

    # -- the run ----------------------------------------------------------------------------

    def run(self, duration_s: float) -> dict:
        """Run ``duration_s`` virtual seconds; returns the report dict."""
        if duration_s <= 0:
            raise ValueError("duration must be positive")
        with _RunGC() as gc_state:
            return self._run(duration_s, gc_state)

    def _run(self, duration_s: float, gc_state: "_RunGC") -> dict:
        wall0 = _wallclock.perf_counter()
        loop = self.loop
        heap = loop.heap
        opts = self.options
        boot_cluster(self)
        gc_state.booted()
        for f in self.schedule:
            if f.at_s <= duration_s:
                loop.schedule(f.at_s, K_FAULT, f)
        loop.schedule(opts.check_interval_s, K_CHECK, 1)
        # No update is injected in the last stretch: it could not finish.
        update_interval_s = self.update_interval_s
        inject_until_s = duration_s - max(update_interval_s, 50 * self.metrics.gossip_interval_s)
        if update_interval_s > 0:
            loop.schedule(update_interval_s, K_INJECT, 1)
        nodes = self.nodes
        metrics = self.metrics
        net = self.net
        trace = self.trace
        heappop = heapq.heappop
        # self._deliver(...) and not a local alias: compiled, a method call
        # on self is a native call, a bound method in a local a Python call
        buffer_max = net.options.paused_buffer_packets_max
        events = 0
        idle_ticks = 0
        skip_idle = self.skip_idle_ticks
        # typed locals (t_s, kind, node, core): compiled (sim/accel.py) they
        # are native values and native calls
        node: SimNode
        while heap:
            entry: tuple = heap[0]
            t_s: float = entry[0]
            if t_s > duration_s:
                break
            heappop(heap)
            loop.now_s = t_s
            events += 1
            kind: int = entry[2]
            if kind == K_DELIVER:
                node = nodes[entry[3]]
                if not node.up:
                    net.count_drop(t_s, entry[4], node.idx, "down")
                    continue
                if node.paused_until > t_s:
                    if len(node.pending) >= buffer_max:
                        net.count_drop(t_s, entry[4], node.idx, "queue_full")
                    else:
                        node.pending.append(entry)
                        self.stats["paused_deferred"] += 1
                    continue
                self._deliver(node, entry[4], entry[5], t_s)
                if node.up:
                    self._arm(node, t_s)
            elif kind == K_TIMER:
                node = nodes[entry[3]]
                if entry[4] != node.timer_gen or not node.up:
                    continue
                node.timer_at = INF
                if node.paused_until > t_s:
                    continue  # resume re-arms
                now = node.rate * t_s + node.offset  # node.local(t_s)
                if skip_idle and node.want_d > now:
                    # Stale, and known so without touching the core (cold
                    # in cache at N=1000): nothing is due before want_d,
                    # which _arm computed after the last call into the node.
                    idle_ticks += 1
                    self._arm_at(node, t_s, node.want_d)
                    continue
                core: Swim = node.core
                if skip_idle and core.next_deadline() > now:
                    # A stale wake-up (the deadline it was armed for moved
                    # later, e.g. the probe's ack came): like the UDP shell,
                    # tick only once next_deadline() has passed. (tick() now
                    # would re-arm push-pull or reconnect rounds that
                    # next_deadline() leaves out: no peers, no dead member.)
                    idle_ticks += 1
                else:
                    self._effects(node, core.tick(now), t_s)
                for app in node.apps:
                    if app.next_deadline() <= now:
                        self._app_effects(node, app.tick(now), t_s)
                if node.up:
                    self._arm(node, t_s)
                    if node.timer_at <= t_s:
                        # The core still says "due now" right after a tick:
                        # step a little so the loop always makes progress.
                        self.stats["timer_spins"] += 1
                        if len(self.spin_examples) < 5:
                            self.spin_examples.append((t_s, node.name, node.core.next_deadline(), now))
                        if self.on_spin is not None:
                            self.on_spin(node, t_s)
                        node.timer_gen += 1
                        node.timer_at = t_s + 1e-4
                        loop.schedule(node.timer_at, K_TIMER, node.idx, node.timer_gen)
            elif kind in (K_PP_REQ, K_PP_REPLY, K_PP_FAIL):
                node = nodes[entry[3]]
                if not node.up:
                    if kind == K_PP_REQ:
                        pp_request(self, node, entry[4], entry[5], t_s)  # refused
                    continue
                if node.paused_until > t_s:
                    if kind == K_PP_REQ and node.paused_until - entry[5][2] > net.options.stream_timeout_s:
                        loop.schedule(entry[5][2] + net.options.stream_timeout_s, K_PP_FAIL,
                                      entry[4], node.addr, entry[5][1])
                    else:
                        node.pending.append(entry)
                    continue
                self._dispatch_node(entry, node, t_s)
            elif kind == K_FAULT:
                self._apply_fault(entry[3], t_s)
            elif kind == K_RESUME:
                node = nodes[entry[3]]
                if node.up and entry[4] == node.pause_token and node.paused_until:
                    resume(self, node, t_s)
            elif kind == K_CHECK:
                was = metrics.converged
                if metrics.check_converged(t_s) and self._measure_start is None:
                    self._measure_start = load_mark(self, t_s)
                if metrics.converged != was:
                    trace.append((t_s, "converged", metrics.converged))
                lw = opts.load_window_s
                if lw is not None and len(self._load_marks) < 2 and t_s >= lw[len(self._load_marks)]:
                    self._load_marks.append(load_mark(self, t_s))
                k = entry[3] + 1
                loop.schedule(k * opts.check_interval_s, K_CHECK, k)
            elif kind == K_INJECT:
                if self._measure_start is not None and t_s <= inject_until_s:
                    self._inject_update(t_s)
                k = entry[3] + 1
                loop.schedule(k * update_interval_s, K_INJECT, k)
            elif kind == K_JOIN:
                node = nodes[entry[3]]
                if node.up and node.boots == entry[4]:
                    seeds = [a for a in self.seed_addrs if a != node.addr]
                    self._effects(node, node.core.join(seeds, node.local(t_s)), t_s)
                    if node.up:
                        self._arm(node, t_s)
            elif kind == K_STOP:
                node = nodes[entry[3]]
                if node.up and node.boots == entry[4] and node.leaving:
                    self._kill(node, t_s, crashed=False)
        loop.now_s = duration_s
        self.end_s = duration_s
        self.stats["events"] = events
        self.stats["idle_ticks"] = idle_ticks
        metrics.dirty = True
        metrics.check_converged(duration_s)
        self.wall_s = _wallclock.perf_counter() - wall0
        return cluster_report(self)

def simulate(*, nodes: int, duration_s: float, seed: int, scenario: str = "steady",
             loss: float | None = None, profile: str = "lan", config=None,
             network: NetworkOptions | None = None, schedule: list[Fault] | None = None,
             **cluster_kw) -> tuple[dict, "Cluster"]:
    """Build and run one simulation (what ``peersim run`` does).

    Args:
        nodes, duration_s, seed: size, virtual length and root seed.
        scenario: a name from ``sim.scenarios.SCENARIOS`` (ignored when
            ``schedule`` is given).
        loss: ``--loss``; None keeps the scenario default.
        profile: ``lan`` or ``local`` (``gossip.config.Config`` profiles),
            unless ``config`` is given.
        network: network options (default ``NetworkOptions()``).
        schedule: explicit faults instead of a named scenario.
        cluster_kw: other ``ClusterOptions`` fields.

    Returns:
        ``(report, cluster)``.
    """
    from gossip.config import Config
    from sim import scenarios as _sc
    if config is None:
        if profile not in ("lan", "local"):
            raise ValueError(f"unknown profile {profile!r}; lan or local")
        config = Config.lan() if profile == "lan" else Config.local()
    opts = ClusterOptions(nodes=nodes, seed=seed, network=network or NetworkOptions(), **cluster_kw)
    if schedule is None:
        names = node_names(nodes)
        schedule = _sc.build(scenario, names, duration_s, child_rng(seed, "scenario"), loss=loss)
    cluster = Cluster(config, opts, schedule)
    report = cluster.run(duration_s)
    report["scenario"] = scenario
    return report, cluster
