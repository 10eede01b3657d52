"""The status page at ``/`` over HTTP, against one real node (in-process,
real sockets, real SQLite): the files are served without a token and with
a strict CSP, nothing else is served under ``/ui/``, the data routes keep
their token, and the script only uses routes the API has and never writes
HTML from strings."""
from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from node.api import status_page
from node.api.routes_shell import match_route
from node.run.http_client_shell import request
from tests.cluster_util import start_solo_node

TOKEN = "page-test-token"


@pytest.fixture
async def node(tmp_path, nursery):
    n = await start_solo_node(tmp_path, nursery, token=TOKEN)
    yield n
    await n.shutdown()
    nursery.cancel_scope.cancel()


async def fetch(node, method, path, token=None, body=None):
    host, port = node.api_addr
    headers = [("Authorization", f"Bearer {token}")] if token else []
    r = await request(method, f"http://{host}:{port}{path}", headers=headers, body=body,
                      timeout_s=10, max_body_bytes=1 << 20)
    return r.status, {k.lower(): v for k, v in r.headers}, r.body_tail


def static_text(name: str) -> str:
    return resources.files("node.api").joinpath("static", name).read_text(encoding="utf-8")


@pytest.mark.parametrize("path,ctype", [
    ("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css"),
])
async def test_assets_served_without_token_with_security_headers(node, path, ctype):
    status, headers, body = await fetch(node, "GET", path)
    assert status == 200, body[:200]
    assert headers["content-type"].startswith(ctype)
    csp = headers["content-security-policy"]
    assert csp == status_page.CSP
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert body == static_text(status_page.ASSETS[path][0]).encode()


async def test_page_has_no_inline_script_or_style(node):
    _, _, body = await fetch(node, "GET", "/")
    html = body.decode()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S | re.I)
    assert scripts, "the page loads its script"
    for attrs, inner in scripts:
        assert 'src="/ui/' in attrs and not inner.strip(), (attrs, inner)
    assert not re.search(r"\son[a-z]+\s*=", html, re.I), "inline event handler"
    assert not re.search(r"\sstyle\s*=", html, re.I), "inline style"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "nothing from another origin"


@pytest.mark.parametrize("method,path,status", [
    ("POST", "/", 405), ("PUT", "/ui/app.js", 405), ("DELETE", "/ui/app.css", 405),
    ("GET", "/ui/x", 404), ("GET", "/ui/", 404), ("GET", "/ui/../node.py", 404),
    ("GET", "/ui/static/app.js", 404), ("GET", "/ui/index.html", 404),
])
async def test_other_methods_and_paths_are_refused(node, method, path, status):
    got, _, body = await fetch(node, method, path, body=b"x" if method in ("POST", "PUT") else None)
    assert got == status, body[:200]
    assert "error" in json.loads(body)


async def test_data_routes_still_need_the_token(node):
    for path in ("/v1/status", "/v1/members", "/v1/ring", "/v1/tasks"):
        assert (await fetch(node, "GET", path))[0] == 401, path
        assert (await fetch(node, "GET", path, token="wrong"))[0] == 401, path
        assert (await fetch(node, "GET", path, token=TOKEN))[0] == 200, path
    assert (await fetch(node, "POST", "/v1/tasks/x/pause"))[0] == 401
    # the page itself and /metrics stay open
    assert (await fetch(node, "GET", "/"))[0] == 200
    assert (await fetch(node, "GET", "/metrics"))[0] == 200


async def test_page_requests_are_counted_under_one_label(node):
    for path in ("/", "/ui/app.js", "/ui/nope", "/ui/nope2"):
        await fetch(node, "GET", path)
    _, _, text = await fetch(node, "GET", "/metrics")
    lines = [ln for ln in text.decode().splitlines() if ln.startswith("peerd_api_requests_total{")]
    page = [ln for ln in lines if 'route="page"' in ln and 'method="GET"' in ln]
    assert page and float(page[0].rsplit(" ", 1)[1]) >= 4, lines
    assert not any("nope" in ln for ln in lines), "a client must not create a label"


def test_script_uses_only_existing_routes_and_never_writes_html():
    js = static_text("app.js")
    code = re.sub(r"/\*.*?\*/", "", "\n".join(ln for ln in js.splitlines() if not ln.strip().startswith("//")),
                  flags=re.S)
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                   "new Function", "localStorage"):
        assert banned not in code, banned
    assert "sessionStorage" in js
    paths = set(re.findall(r'"(/(?:v1|metrics)[^"]*)"', js))
    assert {"/v1/status", "/v1/members", "/v1/ring", "/v1/tasks", "/metrics"} <= paths, paths
    for p in sorted(paths):
        probe = (p.rstrip("/") + "/x") if p.endswith("/v1/tasks/") else p
        assert match_route(probe.split("?")[0]) is not None, p
    # per-task routes are built as "/v1/tasks/" + id + suffix: every suffix is a route
    for suffix in re.findall(r'p \+ "(/[a-z]+)', js) + ["/pause", "/resume", "/run"]:
        assert match_route("/v1/tasks/t1" + suffix) is not None, suffix


def test_every_asset_ships_in_the_package():
    for path, (name, _) in status_page.ASSETS.items():
        assert resources.files("node.api").joinpath("static", name).is_file(), (path, name)
    assert status_page.is_page_path("/") and status_page.is_page_path("/ui/app.js")
    assert not status_page.is_page_path("/v1/tasks") and not status_page.is_page_path("/uix")
