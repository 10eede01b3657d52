"""A node's peers (shell): membership events handed to the core, and the
peer-message transport (requests served and sent over sealed gossip streams).
"""
from __future__ import annotations

import logging

import msgpack
import trio

from gossip.effects import EventKind, MemberEvent, UserMessage

from node import peerwire
from node.api.messages import HTTPError

from node.clock_shell import wall_clock

log = logging.getLogger("peerd.node")


class PeersMixin:
    """Membership and peer messages: a mixin of :class:`node.shell.Node`, whose
    constructor holds the state it uses."""

    # ------------------------------------------------------------ membership
    def _view(self) -> list[tuple[str, str, dict]]:
        if self.gossip is None:
            return []
        return [(m.name, m.state.value, dict(m.tags)) for m in self.gossip.members()]

    async def _event_loop(self, events) -> None:
        async for ev in events:
            try:
                if isinstance(ev, MemberEvent):
                    self._on_member_event(ev)
                elif isinstance(ev, UserMessage):
                    _, effects = self.core.serve(ev.sender, ev.data, wall_clock())
                    self._do(effects)
            except Exception:
                log.exception("failed to handle %s", type(ev).__name__)

    def _on_member_event(self, ev: MemberEvent) -> None:
        m = ev.member
        if ev.kind in (EventKind.JOIN, EventKind.UPDATE):
            try:
                meta = msgpack.unpackb(m.meta, raw=False) if m.meta else {}
                if isinstance(meta, dict) and isinstance(meta.get("api"), str):
                    self._members_api[m.name] = meta["api"]
            except Exception:
                log.warning("member %s has unreadable metadata", m.name, extra={"member": m.name})
        log.info("member %s %s (incarnation %d)", m.name, ev.kind.value, m.incarnation, extra={"member": m.name})
        self._do(self.core.members_changed(self._view(), wall_clock(), kind=ev.kind.value, member=m.name))

    async def _handle_request(self, sender: str, data: bytes) -> bytes:
        """Serve a peer's stream request (sealed by gossip)."""
        wall = wall_clock()
        try:
            msg = peerwire.decode(data)
        except peerwire.PeerProtocolError as e:
            log.warning("bad request from %s: %s", sender, e, extra={"peer": sender})
            return peerwire.reply(False, wall, error=str(e))
        t = msg["t"]
        try:
            if t in ("push", "ae"):
                reply, effects = self.core.serve(sender, data, wall)
                self._do(effects)
                return reply
            if t == "run_now":
                params = msg.get("params")
                if params is not None and not isinstance(params, dict):
                    return peerwire.reply(False, wall, error="run_now: params must be a map")
                return peerwire.reply(True, wall, body=await self._run_now_local(msg["task_id"], params))
            if t == "backfill":
                body = await self._backfill_local(msg["task_id"], msg["start"], msg["end"], msg["dry_run"])
                return peerwire.reply(True, wall, body=body)
            if t == "key":
                return peerwire.reply(True, wall, body=self._key_op_local(msg["op"], msg["key"]))
            if t == "logs":
                body = self._logs_local(msg["run_id"][:200], max(0, msg["offset"]))
                return peerwire.reply(True, wall, body=body)
            if t == "cancel":
                return peerwire.reply(True, wall, body=self._cancel_local(msg["run_id"][:200], msg["by"][:200]))
        except HTTPError as e:
            return peerwire.reply(False, wall, error=e.message)
        except Exception as e:
            log.exception("request %s from %s failed", t, sender)
            return peerwire.reply(False, wall, error=f"{type(e).__name__}: {e}")
        return peerwire.reply(False, wall, error=f"unexpected message type {t}")

    async def _request(self, name: str, msg: dict, timeout_s: float = 10.0) -> dict:
        """Forward an API request to the member that must answer it."""
        m = self.gossip.core.member(name) if self.gossip else None
        if m is None:
            raise HTTPError(503, f"member {name} is unknown here")
        try:
            with trio.fail_after(timeout_s):
                raw = await self.gossip.request(m.addr, peerwire.encode(msg), timeout_s=timeout_s)
        except trio.TooSlowError:
            raise HTTPError(504, f"member {name} did not answer in {timeout_s:.0f}s") from None
        except Exception as e:
            raise HTTPError(502, f"member {name}: {e}") from None
        try:
            rep = peerwire.decode(raw)
        except peerwire.PeerProtocolError as e:
            raise HTTPError(502, f"member {name} answered badly: {e}") from None
        if rep["t"] != "reply":
            raise HTTPError(502, f"member {name} answered with {rep['t']}")
        if not rep["ok"]:
            raise HTTPError(409, f"{name}: {rep.get('error')}")
        return rep
