"""HTTP tasks against a real local server (trio + h11 on 127.0.0.1, port 0):
node/run/http_client_shell.py through node.run.executor_shell.execute."""

import datetime
import ipaddress
import json
import socket
import ssl
from functools import partial

import h11
import pytest
import trio

from node.run.attempt import RunContext
from node.run.executor_shell import execute
from node.run.urls import parse_url

SLOT = 1795734000


def make_ctx(**kw) -> RunContext:
    d = dict(task_id="ping", slot=SLOT, run_id="run-7", attempt=2, node="n3", fencing_token=42,
             env={}, cwd=None, timeout_s=10.0)
    d.update(kw)
    return RunContext(**d)


class Server:
    """A tiny HTTP/1.1 server; behaviour chosen by the request path."""

    def __init__(self):
        self.requests = []  # (method, target, {lower-name: value}, body)
        self.port = None

    async def handle(self, stream):
        conn = h11.Connection(h11.SERVER)
        req, body = None, b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                return
        path = req.target.decode()
        headers = {n.decode().lower(): v.decode() for n, v in req.headers}
        self.requests.append((req.method.decode(), path, headers, body))
        if path == "/hang":
            await trio.sleep_forever()
        if path == "/garbage":
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            await stream.aclose()
            return
        status, out = {
            "/ok": (200, b"hello"),
            "/fail": (500, b"broken"),
            "/nocontent": (204, b""),
            "/big": (200, b"y" * 1_000_000 + b"END"),
        }.get(path.split("?")[0], (200, json.dumps({"headers": headers, "body": body.decode()}).encode()))
        resp_headers = [("Content-Length", str(len(out)))] if status != 204 else []
        data = conn.send(h11.Response(status_code=status, headers=resp_headers))
        if out:
            data += conn.send(h11.Data(data=out))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        await stream.aclose()

    def url(self, path, scheme="http"):
        return f"{scheme}://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def server(nursery):
    srv = Server()
    listeners = await nursery.start(partial(trio.serve_tcp, srv.handle, 0, host="127.0.0.1"))
    srv.port = listeners[0].socket.getsockname()[1]
    return srv


async def test_200_ok(server):
    r = await execute({"type": "http", "method": "GET", "url": server.url("/ok")}, make_ctx())
    assert (r.status, r.http_status, r.exit_code, r.error) == ("succeeded", 200, None, None)
    assert r.output == "hello"


async def test_500_is_failed(server):
    r = await execute({"type": "http", "url": server.url("/fail")}, make_ctx())
    assert (r.status, r.http_status) == ("failed", 500)
    assert r.error == "HTTP 500 Internal Server Error, expected 2xx"
    assert r.output == "broken"


async def test_expect_status(server):
    r = await execute({"type": "http", "url": server.url("/nocontent"), "expect_status": [200, 204]}, make_ctx())
    assert (r.status, r.http_status, r.output) == ("succeeded", 204, "")
    r = await execute({"type": "http", "url": server.url("/ok"), "expect_status": 201}, make_ctx())
    assert r.status == "failed" and r.error.endswith("expected 201")
    r = await execute({"type": "http", "url": server.url("/fail"), "expect_status": [500]}, make_ctx())
    assert (r.status, r.http_status) == ("succeeded", 500)
    # an empty list means "any 2xx" (node.tasks.commands.HttpCommand.to_dict() writes [])
    r = await execute({"type": "http", "url": server.url("/fail"), "expect_status": []}, make_ctx())
    assert r.status == "failed" and r.error.endswith("expected 2xx")


