"""etcd v3 client over the JSON gateway, on trio (shell).

Speaks HTTP/1.1 POST with JSON bodies (``/v3/kv/txn``, ``/v3/lease/grant``,
...), which etcd 3.4 and later serve on the client port. Encoding/decoding and
the gateway's quirks live in the pure ``node/fencing/codec.py``; this module moves
bytes.

Rules
-----
* Endpoints are tried starting with the last one that answered, then the
  others in configured order; each request is tried at most once per
  endpoint (bounded: ``len(endpoints)`` attempts per call).
* Failover happens on connection errors, TLS errors, per-request timeouts
  (``request_timeout_s``, covering connect + send + receive), non-etcd
  answers and etcd errors that mean "this member cannot serve now" (no
  leader, request timed out: gRPC 4/14). If every endpoint fails the call
  raises ``EtcdUnavailable``. Any other etcd error raises ``EtcdError``.
* A request that timed out may still have been applied by etcd; callers that
  write must be able to recognise their own write on retry (the fencer does:
  Rule 6 of ``node/fencing/rules.py``).
* With ``username``/``password`` the client authenticates
  (``/v3/auth/authenticate``) on first use and sends the token in the
  ``Authorization`` header; on an auth error (invalid/expired token) it
  authenticates again and retries the request once.
* ``https://`` endpoints use TLS (``trio.SSLStream``) verified against
  ``ca_file`` (or the system store); ``cert_file``/``key_file`` add a client
  certificate.
* One TCP connection per request (no pooling; ``node/run/http_client_shell.py``, trio
  + h11): claims are rare (one per slot), and a fresh connection never hits
  a half-closed idle socket.
"""
from __future__ import annotations

import json
import ssl
import urllib.parse
from dataclasses import dataclass

from node.run import http_client_shell as http_client

from node.fencing.codec import (
    Compare, EtcdClientError, EtcdError, EtcdProtocolError, EtcdUnavailable, KeyValue,
    LeaseGrant, Op, RangeResponse, Status, TxnResult, b64, decode_body, decode_error, decode_int64,
    decode_keepalive, decode_lease_grant, decode_put, decode_range, decode_status,
    decode_txn, encode_txn, is_auth_error, is_retryable_error,
)

__all__ = ["EtcdClient", "Endpoint", "parse_endpoint", "EtcdError", "EtcdUnavailable",
           "EtcdProtocolError", "EtcdClientError", "ClientStats"]

#: Largest response body accepted (a range over many claim keys stays far below).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    tls: bool
    host: str
    port: int


def parse_endpoint(url: str) -> Endpoint:
    """``http://host:port`` or ``https://host:port``; raises ValueError naming the URL."""
    u = urllib.parse.urlsplit(url.strip())
    if u.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {url!r}: scheme must be http or https")
    if not u.hostname:
        raise ValueError(f"etcd endpoint {url!r}: no host")
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"etcd endpoint {url!r}: bad port") from None
    if port is None:
        port = 2379
    if u.path not in ("", "/"):
        raise ValueError(f"etcd endpoint {url!r}: must not have a path")
    return Endpoint(url.strip().rstrip("/"), u.scheme == "https", u.hostname, port)


@dataclass(frozen=True, slots=True)
class ClientStats:
    requests: int
    failovers: int
    unavailable: int
    auth_refreshes: int
    current_endpoint: str


class _EndpointFailed(Exception):
    """Internal: this endpoint could not serve the request; try the next."""


