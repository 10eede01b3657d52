"""node/fencing/etcd_shell.py against a REAL etcd (tests/etcd_server.py): txn semantics,
the JSON gateway's quirks observed in raw answers, failover, timeouts, auth
and TLS."""
from __future__ import annotations

import datetime
import ipaddress

import pytest
import trio

from node.fencing.etcd_shell import EtcdClient, parse_endpoint
from node.fencing.codec import (
    Compare, EtcdError, EtcdUnavailable, Put, Range, RangeResponse, b64, encode_txn,
    is_lease_not_found,
)
from tests.etcd_server import EtcdServer, etcd_server, find_etcd_binary, free_port  # noqa: F401

DEADLINE_S = 30


@pytest.fixture
def etcd(etcd_server):
    etcd_server.start()  # no-op when running; heals a test that stopped it
    return etcd_server


async def test_txn_create_if_absent_semantics(etcd):
    c = EtcdClient([etcd.url])
    key = b"/t/client/create"
    with trio.fail_after(DEADLINE_S):
        first = await c.txn([Compare.version(key, "=", 0)], [Put(key, b"a")], [Range(key)])
        second = await c.txn([Compare.version(key, "=", 0)], [Put(key, b"b")], [Range(key)])
    assert first.succeeded is True
    assert first.revision > 0
    assert second.succeeded is False
    assert second.revision == first.revision  # nothing written by the failed txn
    rr = second.responses[0]
    assert isinstance(rr, RangeResponse) and rr.count == 1
    kv = rr.kvs[0]
    assert (kv.key, kv.value, kv.version) == (key, b"a", 1)
    assert kv.mod_revision == kv.create_revision == first.revision
    # mod_revision compare: matches only the observed revision
    stale = await c.txn([Compare.mod_revision(key, "=", kv.mod_revision - 1)], [Put(key, b"x")])
    fresh = await c.txn([Compare.mod_revision(key, "=", kv.mod_revision)], [Put(key, b"c")])
    assert not stale.succeeded and fresh.succeeded
    assert fresh.revision > first.revision
    assert (await c.get(key)).value == b"c"


async def test_quirks_seen_raw(etcd):
    """The quirks exist for real, and the typed API hides them."""
    c = EtcdClient([etcd.url])
    key = b"/t/client/quirk"
    body = encode_txn([Compare.version(key, "=", 0)], [Put(key, b"v")], [])
    with trio.fail_after(DEADLINE_S):
        ok = await c.call_raw("/v3/kv/txn", body)
        failed = await c.call_raw("/v3/kv/txn", body)
        grant = await c.call_raw("/v3/lease/grant", {"TTL": "60"})
    # int64 as strings
    assert isinstance(ok["header"]["revision"], str)
    assert isinstance(grant["ID"], str) and isinstance(grant["TTL"], str)
    # succeeded omitted (not false) when the compare fails
    assert ok["succeeded"] is True
    assert "succeeded" not in failed
    # keep-alive on a revoked lease: no TTL
    lease_id = int(grant["ID"])
    assert await c.lease_keepalive(lease_id) > 0
    await c.lease_revoke(lease_id)
    raw = await c.call_raw("/v3/lease/keepalive", {"ID": str(lease_id)})
    assert "TTL" not in raw["result"], raw
    assert await c.lease_keepalive(lease_id) is None
    # empty range: no kvs, no count
    empty = await c.call_raw("/v3/kv/range", {"key": b64(b"/t/client/none")})
    assert "kvs" not in empty and "count" not in empty
    assert (await c.range(b"/t/client/none")).kvs == ()


async def test_lease_put_and_unknown_lease(etcd):
    c = EtcdClient([etcd.url])
    with trio.fail_after(DEADLINE_S):
        lease = await c.lease_grant(30)
        rev = await c.put(b"/t/client/leased", b"x", lease=lease)
        kv = await c.get(b"/t/client/leased")
        assert kv.lease == lease and kv.mod_revision == rev
        with pytest.raises(EtcdError) as ei:
            await c.put(b"/t/client/leased2", b"x", lease=lease + 12345)
    assert is_lease_not_found(ei.value)
    st = c.statistics()
    assert st.unavailable == 0 and st.failovers == 0


async def test_status(etcd):
    c = EtcdClient([etcd.url])
    with trio.fail_after(DEADLINE_S):
        st = await c.status()
    assert st.version.startswith("3.") and st.revision >= 1 and st.leader != 0


