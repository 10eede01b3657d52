"""Node-to-node messages carried on gossip user channels (sealed by gossip).

Pure codec, no I/O. Every message is a msgpack map with a ``t`` (type) key;
the types are append-only. ``decode`` validates the shape of every field and
raises :class:`PeerProtocolError` (naming the field) for anything else, so a
bad peer can never put a wrong type into the node.

Types:
    push       {"t": "push", "entries": [bytes...]}          store entries, pushed at once
    ae         {"t": "ae", "wall": float, "msg": bytes}     one anti-entropy step (store protocol)
    run_now    {"t": "run_now", "task_id": str}
    backfill   {"t": "backfill", "task_id": str, "start": int, "end": int, "dry_run": bool}
    key        {"t": "key", "op": "install|use|remove|list", "key": str}
    cancel     {"t": "cancel", "run_id": str, "by": str}            end a run on the node that runs it
    logs       {"t": "logs", "run_id": str, "offset": int}          a run's output from byte offset
    reply      {"t": "reply", "ok": bool, "wall": float, "body": any, "error": str}
"""
from __future__ import annotations

from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 8 << 20
TYPES = ("push", "ae", "run_now", "backfill", "key", "reply", "cancel", "logs")


class PeerProtocolError(ValueError):
    """A peer sent something that is not a valid node message."""


_FIELDS: dict[str, dict[str, tuple]] = {
    "push": {"entries": (list,)},
    "ae": {"wall": (float, int), "msg": (bytes,)},
    "run_now": {"task_id": (str,)},
    "backfill": {"task_id": (str,), "start": (int,), "end": (int,), "dry_run": (bool,)},
    "key": {"op": (str,), "key": (str,)},
    "reply": {"ok": (bool,), "wall": (float, int)},
    "cancel": {"run_id": (str,), "by": (str,)},
    "logs": {"run_id": (str,), "offset": (int,)},
}


def encode(msg: dict[str, Any]) -> bytes:
    t = msg.get("t")
    if t not in _FIELDS:
        raise ValueError(f"unknown message type {t!r}")
    return msgpack.packb(msg, use_bin_type=True)


def decode(data: bytes) -> dict[str, Any]:
    """Decode and validate.

    Raises:
        PeerProtocolError: any problem, with the reason.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise PeerProtocolError(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types on bad input
        raise PeerProtocolError(f"not msgpack: {type(e).__name__}") from None
    if not isinstance(msg, dict):
        raise PeerProtocolError("message is not a map")
    t = msg.get("t")
    if not isinstance(t, str) or t not in _FIELDS:
        raise PeerProtocolError(f"unknown message type {t!r:.40}")
    for name, types in _FIELDS[t].items():
        if name not in msg:
            raise PeerProtocolError(f"{t}: missing field {name!r}")
        v = msg[name]
        if isinstance(v, bool) and bool not in types:
            raise PeerProtocolError(f"{t}: field {name!r} has the wrong type")
        if not isinstance(v, types):
            raise PeerProtocolError(f"{t}: field {name!r} has the wrong type")
    if t == "push" and not all(isinstance(e, (bytes, list, tuple)) for e in msg["entries"]):
        raise PeerProtocolError("push: entries must be encoded entries")
    if t == "key" and msg["op"] not in ("install", "use", "remove", "list"):
        raise PeerProtocolError(f"key: unknown op {msg['op']!r}")
    if t == "reply" and not msg["ok"] and not isinstance(msg.get("error"), str):
        raise PeerProtocolError("reply: an error reply needs an 'error' string")
    return msg


def reply(ok: bool, wall: float, body: Any = None, error: str = "") -> bytes:
    return encode({"t": "reply", "ok": ok, "wall": wall, "body": body, "error": error})