class EtcdClient:
    """Minimal etcd v3 JSON-gateway client.

    Args:
        endpoints: list of ``http(s)://host:port`` URLs of one cluster.
        request_timeout_s: bound on one HTTP exchange with one endpoint.
        username, password: enable auth (both or neither).
        ca_file, cert_file, key_file: TLS trust and client certificate.
        ssl_context: a ready context (overrides the file options; tests).
    Raises:
        ValueError: bad endpoint URL or options.
    """

    def __init__(self, endpoints: list[str] | tuple[str, ...], *,
                 request_timeout_s: float = 2.0, username: str = "", password: str = "",
                 ca_file: str = "", cert_file: str = "", key_file: str = "",
                 ssl_context: ssl.SSLContext | None = None):
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("etcd: no endpoints")
        self._endpoints = [parse_endpoint(e) for e in endpoints]
        if request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if bool(username) != bool(password):
            raise ValueError("etcd: username and password go together")
        self.request_timeout_s = request_timeout_s
        self._username, self._password = username, password
        self._token: str | None = None
        self._current = 0
        self._ssl_context = ssl_context
        if ssl_context is None and any(e.tls for e in self._endpoints):
            ctx = ssl.create_default_context(cafile=ca_file or None)
            if cert_file:
                ctx.load_cert_chain(cert_file, key_file or None)
            self._ssl_context = ctx
        self._requests = self._failovers = self._unavailable = self._auth_refreshes = 0

    @classmethod
    def from_config(cls, cfg, **kw) -> "EtcdClient":
        """The client a node's config describes (``node/cli/settings.py``: etcd,
        etcd_user, etcd_password, etcd_ca_file, etcd_cert_file,
        etcd_key_file); keyword arguments win."""
        opts = dict(username=cfg.etcd_user, password=cfg.etcd_password, ca_file=cfg.etcd_ca_file,
                    cert_file=cfg.etcd_cert_file, key_file=cfg.etcd_key_file)
        opts.update(kw)
        return cls(list(cfg.etcd), **opts)

    def load_client_certificate(self, cert_file: str, key_file: str = "") -> None:
        """Present this certificate (and key) to ``https://`` endpoints from
        the next request on; no effect when every endpoint is ``http://``.

        Raises:
            ssl.SSLError, OSError: the files do not hold a certificate and its key.
        """
        if self._ssl_context is not None:
            self._ssl_context.load_cert_chain(cert_file, key_file or None)

    # ------------------------------------------------------------ public API

    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._endpoints]

    def statistics(self) -> ClientStats:
        return ClientStats(self._requests, self._failovers, self._unavailable,
                           self._auth_refreshes, self._endpoints[self._current].url)

    async def txn(self, compare: list[Compare], success: list[Op],
                  failure: list[Op] | None = None) -> TxnResult:
        """Run one transaction. ``succeeded`` is False when a compare failed."""
        return decode_txn(await self.call_raw("/v3/kv/txn", encode_txn(compare, success, failure or [])))

    async def put(self, key: bytes | str, value: bytes | str, *, lease: int = 0) -> int:
        """Put; returns the revision of the write."""
        body = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return decode_put(await self.call_raw("/v3/kv/put", body)).revision

    async def range(self, key: bytes | str, range_end: bytes | str = b"") -> RangeResponse:
        body = {"key": b64(key)}
        if range_end:
            body["range_end"] = b64(range_end)
        return decode_range(await self.call_raw("/v3/kv/range", body))

    async def get(self, key: bytes | str) -> KeyValue | None:
        r = await self.range(key)
        return r.kvs[0] if r.kvs else None

    async def delete(self, key: bytes | str) -> int:
        obj = await self.call_raw("/v3/kv/deleterange", {"key": b64(key)})
        return decode_int64(obj, "deleted")

    async def lease_grant(self, ttl_s: int) -> int:
        """Grant a lease; returns its id."""
        return (await self.lease_grant_full(ttl_s)).lease_id

    async def lease_grant_full(self, ttl_s: int) -> LeaseGrant:
        return decode_lease_grant(await self.call_raw("/v3/lease/grant", {"TTL": str(int(ttl_s))}))

    async def lease_keepalive(self, lease_id: int) -> int | None:
        """Refresh a lease once. Returns the new TTL, or None if the lease
        expired or never existed (the gateway then omits ``TTL``)."""
        return decode_keepalive(await self.call_raw("/v3/lease/keepalive", {"ID": str(lease_id)}))

    async def lease_revoke(self, lease_id: int) -> None:
        await self.call_raw("/v3/lease/revoke", {"ID": str(lease_id)})

    async def status(self) -> Status:
        return decode_status(await self.call_raw("/v3/maintenance/status", {}))

    async def call_raw(self, path: str, body: dict) -> dict:
        """POST ``body`` to ``path`` with failover and auth; the decoded JSON.

        Raises:
            EtcdUnavailable: every endpoint failed.
            EtcdError: etcd answered with a (non-retryable) error.
        """
        self._requests += 1
        errors: list[tuple[str, str]] = []
        n = len(self._endpoints)
        start = self._current
        for i in range(n):
            idx = (start + i) % n
            ep = self._endpoints[idx]
            if i > 0:
                self._failovers += 1
            try:
                obj = await self._call_endpoint(ep, path, body)
            except _EndpointFailed as exc:
                errors.append((ep.url, str(exc)))
                continue
            self._current = idx
            return obj
        self._unavailable += 1
        raise EtcdUnavailable(errors)

    # -------------------------------------------------------------- internals

    async def _call_endpoint(self, ep: Endpoint, path: str, body: dict) -> dict:
        for attempt in range(2):  # second attempt only after an auth refresh
            if self._username and self._token is None:
                await self._authenticate(ep)
            obj = await self._exchange(ep, path, body, self._token)
            err = decode_error(obj)
            if err is None:
                return obj
            if self._username and is_auth_error(err) and attempt == 0:
                self._token = None
                self._auth_refreshes += 1
                continue
            if is_retryable_error(err):
                raise _EndpointFailed(str(err))
            raise err
        raise EtcdError(16, "authentication failed twice")  # pragma: no cover (loop exits via return/raise)

    async def _authenticate(self, ep: Endpoint) -> None:
        obj = await self._exchange(ep, "/v3/auth/authenticate",
                                   {"name": self._username, "password": self._password}, None)
        err = decode_error(obj)
        if err is not None:
            if is_retryable_error(err):
                raise _EndpointFailed(str(err))
            raise err
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise _EndpointFailed("authenticate answered without a token")
        self._token = token

    async def _exchange(self, ep: Endpoint, path: str, body: dict, token: str | None) -> dict:
        """One HTTP POST to one endpoint; bounded by ``request_timeout_s``."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = [("Content-Type", "application/json")]
        if token:
            headers.append(("Authorization", token))
        try:
            resp = await http_client.request(
                "POST", ep.url + path, headers=headers, body=payload,
                timeout_s=self.request_timeout_s, max_body_bytes=MAX_RESPONSE_BYTES,
                ssl_context=self._ssl_context if ep.tls else None)
        except http_client.HttpError as exc:
            raise _EndpointFailed(f"{type(exc).__name__}: {exc}") from None
        if resp.body_truncated_bytes:
            raise _EndpointFailed(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            obj = decode_body(resp.body_tail)
        except EtcdProtocolError as exc:
            raise _EndpointFailed(f"HTTP {resp.status}: {exc}") from None
        if resp.status >= 400 and decode_error(obj) is None:
            raise _EndpointFailed(f"HTTP {resp.status} without an etcd error")
        return obj