async def test_headers_body_and_fencing_token_reach_the_server(server):
    cmd = {"type": "http", "method": "post", "url": server.url("/echo?x=1"),
           "headers": {"Content-Type": "text/plain", "X-Custom": "yes", "X-Fencing-Token": "forged",
                       "Content-Length": "999"},
           "body": "payload-é"}
    r = await execute(cmd, make_ctx())
    assert r.status == "succeeded", r.error
    ((method, path, headers, body),) = server.requests
    assert (method, path, body) == ("POST", "/echo?x=1", "payload-é".encode())
    assert headers["x-fencing-token"] == "42"  # ours, not the forged one
    assert headers["x-peerd-task-id"] == "ping"
    assert headers["x-peerd-slot"] == "2026-11-26T23:00:00Z"
    assert headers["x-peerd-run-id"] == "run-7"
    assert headers["x-peerd-attempt"] == "2"
    assert headers["x-custom"] == "yes"
    assert headers["content-type"] == "text/plain"
    assert headers["content-length"] == str(len("payload-é".encode()))
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert json.loads(r.output)["body"] == "payload-é"


async def test_no_fencing_header_without_token(server):
    r = await execute({"type": "http", "url": server.url("/echo")}, make_ctx(fencing_token=None))
    assert r.status == "succeeded"
    assert "x-fencing-token" not in server.requests[0][2]


async def test_timeout_against_a_server_that_never_answers(server):
    t0 = trio.current_time()
    r = await execute({"type": "http", "url": server.url("/hang")}, make_ctx(timeout_s=0.5))
    assert r.status == "timeout"
    assert "within 0.5s" in r.error
    assert r.http_status is None
    assert trio.current_time() - t0 < 5


async def test_timeout_when_nobody_accepts():
    # a listening socket that never accepts: connect succeeds (backlog), no reply
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        r = await execute({"type": "http", "url": f"http://127.0.0.1:{port}/"}, make_ctx(timeout_s=0.5))
    assert r.status == "timeout"


async def test_connection_refused_is_failed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        r = await execute({"type": "http", "url": f"http://127.0.0.1:{port}/"}, make_ctx())
    assert r.status == "failed"
    assert "cannot connect" in r.error and "refused" in r.error.lower()


async def test_response_body_is_bounded(server):
    r = await execute({"type": "http", "url": server.url("/big")}, make_ctx(output_limit_bytes=1000))
    assert r.status == "succeeded"
    assert r.output.startswith(f"[... {1_000_003 - 1000} bytes truncated]\n")
    assert r.output.endswith("y" * 997 + "END")


async def test_garbage_response_is_failed(server):
    r = await execute({"type": "http", "url": server.url("/garbage")}, make_ctx())
    assert r.status == "failed"
    assert "bad response" in r.error or "closed" in r.error


@pytest.mark.parametrize(
    ("url", "host", "port", "target", "authority"),
    [
        ("http://example.com", "example.com", 80, "/", "example.com"),
        ("https://example.com/a/b?c=d", "example.com", 443, "/a/b?c=d", "example.com"),
        ("http://127.0.0.1:8080/x", "127.0.0.1", 8080, "/x", "127.0.0.1:8080"),
        ("http://[::1]:81/", "::1", 81, "/", "[::1]:81"),
    ],
)
def test_parse_url(url, host, port, target, authority):
    u = parse_url(url)
    assert (u.host, u.port, u.target, u.authority) == (host, port, target, authority)


@pytest.mark.parametrize("url", ["", "ftp://x/", "http:///path", "http://u:p@h/", "http://h:99999/", "http://h/a b"])
def test_parse_url_rejects(url):
    with pytest.raises(ValueError):
        parse_url(url)


# --- https --------------------------------------------------------------------


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peerd-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_with_verification(nursery, tmp_path):
    cert_path, key_path = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    srv = Server()

    async def tls_handle(stream):
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return  # the untrusting client hung up
        await srv.handle(tls)

    listeners = await nursery.start(partial(trio.serve_tcp, tls_handle, 0, host="127.0.0.1"))
    srv.port = listeners[0].socket.getsockname()[1]

    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    r = await execute({"type": "http", "url": srv.url("/ok", "https")}, make_ctx(), ssl_context=client_ctx)
    assert (r.status, r.http_status, r.output) == ("succeeded", 200, "hello"), r.error
    # the default context does not trust a self-signed certificate
    r = await execute({"type": "http", "url": srv.url("/ok", "https")}, make_ctx())
    assert r.status == "failed"
    assert "TLS handshake" in r.error and "certificate" in r.error.lower()
