"""The simulator's modelled TCP streams for push-pull: open, serve, reply or fail (a core).

A ``StartPushPull`` effect opens a stream from the initiator to its peer.
The request frame is sealed at the initiator and opened at the peer, the
reply sealed at the peer and opened at the initiator, exactly as
``gossip/udp.py`` frames them (``STREAM_PUSH_PULL`` type byte, 4-byte length
header). The stream fails (the initiator's core gets ``push_pull_failed``)
one round trip later if the peer is not running (connection refused), after
``stream_timeout_s`` if the link is cut either way, or when the peer is
paused past the timeout and serves the request too late.

The functions take the :class:`sim.cluster.Cluster` they act on; its event
loop (``sim/cluster.py``) delivers the ``K_PP_*`` entries scheduled here.
Push-pull runs once per node every push-pull interval, far less often than
datagrams, so this code stays off the compiled hot loop (sim/accel.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gossip.effects import StartPushPull
from gossip.seal import PacketRejected
from sim.kinds import K_PP_FAIL, K_PP_REPLY, K_PP_REQ

if TYPE_CHECKING:
    from sim.cluster import Cluster, SimNode

__all__ = ["STREAM_FRAME_MAX_BYTES", "STREAM_PUSH_PULL", "STREAM_FRAME_HEADER_BYTES",
           "start_push_pull", "pp_request", "pp_reply"]

STREAM_FRAME_MAX_BYTES = 4 * 1024 * 1024  # gossip.transport.MAX_FRAME_BYTES
# Stream frames are ``seal(type byte + payload)`` behind a 4-byte length, as
# in gossip/udp.py (PUSH_PULL = 1); the sim sends the same bytes.
STREAM_PUSH_PULL = b"\x01"
STREAM_FRAME_HEADER_BYTES = 4


def start_push_pull(cluster: Cluster, node: SimNode, e: StartPushPull, t_s: float) -> None:
    cluster.stats["pp_started"] += 1
    net = cluster.net
    sealed = node.sealer.seal(STREAM_PUSH_PULL + e.data)
    net.count_stream(node.idx, len(sealed) + STREAM_FRAME_HEADER_BYTES)
    dst = cluster.by_addr.get(e.addr)
    timeout_s: Any = net.options.stream_timeout_s
    if dst is None:
        cluster.loop.schedule(t_s + timeout_s, K_PP_FAIL, node.idx, e.addr, node.boots)
        return
    peer = cluster.nodes[dst]
    if not net.stream_open(node.idx, dst):
        cluster.loop.schedule(t_s + timeout_s, K_PP_FAIL, node.idx, e.addr, node.boots)
        return
    if not peer.up:  # connection refused one round trip later
        cluster.loop.schedule(t_s + 2 * net.delay_s(), K_PP_FAIL, node.idx, e.addr, node.boots)
        return
    cluster.loop.schedule(t_s + net.delay_s(), K_PP_REQ, dst, node.idx,
                          (sealed, node.boots, t_s, e.join))


def pp_request(cluster: Cluster, peer: SimNode, src: int, payload, t_s: float) -> None:
    sealed, src_boots, started_s, _join = payload
    init = cluster.nodes[src]
    timeout_s = cluster.net.options.stream_timeout_s
    if not peer.up:
        cluster.loop.schedule(t_s + cluster.net.delay_s(), K_PP_FAIL, src, peer.addr, src_boots)
        return
    try:
        sender, body = peer.sealer.open(sealed, max_bytes=STREAM_FRAME_MAX_BYTES)
    except PacketRejected as exc:
        cluster._reject(peer, exc.reason, t_s)
        cluster.loop.schedule(t_s + cluster.net.delay_s(), K_PP_FAIL, src, peer.addr, src_boots)
        return
    body = body[1:]
    if t_s - started_s > timeout_s:
        # Served too late (the peer was paused past the timeout): the
        # initiator's stream timed out; tell it now.
        cluster.loop.schedule(t_s, K_PP_FAIL, src, peer.addr, src_boots)
        return
    reply, effects = peer.core.handle_push_pull(init.addr, body, peer.local(t_s))
    cluster._effects(peer, effects, t_s)
    if peer.up:
        cluster._arm(peer, t_s)
    if reply is None:
        cluster.loop.schedule(t_s + cluster.net.delay_s(), K_PP_FAIL, src, peer.addr, src_boots)
        return
    sealed_reply = peer.sealer.seal(STREAM_PUSH_PULL + reply)
    cluster.net.count_stream(peer.idx, len(sealed_reply) + STREAM_FRAME_HEADER_BYTES)
    cluster.loop.schedule(t_s + cluster.net.delay_s(), K_PP_REPLY, src, peer.idx,
                          (sealed_reply, src_boots))


def pp_reply(cluster: Cluster, node: SimNode, responder: int, payload, t_s: float) -> None:
    sealed, boots = payload
    if not node.up or node.boots != boots:
        return
    peer = cluster.nodes[responder]
    try:
        _sender, body = node.sealer.open(sealed, max_bytes=STREAM_FRAME_MAX_BYTES)
    except PacketRejected as exc:
        cluster._reject(node, exc.reason, t_s)
        cluster.stats["pp_failed"] += 1
        cluster._effects(node, node.core.push_pull_failed(peer.addr, node.local(t_s)), t_s)
        return
    cluster.stats["pp_ok"] += 1
    cluster._effects(node, node.core.handle_push_pull_reply(peer.addr, body[1:], node.local(t_s)), t_s)