async def test_failover_from_closed_port(etcd):
    dead = f"http://127.0.0.1:{free_port()}"
    c = EtcdClient([dead, etcd.url], request_timeout_s=5)
    with trio.fail_after(DEADLINE_S):
        await c.status()
        assert c.statistics().current_endpoint == etcd.url
        assert c.statistics().failovers == 1
        await c.put(b"/t/client/fo", b"1")  # remembers the good one
    assert c.statistics().failovers == 1


async def test_all_endpoints_down_raises_unavailable():
    c = EtcdClient([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"])
    with trio.fail_after(DEADLINE_S):
        with pytest.raises(EtcdUnavailable) as ei:
            await c.status()
    assert len(ei.value.errors) == 2
    assert c.statistics().unavailable == 1


async def test_silent_endpoint_times_out_then_fails_over(etcd, nursery):
    """A listener that never answers costs one request timeout, not a hang."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held = []

    async def silent(stream):
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, silent, listeners)
    c = EtcdClient([f"http://127.0.0.1:{port}", etcd.url], request_timeout_s=0.5)
    with trio.fail_after(DEADLINE_S):
        t0 = trio.current_time()
        await c.status()
        elapsed = trio.current_time() - t0
    assert 0.5 <= elapsed < 10
    assert c.statistics().current_endpoint == etcd.url


async def test_non_etcd_http_server_is_an_endpoint_failure(etcd, nursery):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def nginx(stream):
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n"
                              b"Connection: close\r\n\r\nnot found")
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, nginx, listeners)
    c = EtcdClient([f"http://127.0.0.1:{port}"])
    with trio.fail_after(DEADLINE_S):
        with pytest.raises(EtcdUnavailable, match="404"):
            await c.status()
    c2 = EtcdClient([f"http://127.0.0.1:{port}", etcd.url])
    with trio.fail_after(DEADLINE_S):
        await c2.status()


def test_parse_endpoint_errors():
    assert parse_endpoint("http://127.0.0.1:2379").port == 2379
    assert parse_endpoint("https://etcd.example").port == 2379
    for bad in ("ftp://x:1", "http://", "http://h:99999", "http://h:1/path", "127.0.0.1:2379"):
        with pytest.raises(ValueError, match="etcd endpoint"):
            parse_endpoint(bad)
    with pytest.raises(ValueError):
        EtcdClient([])
    with pytest.raises(ValueError):
        EtcdClient(["http://h:1"], username="u")


async def test_auth_token_and_refresh(etcd):
    """Runs last in this module: enables auth, then disables it again."""
    admin = EtcdClient([etcd.url])
    with trio.fail_after(DEADLINE_S):
        await admin.call_raw("/v3/auth/user/add", {"name": "root", "password": "pw"})
        await admin.call_raw("/v3/auth/role/add", {"name": "root"})
        await admin.call_raw("/v3/auth/user/grant", {"user": "root", "role": "root"})
        await admin.call_raw("/v3/auth/enable", {})
        c = EtcdClient([etcd.url], username="root", password="pw")
        try:
            with pytest.raises(EtcdError):  # no token: refused
                await admin.put(b"/t/client/auth", b"x")
            rev = await c.put(b"/t/client/auth", b"x")
            assert rev > 0 and c.statistics().auth_refreshes == 0
            c._token = "bogus.1"  # an expired/invalid token: refreshed once, transparently
            assert (await c.get(b"/t/client/auth")).value == b"x"
            assert c.statistics().auth_refreshes == 1
            bad = EtcdClient([etcd.url], username="root", password="wrong")
            with pytest.raises(EtcdError, match="authentication failed"):
                await bad.status()
        finally:
            await c.call_raw("/v3/auth/disable", {})
    assert (await admin.get(b"/t/client/auth")).value == b"x"


def _make_certs(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peerd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {n: str(tmp_path / f"{n}.pem") for n in ("ca", "cert", "key")}
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return paths


async def test_tls_endpoint(tmp_path):
    binary = find_etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary")
    p = _make_certs(tmp_path)
    srv = EtcdServer(binary, cert_file=p["cert"], key_file=p["key"], ca_file=p["ca"])
    try:
        await trio.to_thread.run_sync(srv.start)
        assert srv.url.startswith("https://")
        c = EtcdClient([srv.url], ca_file=p["ca"])
        with trio.fail_after(DEADLINE_S):
            rev = await c.put(b"/t/tls", b"secret")
            assert (await c.get(b"/t/tls")).mod_revision == rev
        untrusted = EtcdClient([srv.url], request_timeout_s=5)  # system CAs only
        with trio.fail_after(DEADLINE_S):
            with pytest.raises(EtcdUnavailable, match="SSL|certificate"):
                await untrusted.status()
    finally:
        await trio.to_thread.run_sync(srv.close)

