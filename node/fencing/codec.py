"""etcd v3 JSON gateway codec (pure core): request and response shapes, base64 keys and values, errors.

No I/O here: :mod:`node.fencing.etcd_shell` sends what :func:`encode_txn` and the
request types build and hands each reply body to the ``decode_*`` functions;
the fencing rules that use these shapes are in :mod:`node.fencing.rules`.

Gateway quirks (etcd 3.4/3.5 JSON gateway, grpc-gateway proto3 JSON):
    * int64 fields arrive as JSON strings (``"revision": "12"``);
    * zero values are omitted: ``succeeded`` when a compare fails, ``kvs`` and
      ``count`` on an empty range, ``value`` when empty, ``version``...;
    * a keep-alive on an expired or unknown lease answers without ``TTL``;
    * streaming endpoints (``/v3/lease/keepalive``) wrap the answer in
      ``{"result": ...}`` and errors in ``{"error": {...}}``;
    * keys and values are base64.
Every decoder raises ``EtcdProtocolError`` naming the field on bad input.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = [
    "EtcdClientError", "EtcdError", "EtcdUnavailable", "EtcdProtocolError",
    "Compare", "Put", "Range", "DeleteRange", "Op", "KeyValue", "PutResponse",
    "RangeResponse", "DeleteRangeResponse", "TxnResult", "LeaseGrant",
    "Status", "encode_txn", "decode_txn", "decode_range", "decode_put",
    "decode_lease_grant", "decode_keepalive", "decode_status",
    "decode_error", "decode_int64", "decode_body", "b64", "unb64",
    "is_auth_error", "is_lease_not_found", "is_retryable_error",
]


# --------------------------------------------------------------------- errors

class EtcdClientError(Exception):
    """Base of every error the etcd client raises."""


class EtcdError(EtcdClientError):
    """etcd answered with an error (gRPC status ``code`` and ``message``)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


class EtcdProtocolError(EtcdClientError):
    """The server's answer is not what the etcd v3 JSON gateway sends."""


class EtcdUnavailable(EtcdClientError):
    """No endpoint answered. ``errors`` lists ``(endpoint, reason)``."""

    def __init__(self, errors: list[tuple[str, str]]):
        detail = "; ".join(f"{ep}: {why}" for ep, why in errors) or "no endpoints"
        super().__init__(f"etcd unavailable ({detail})")
        self.errors = list(errors)


# gRPC status codes used by etcd
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


def is_auth_error(err: EtcdError) -> bool:
    """True if re-authenticating may fix ``err`` (expired/missing token)."""
    msg = err.message.lower()
    return (err.code == GRPC_UNAUTHENTICATED
            or "invalid auth token" in msg
            or "user name is empty" in msg
            or "revision in header is old" in msg)


def is_lease_not_found(err: EtcdError) -> bool:
    return err.code == GRPC_NOT_FOUND and "lease not found" in err.message.lower()


def is_retryable_error(err: EtcdError) -> bool:
    """Errors where another endpoint (or a later retry) may succeed:
    no leader, request timed out, server stopping."""
    msg = err.message.lower()
    return (err.code in (GRPC_UNAVAILABLE, GRPC_DEADLINE_EXCEEDED)
            or "no leader" in msg or "request timed out" in msg
            or "server stopped" in msg or "leader changed" in msg)


# ---------------------------------------------------------------- primitives

