"""GossipNode: the thin trio shell around the sans-IO SWIM core.

The shell makes no protocol decision. It

* reads datagrams, opens them with the ``Sealer`` and hands the plaintext to
  ``Swim.handle_packet``; a rejected packet is counted by reason
  (``Swim.note_rejected``);
* sleeps until ``Swim.next_deadline()`` and calls ``Swim.tick``;
* serves framed TCP streams: push-pull (``Swim.handle_push_pull``) and user
  request/response streams (``set_stream_handler``);
* carries out effects: ``SendPacket`` is sealed and sent by one sender task
  (in the order the core emitted them), ``StartPushPull`` opens a stream in
  its own task, ``MemberEvent`` / ``UserMessage`` go to subscribers at once.

Theory of operation:

1. Time is ``trio.current_time()``, so the shell runs under ``MockClock``.
2. Events are dispatched synchronously, right after the core call that made
   them (no ``await`` in between), so subscribers see them in the order the
   core decided them even though several tasks call into the core.
3. Nothing a peer sends can raise out of a loop: each packet and each
   connection is handled under its own ``try``; failures are counted and
   logged at debug level. A core exception (a bug) is logged with its
   traceback and counted as ``internal_errors``; the loop carries on.
4. Every queue is bounded: the send queue (``SEND_QUEUE_MAX``, new effects
   dropped and counted beyond it), subscriber channels (events dropped per
   subscriber and counted), concurrent push-pulls and inbound streams.

Stream messages: a sealed head (kind, body length), then the sealed body
``seal(kind byte + payload)``; kinds ``PUSH_PULL``, ``USER`` (request) and
``USER_REPLY`` / ``USER_ERROR`` (responses); framing and sealing in
``gossip/stream_messages_shell.py`` (``StreamMessages``). Inbound streams are admitted,
bounded and refused by the rules of ``gossip/streams.py`` (``StreamGate``);
refusals are counted by reason in ``TransportStats.streams_rejected``.

Seed names. A seed may be a DNS name (a Kubernetes headless Service, a
round-robin record). The core treats a seed as an opaque address and asks
for one join push-pull per seed per attempt; the shell resolves a name
*at every attempt* (so members that come back with new IPs are found) to
all its addresses (at most ``SEED_ADDRS_MAX``), drops our own address, and
push-pulls with each of them at once, as memberlist's ``Join`` does. The
first reply is handed to the core as the seed's reply (the join succeeded);
later replies are merged as ordinary push-pulls; the attempt fails only when
the name resolves to nothing else or every address fails. IP literals are
dialled as before. Resolution is ``trio.socket.getaddrinfo`` unless a
``resolver`` is given; with an injected transport (``MemoryNetwork``) and
no resolver, names are not resolved.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import socket as _stdsocket
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from gossip.config import Config
from gossip.effects import Addr, MemberEvent, SendPacket, StartPushPull, UserMessage
from gossip.seal import REJECT_REASONS, STREAM_CONTEXT, Keyring, KeyringError, PacketRejected
from gossip.seal_shell import new_sealer
from gossip.streams import (
    PUSH_PULL,
    USER,
    USER_ERROR,
    USER_REPLY,
    GateStatistics,
    StreamGate,
    StreamRefused,
)
from gossip.stream_messages_shell import StreamMessages
from gossip.swim import Swim
from gossip.addr import format_addr
from gossip.transport import (
    FramedStream,
    FrameTooLarge,
    StreamClosed,
    TransportStats,
    UdpTcpTransport,
)

__all__ = ["GossipNode", "GossipNodeStats", "RequestError", "Resolver", "resolve_seed"]

log = logging.getLogger("peerd.gossip")

SEND_QUEUE_MAX = 10_000
PUSH_PULL_INFLIGHT_MAX = 16
MAX_ERROR_TEXT = 500
#: A seed name's addresses contacted per join attempt (the first ones the
#: resolver gives). A headless Service lists every ready pod; 16 is plenty
#: to find the cluster and bounds the fan-out.
SEED_ADDRS_MAX = 16

#: ``await resolver(host, port)`` -> the addresses to dial for a seed name.
Resolver = Callable[[str, int], Awaitable[list[Addr]]]


async def resolve_seed(host: str, port: int) -> list[Addr]:
    """Every address ``host`` resolves to now (``getaddrinfo``, TCP), in the
    resolver's order, without duplicates.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``).
    """
    infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_STREAM)
    out: list[Addr] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        a = (str(sockaddr[0]), int(sockaddr[1]))
        if a not in out:
            out.append(a)
    return out


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class RequestError(Exception):
    """A user stream request failed (connect, timeout, rejected, or the
    remote handler raised)."""


@dataclass(frozen=True)
class GossipNodeStats:
    """Counters of the shell, with the core's and the transport's."""

    core: Any
    transport: TransportStats
    rejected: dict[str, int]
    internal_errors: int
    peer_errors: int
    events_dropped: int
    sends_dropped: int
    oversized_sends: int
    push_pull_ok: int
    push_pull_failed: int
    streams_refused: int
    requests_served: int
    streams: GateStatistics | None = None


@dataclass
class _Counters:
    rejected: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REJECT_REASONS})
    internal_errors: int = 0
    peer_errors: int = 0
    events_dropped: int = 0
    sends_dropped: int = 0
    oversized_sends: int = 0
    push_pull_ok: int = 0
    push_pull_failed: int = 0
    streams_refused: int = 0
    requests_served: int = 0


StreamHandlerFn = Callable[[str, bytes], Awaitable[bytes]]


class GossipNode:
    """One membership member on a transport.

    Args:
        config: membership knobs (``Config.lan()`` in production).
        name: unique member name (1..48 utf-8 bytes).
        bind: address to bind (port 0: any free port).
        advertise: address other members use to reach us (default: the
            bound address; give it when binding 0.0.0.0 or behind NAT).
        seeds: members to join through (may be down; the core retries).
        keyring: shared keyring; ``None`` only with ``insecure=True``.
        insecure: run unsealed (explicit opt-in).
        tags, meta: initial member metadata.
        transport: an already-open transport (tests: ``MemoryNetwork``);
            default opens a ``UdpTcpTransport`` on ``bind`` in ``run``.
        rng: randomness for the core (default seeded from ``os.urandom``).
        epoch: boot epoch for replay protection (default wall-clock ms).
        resolver: resolves seed names at every join attempt (default
            :func:`resolve_seed` when the shell opens its own UDP/TCP
            transport; none with an injected transport).

    Raises:
        KeyringError: no keyring and not insecure.
    """

    def __init__(
        self,
        config: Config,
        name: str,
        *,
        bind: Addr,
        advertise: Addr | None = None,
        seeds: Sequence[Addr] = (),
        keyring: Keyring | None,
        insecure: bool = False,
        tags: dict[str, str] | None = None,
        meta: bytes = b"",
        transport: Any = None,
        rng: random.Random | None = None,
        epoch: int | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        if keyring is None and not insecure:
            raise KeyringError(
                "no key configured; refusing to start (set insecure = true to run unsealed)"
            )
        self.config = config
        self.name = name
        self._bind = bind
        self._advertise = advertise
        self._seeds = list(seeds)
        self._resolver = resolver if resolver is not None else (resolve_seed if transport is None else None)
        self._keyring = keyring
        self._tags = dict(tags or {})
        self._meta = meta
        self._transport = transport
        self._rng = rng if rng is not None else random.Random()
        self._epoch = epoch if epoch is not None else int(time.time() * 1000)
        self.sealer = new_sealer(
            keyring,
            name,
            self._epoch,
            insecure=insecure,
            max_packet_bytes=max(config.packet_budget_bytes, 65507),
        )
        # stream frames: the same keyring, their own seq and replay table
        self.stream_sealer = new_sealer(keyring, name, self._epoch, insecure=insecure,
                                        max_packet_bytes=max(config.packet_budget_bytes, 65507),
                                        context=STREAM_CONTEXT)
        self._messages = StreamMessages(config, self.sealer, self.stream_sealer,
                                        self._members_known, self._reject)
        self._core: Any = None
        self._counters = _Counters()
        self._subscribers: list[trio.MemorySendChannel] = []
        self._outbox: collections.deque = collections.deque()
        self._outbox_wakeup = trio.Event()
        self._timer_wakeup = trio.Event()
        self._timer_target = math.inf
        self._push_pulls_inflight = 0
        self._gate = StreamGate.from_config(config)
        self._stream_handler: StreamHandlerFn | None = None
        self._nursery: trio.Nursery | None = None
        self._cancel: trio.CancelScope | None = None
        self._bound: Addr | None = None
        self._started = trio.Event()
        self._stopped = trio.Event()

    # -- properties ----------------------------------------------------------
    @property
    def bound_addr(self) -> Addr:
        if self._bound is None:
            raise RuntimeError("node not started")
        return self._bound

    @property
    def advertise_addr(self) -> Addr:
        return self._advertise if self._advertise is not None else self.bound_addr

    @property
    def core(self) -> Any:
        if self._core is None:
            raise RuntimeError("node not started")
        return self._core

    @property
    def keyring(self) -> Keyring | None:
        return self._keyring

    @property
    def transport(self) -> Any:
        return self._transport

    # -- lifecycle -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, join the seeds and run until cancelled (or ``leave``).

        Calls ``task_status.started()`` once bound; ``bound_addr`` is then set.
        """
        own_transport = self._transport is None
        if own_transport:
            self._transport = await UdpTcpTransport.open(self._bind)
        self._bound = self._transport.local_addr
        try:
            self._core = Swim(
                self.config,
                self.name,
                self.advertise_addr,
                rng=self._rng,
                now=trio.current_time(),
                tags=self._tags,
                meta=self._meta,
            )
            with trio.CancelScope() as cancel:
                self._cancel = cancel
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._transport.serve_streams, self._serve_stream)
                    nursery.start_soon(self._sender_loop)
                    nursery.start_soon(self._receive_loop)
                    nursery.start_soon(self._timer_loop)
                    self._started.set()
                    task_status.started()
                    if self._seeds:
                        self._apply(self._core.join(list(self._seeds), trio.current_time()))
        finally:
            self._nursery = None
            self._stopped.set()
            for ch in self._subscribers:
                ch.close()
            self._subscribers.clear()
            if own_transport:
                with trio.CancelScope(shield=True):
                    await self._transport.aclose()

    def stop(self) -> None:
        """Stop at once without telling anyone (as a crash would)."""
        if self._cancel is not None:
            self._cancel.cancel()

    async def leave(self, timeout_s: float = 5.0) -> None:
        """Leave gracefully: broadcast our departure, wait until it went out
        (or ``timeout_s``), then stop ``run``."""
        if self._core is None or self._stopped.is_set():
            return
        self._apply(self._core.leave(trio.current_time()))
        with trio.move_on_after(timeout_s):
            while not self._leave_flushed():
                await trio.sleep(min(0.01, self.config.gossip_interval_s / 4))
        self.stop()
        await self._stopped.wait()

    def _leave_flushed(self) -> bool:
        if self._outbox:
            return False
        core = self._core
        if not any(m.name != self.name for m in core.alive_members()):
            return True  # nobody to tell
        for attr in ("leave_done", "broadcasts_pending"):
            fn = getattr(core, attr, None)
            if callable(fn):
                value = fn()
                return bool(value) if attr == "leave_done" else value == 0
        stats = core.statistics()
        pending = getattr(stats, "broadcast_queue", getattr(stats, "queued_broadcasts", 0))
        return pending == 0

    # -- public API ------------------------------------------------------------
    def subscribe(self, max_buffer: int = 1000) -> trio.MemoryReceiveChannel:
        """A channel of ``MemberEvent`` and ``UserMessage`` in core order.

        A subscriber that falls behind by ``max_buffer`` loses events (counted
        as ``events_dropped``); it never blocks the node.
        """
        send, recv = trio.open_memory_channel(max_buffer)
        self._subscribers.append(send)
        return recv

    def members(self) -> list:
        return self.core.members()

    def alive_members(self) -> list:
        return self.core.alive_members()

    def statistics(self) -> GossipNodeStats:
        c = self._counters
        return GossipNodeStats(
            core=self.core.statistics() if self._core is not None else None,
            transport=self._transport.stats.snapshot() if self._transport is not None else TransportStats(),
            rejected=dict(c.rejected),
            internal_errors=c.internal_errors,
            peer_errors=c.peer_errors,
            events_dropped=c.events_dropped,
            sends_dropped=c.sends_dropped,
            oversized_sends=c.oversized_sends,
            push_pull_ok=c.push_pull_ok,
            push_pull_failed=c.push_pull_failed,
            streams_refused=c.streams_refused,
            requests_served=c.requests_served,
            streams=self._gate.statistics(),
        )

    def update_local(self, tags: dict[str, str] | None = None, meta: bytes | None = None) -> None:
        self._apply(self.core.update_local(trio.current_time(), tags=tags, meta=meta))

    def queue_user_broadcast(self, key: str, data: bytes) -> None:
        self._apply(self.core.queue_user_broadcast(key, data))

    def send_user(self, addr: Addr, data: bytes) -> None:
        self._apply(self.core.send_user(addr, data))

    def set_stream_handler(self, fn: StreamHandlerFn | None) -> None:
        """Serve user streams with ``await fn(sender, data) -> reply``."""
        self._stream_handler = fn

    def install_key(self, key: bytes) -> None:
        self._require_keyring().install(key)

    def use_key(self, key: bytes) -> None:
        self._require_keyring().use(key)

    def remove_key(self, key: bytes) -> None:
        self._require_keyring().remove(key)

    def _require_keyring(self) -> Keyring:
        if self._keyring is None:
            raise KeyringError("node runs insecure (no keyring)")
        return self._keyring

    async def request(self, addr: Addr, data: bytes, timeout_s: float = 5.0) -> bytes:
        """Sealed user-stream round trip to the member at ``addr``.

        Raises:
            RequestError: connect failure, timeout, a rejected reply, or the
                remote handler's error.
        """
        try:
            with trio.fail_after(timeout_s):
                stream = await self._transport.connect(addr)
                try:
                    await self._messages.send(stream, USER, data)
                    _sender, kind, body = await self._messages.recv(stream)
                finally:
                    await stream.aclose()
        except trio.TooSlowError:
            raise RequestError(f"request to {format_addr(addr)} timed out after {timeout_s} s") from None
        except (OSError, StreamClosed, FrameTooLarge) as exc:
            raise RequestError(f"request to {format_addr(addr)} failed: {exc}") from None
        except StreamRefused as exc:
            raise RequestError(f"reply from {format_addr(addr)} rejected: {exc}") from None
        if kind == USER_REPLY:
            return body
        if kind == USER_ERROR:
            raise RequestError(
                f"{format_addr(addr)} handler failed: {body.decode('utf-8', 'replace')}"
            )
        raise RequestError(f"reply from {format_addr(addr)} has unexpected kind {kind}")

    # -- stream messages (gossip/stream_messages_shell.py) -----------------------------
    def _members_known(self) -> int:
        core = self._core
        if core is None:
            return 1
        return max(1, sum(core.statistics().members_by_state.values()))

    # -- effects ---------------------------------------------------------------
    def _apply(self, effects) -> None:
        """Dispatch events now; queue sends for the sender task (no await)."""
        if not effects:
            self._kick_timer()
            return
        for eff in effects:
            if isinstance(eff, (MemberEvent, UserMessage)):
                self._publish(eff)
            elif isinstance(eff, (SendPacket, StartPushPull)):
                if len(self._outbox) >= SEND_QUEUE_MAX:
                    self._counters.sends_dropped += 1
                    continue
                self._outbox.append(eff)
                self._outbox_wakeup.set()
            else:
                log.warning("unknown effect %r", eff)
        self._kick_timer()

    def _publish(self, event) -> None:
        for ch in list(self._subscribers):
            try:
                ch.send_nowait(event)
            except trio.WouldBlock:
                self._counters.events_dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(ch)

    def _kick_timer(self) -> None:
        if self._core is not None and self._core.next_deadline() < self._timer_target:
            self._timer_wakeup.set()

    def _reject(self, reason: str) -> None:
        self._counters.rejected[reason] = self._counters.rejected.get(reason, 0) + 1
        try:
            self._apply(self._core.note_rejected(reason))
        except Exception:
            self._counters.internal_errors += 1
            log.exception("core.note_rejected failed")

    def _core_call(self, what: str, fn, *args) -> Any:
        """Call into the core; a core exception is a bug, logged and counted."""
        try:
            return fn(*args)
        except Exception:
            self._counters.internal_errors += 1
            log.exception("%s: core raised (bug); input dropped", what)
            return None

    # -- loops -------------------------------------------------------------------
    async def _sender_loop(self) -> None:
        budget = self.config.packet_budget_bytes
        while True:
            if not self._outbox:
                self._outbox_wakeup = trio.Event()
                await self._outbox_wakeup.wait()
                continue
            eff = self._outbox.popleft()
            if isinstance(eff, SendPacket):
                try:
                    data = self.sealer.seal(eff.data)
                except Exception:
                    self._counters.internal_errors += 1
                    log.exception("seal failed")
                    continue
                if len(data) > budget:
                    self._counters.oversized_sends += 1
                    log.warning("datagram of %d bytes over the %d budget", len(data), budget)
                await self._transport.send_to(eff.addr, data)
            else:
                self._start_push_pull(eff)

    async def _receive_loop(self) -> None:
        while True:
            try:
                src, data = await self._transport.recv()
            except OSError as exc:  # e.g. ENOBUFS; never fatal, never a spin
                self._counters.peer_errors += 1
                log.debug("receive failed: %s", exc)
                await trio.sleep(0.01)
                continue
            try:
                _sender, body = self.sealer.open(data)
            except PacketRejected as exc:
                log.debug("packet from %s rejected: %s", format_addr(src), exc)
                self._reject(exc.reason)
                continue
            effects = self._core_call(
                "handle_packet", self._core.handle_packet, src, body, trio.current_time()
            )
            self._apply(effects)

    async def _timer_loop(self) -> None:
        while True:
            deadline = self._core.next_deadline()
            if deadline > trio.current_time():
                self._timer_target = deadline
                self._timer_wakeup = trio.Event()
                with trio.move_on_at(deadline):
                    await self._timer_wakeup.wait()
                self._timer_target = math.inf
                continue
            now = trio.current_time()
            self._apply(self._core_call("tick", self._core.tick, now))
            if self._core.next_deadline() <= now:
                # the core did not move its deadline: do not spin
                await trio.sleep(0.001)

    # -- push-pull (client side) -------------------------------------------------
    def _start_push_pull(self, eff: StartPushPull) -> None:
        if self._nursery is None or self._push_pulls_inflight >= PUSH_PULL_INFLIGHT_MAX:
            self._counters.push_pull_failed += 1
            self._apply(self._core_call("push_pull_failed", self._core.push_pull_failed, eff.addr, trio.current_time()))
            return
        self._push_pulls_inflight += 1
        self._nursery.start_soon(self._push_pull, eff)

    async def _push_pull(self, eff: StartPushPull) -> None:
        try:
            if eff.join and self._resolver is not None and not _is_ip_literal(eff.addr[0]):
                await self._join_by_name(eff)
                return
            body = await self._exchange(eff.addr, eff.data)
            now = trio.current_time()
            if body is None:
                self._counters.push_pull_failed += 1
                self._apply(self._core_call("push_pull_failed", self._core.push_pull_failed, eff.addr, now))
            else:
                self._counters.push_pull_ok += 1
                self._apply(
                    self._core_call("handle_push_pull_reply", self._core.handle_push_pull_reply, eff.addr, body, now)
                )
        finally:
            self._push_pulls_inflight -= 1

    async def _exchange(self, addr: Addr, data: bytes) -> bytes | None:
        """One push-pull round trip with ``addr``: the reply's payload, or
        None on failure (a rejected reply is counted by reason)."""
        try:
            with trio.fail_after(self.config.stream_timeout_s):
                stream = await self._transport.connect(addr)
                try:
                    await self._messages.send(stream, PUSH_PULL, data)
                    _sender, kind, body = await self._messages.recv(stream)
                finally:
                    await stream.aclose()
            if kind != PUSH_PULL:
                raise StreamRefused("malformed", f"push-pull reply of kind {kind}")
        except StreamRefused as exc:
            log.debug("push-pull reply from %s refused: %s", format_addr(addr), exc)
            return None
        except (trio.TooSlowError, OSError, StreamClosed, FrameTooLarge) as exc:
            log.debug("push-pull with %s failed: %s", format_addr(addr), exc)
            return None
        return body

    async def _join_by_name(self, eff: StartPushPull) -> None:
        """A join attempt through a seed name: resolve it now, push-pull with
        each address but our own; the first reply is the seed's reply."""
        host, port = eff.addr
        try:
            # half a stream timeout, so resolving and the exchange together
            # end before the core's join deadline (1.5 stream timeouts)
            with trio.fail_after(self.config.stream_timeout_s / 2):
                addrs = list(await self._resolver(host, port))
        except Exception as exc:  # gaierror, timeout, or a resolver's bug
            log.info("seed %s: cannot resolve: %s", format_addr(eff.addr), exc or type(exc).__name__)
            addrs = []
        own = {self.advertise_addr, self._bound}
        targets = [(str(a[0]), int(a[1])) for a in addrs]
        targets = [a for a in dict.fromkeys(targets) if a not in own][:SEED_ADDRS_MAX]
        log.debug("seed %s resolves to %s", format_addr(eff.addr), ", ".join(map(format_addr, targets)) or "nothing but us")
        replied = False

        async def one(addr: Addr) -> None:
            nonlocal replied
            body = await self._exchange(addr, eff.data)
            if body is None:
                self._counters.push_pull_failed += 1
                return
            self._counters.push_pull_ok += 1
            replied = True
            self._apply(self._core_call(
                "handle_push_pull_reply", self._core.handle_push_pull_reply, eff.addr, body, trio.current_time()
            ))

        async with trio.open_nursery() as nursery:
            for addr in targets:
                nursery.start_soon(one, addr)
        if not replied:
            self._apply(self._core_call(
                "push_pull_failed", self._core.push_pull_failed, eff.addr, trio.current_time()
            ))

    # -- streams (server side) -----------------------------------------------------
    def _refuse_stream(self, stream: FramedStream, reason: str, detail: object = "") -> None:
        self._transport.stats.reject_stream(reason)
        log.debug("stream from %s refused: %s %s", format_addr(stream.peer), reason, detail)

    async def _serve_stream(self, stream: FramedStream) -> None:
        """Serve one inbound stream under the rules of ``gossip/streams.py``."""
        source = stream.peer[0]
        reason = self._gate.admit(source)  # before any byte is read
        if reason is not None:
            self._counters.streams_refused += 1
            self._refuse_stream(stream, reason)
            await stream.aclose()
            return
        authenticated = False
        received = False
        reserved = 0
        try:
            with trio.move_on_after(self.config.stream_timeout_s) as whole:
                with trio.move_on_after(self.config.stream_head_timeout_s) as head_scope:
                    sender, kind, body_len = await self._messages.recv_head(stream)
                if head_scope.cancelled_caught:
                    raise StreamRefused("timeout", f"no head within {self.config.stream_head_timeout_s} s")
                self._gate.authenticated(source)
                authenticated = True
                if kind not in (PUSH_PULL, USER):
                    raise StreamRefused("malformed", f"a stream opened with a message of kind {kind}")
                limit = self._messages.body_limit(kind)
                if body_len > limit:
                    raise StreamRefused("oversized", f"body of {body_len} bytes announced, limit {limit}")
                if not self._gate.reserve(body_len):
                    raise StreamRefused("buffer_budget", f"body of {body_len} bytes announced")
                reserved = body_len
                payload = await self._messages.recv_body(stream, sender, kind, body_len)
                received = True
                await self._serve_one(stream, sender, kind, payload)
            if whole.cancelled_caught:
                if received:  # our side (the handler) was too slow
                    self._counters.peer_errors += 1
                    log.debug("stream from %s: handler timed out", format_addr(stream.peer))
                else:
                    self._refuse_stream(stream, "timeout", f"no whole message within {self.config.stream_timeout_s} s")
        except StreamRefused as exc:
            self._refuse_stream(stream, exc.reason, exc.detail)
        except (StreamClosed, FrameTooLarge, OSError) as exc:
            self._counters.peer_errors += 1
            log.debug("stream from %s dropped: %s", format_addr(stream.peer), exc)
        except Exception:
            self._counters.internal_errors += 1
            log.exception("stream from %s: unexpected error", format_addr(stream.peer))
        finally:
            if reserved:
                self._gate.release(reserved)
            self._gate.close(source, authenticated)
            await stream.aclose()

    async def _serve_one(self, stream: FramedStream, sender: str, kind: int, payload: bytes) -> None:
        if kind == PUSH_PULL:
            result = self._core_call(
                "handle_push_pull", self._core.handle_push_pull, stream.peer, payload, trio.current_time()
            )
            if result is None:
                return
            reply, effects = result
            self._apply(effects)
            if reply is not None:
                await self._messages.send(stream, PUSH_PULL, reply)
            return
        handler = self._stream_handler
        if handler is None:
            out_kind, out = USER_ERROR, b"no stream handler on this member"
        else:
            try:
                out_kind, out = USER_REPLY, bytes(await handler(sender, payload))
                self._counters.requests_served += 1
            except Exception as exc:
                log.debug("stream handler failed for %s", sender, exc_info=True)
                text = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT]
                out_kind, out = USER_ERROR, text.encode("utf-8", "replace")
        try:
            await self._messages.send(stream, out_kind, out)
        except FrameTooLarge as exc:
            log.warning("reply to %s not sent: %s", sender, exc)
            await self._messages.send(stream, USER_ERROR, f"reply not sent: {exc}".encode())