def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, field_name: str) -> bytes:
    if not isinstance(text, str):
        raise EtcdProtocolError(f"field {field_name!r}: expected base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise EtcdProtocolError(f"field {field_name!r}: bad base64 ({exc})") from None


def decode_int64(obj: dict, name: str, default: int = 0) -> int:
    """Read an int64 field: a JSON string of digits (gateway quirk) or a JSON
    int; missing means the proto3 zero value ``default``."""
    v = _get(obj, name)
    if v is None:
        return default
    if isinstance(v, bool):
        raise EtcdProtocolError(f"field {name!r}: expected int64, got bool")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        s = v.strip()
        if s[:1] == "-":
            digits = s[1:]
        else:
            digits = s
        if digits.isdigit() and digits.isascii() and len(digits) <= 20:
            return int(s)
    raise EtcdProtocolError(f"field {name!r}: expected int64, got {v!r:.60}")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _get(obj: dict, name: str) -> Any:
    """Field by proto name, accepting the lowerCamelCase JSON name too."""
    if name in obj:
        return obj[name]
    return obj.get(_camel(name))


def _dict(v: Any, name: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise EtcdProtocolError(f"field {name!r}: expected object, got {type(v).__name__}")
    return v


def _list(v: Any, name: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise EtcdProtocolError(f"field {name!r}: expected array, got {type(v).__name__}")
    return v


def decode_body(body: bytes) -> dict:
    """Parse a gateway body. Streaming endpoints answer with one JSON object
    per line (``{"result": ...}`` / ``{"error": ...}``); the first is used."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        raise EtcdProtocolError("empty response body")
    dec = json.JSONDecoder()
    try:
        obj, _ = dec.raw_decode(text)
    except json.JSONDecodeError as exc:
        raise EtcdProtocolError(f"response is not JSON ({exc.msg} at {exc.pos}): {text[:80]!r}") from None
    if not isinstance(obj, dict):
        raise EtcdProtocolError(f"response is not a JSON object: {text[:80]!r}")
    return obj


def decode_error(obj: dict) -> EtcdError | None:
    """The error carried by a decoded body, or None.

    Unary form: ``{"error": "msg", "code": 5, "message": "msg"}``;
    stream form: ``{"error": {"grpc_code": 5, "http_code": 404, "message": ...}}``.
    """
    err = obj.get("error")
    if err is None or err == "":
        return None
    if isinstance(err, dict):
        code = err.get("grpc_code", err.get("grpcCode", err.get("code", 2)))
        msg = err.get("message", "")
    else:
        code = obj.get("code", 2)
        msg = obj.get("message", err)
    if not isinstance(code, int) or isinstance(code, bool):
        code = 2  # gRPC UNKNOWN
    return EtcdError(code, str(msg))


# ------------------------------------------------------------ request types

CompareTarget = Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
CompareResult = Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"]
_TARGET_FIELD = {"VERSION": "version", "CREATE": "create_revision",
                 "MOD": "mod_revision", "VALUE": "value", "LEASE": "lease"}
_OPS = {"=": "EQUAL", "==": "EQUAL", ">": "GREATER", "<": "LESS", "!=": "NOT_EQUAL"}


@dataclass(frozen=True, slots=True)
class Compare:
    """One txn compare: ``target(key) <result> value``."""

    key: bytes
    target: CompareTarget
    result: CompareResult
    value: int | bytes

    def __post_init__(self):
        if self.target not in _TARGET_FIELD:
            raise ValueError(f"bad compare target {self.target!r}")
        if self.result not in _OPS.values():
            raise ValueError(f"bad compare result {self.result!r}")

    @staticmethod
    def version(key: bytes | str, op: str, n: int) -> "Compare":
        return Compare(_key(key), "VERSION", _OPS[op], int(n))

    @staticmethod
    def mod_revision(key: bytes | str, op: str, n: int) -> "Compare":
        return Compare(_key(key), "MOD", _OPS[op], int(n))

    @staticmethod
    def create_revision(key: bytes | str, op: str, n: int) -> "Compare":
        return Compare(_key(key), "CREATE", _OPS[op], int(n))

    @staticmethod
    def value_is(key: bytes | str, op: str, v: bytes | str) -> "Compare":
        return Compare(_key(key), "VALUE", _OPS[op], _key(v))

    def to_json(self) -> dict:
        f = _camel(_TARGET_FIELD[self.target])
        v = b64(self.value) if self.target == "VALUE" else str(self.value)
        return {"key": b64(self.key), "target": self.target, "result": self.result, f: v}


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict:
        d = {"key": b64(self.key), "value": b64(self.value)}
        if self.lease:
            d["lease"] = str(self.lease)
        return {"requestPut": d}


def _key_range_json(key: bytes, range_end: bytes) -> dict:
    d = {"key": b64(key)}
    if range_end:
        d["range_end"] = b64(range_end)
    return d


@dataclass(frozen=True, slots=True)
class Range:
    key: bytes
    range_end: bytes = b""

    def to_json(self) -> dict:
        return {"requestRange": _key_range_json(self.key, self.range_end)}


@dataclass(frozen=True, slots=True)
class DeleteRange:
    key: bytes
    range_end: bytes = b""

    def to_json(self) -> dict:
        return {"requestDeleteRange": _key_range_json(self.key, self.range_end)}


Op = Union[Put, Range, DeleteRange]


def _key(k: bytes | str) -> bytes:
    return k.encode("utf-8") if isinstance(k, str) else bytes(k)


def encode_txn(compare: list[Compare], success: list[Op], failure: list[Op]) -> dict:
    return {"compare": [c.to_json() for c in compare],
            "success": [o.to_json() for o in success],
            "failure": [o.to_json() for o in failure]}


# ----------------------------------------------------------- response types

@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class PutResponse:
    revision: int


@dataclass(frozen=True, slots=True)
class RangeResponse:
    revision: int
    kvs: tuple[KeyValue, ...]
    count: int


@dataclass(frozen=True, slots=True)
class DeleteRangeResponse:
    revision: int
    deleted: int


OpResponse = Union[PutResponse, RangeResponse, DeleteRangeResponse]


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``succeeded`` is False when the gateway omitted it (quirk)."""

    succeeded: bool
    revision: int
    responses: tuple[OpResponse, ...]


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    lease_id: int
    ttl_s: int
    revision: int


@dataclass(frozen=True, slots=True)
class Status:
    version: str
    revision: int
    leader: int
    member_id: int
    raft_term: int
    db_size: int


def _header_revision(obj: dict) -> int:
    return decode_int64(_dict(_get(obj, "header"), "header"), "revision")


def _kv(d: Any, i: int) -> KeyValue:
    d = _dict(d, f"kvs[{i}]")
    return KeyValue(
        key=unb64(d.get("key", ""), f"kvs[{i}].key"),
        value=unb64(d.get("value", ""), f"kvs[{i}].value"),
        create_revision=decode_int64(d, "create_revision"),
        mod_revision=decode_int64(d, "mod_revision"),
        version=decode_int64(d, "version"),
        lease=decode_int64(d, "lease"),
    )


def decode_range(obj: dict) -> RangeResponse:
    kvs = tuple(_kv(d, i) for i, d in enumerate(_list(obj.get("kvs"), "kvs")))
    return RangeResponse(_header_revision(obj), kvs, decode_int64(obj, "count"))


def decode_put(obj: dict) -> PutResponse:
    return PutResponse(_header_revision(obj))


def _check(obj: dict) -> None:
    err = decode_error(obj)
    if err is not None:
        raise err


def decode_txn(obj: dict) -> TxnResult:
    _check(obj)
    succeeded = obj.get("succeeded", False)  # quirk: omitted when false
    if not isinstance(succeeded, bool):
        raise EtcdProtocolError(f"field 'succeeded': expected bool, got {succeeded!r:.40}")
    out: list[OpResponse] = []
    for i, r in enumerate(_list(obj.get("responses"), "responses")):
        r = _dict(r, f"responses[{i}]")
        if _get(r, "response_put") is not None:
            out.append(decode_put(_dict(_get(r, "response_put"), "response_put")))
        elif _get(r, "response_range") is not None:
            out.append(decode_range(_dict(_get(r, "response_range"), "response_range")))
        elif _get(r, "response_delete_range") is not None:
            d = _dict(_get(r, "response_delete_range"), "response_delete_range")
            out.append(DeleteRangeResponse(_header_revision(d), decode_int64(d, "deleted")))
        else:
            raise EtcdProtocolError(f"field 'responses[{i}]': unknown op response {sorted(r)!r:.80}")
    return TxnResult(bool(succeeded), _header_revision(obj), tuple(out))


def decode_lease_grant(obj: dict) -> LeaseGrant:
    _check(obj)
    if isinstance(obj.get("error"), str) and obj["error"]:
        raise EtcdError(2, obj["error"])
    lease_id = decode_int64(obj, "ID")
    if lease_id == 0:
        raise EtcdProtocolError("field 'ID': lease grant returned no lease id")
    return LeaseGrant(lease_id, decode_int64(obj, "TTL"), _header_revision(obj))


def decode_keepalive(obj: dict) -> int | None:
    """Remaining TTL in seconds, or None if the lease is gone (quirk: the
    gateway omits ``TTL`` for an expired or unknown lease)."""
    _check(obj)
    res = _dict(obj.get("result", obj), "result")
    _check(res)
    ttl = decode_int64(res, "TTL", default=0)
    return ttl if ttl > 0 else None


def decode_status(obj: dict) -> Status:
    _check(obj)
    hdr = _dict(_get(obj, "header"), "header")
    v = obj.get("version", "")
    return Status(
        version=v if isinstance(v, str) else str(v),
        revision=decode_int64(hdr, "revision"),
        leader=decode_int64(obj, "leader"),
        member_id=decode_int64(hdr, "member_id"),
        raft_term=decode_int64(obj, "raft_term"),
        db_size=decode_int64(obj, "db_size"),
    )
