"""Traces of runs (node/run/tracing_shell.py).

The pure parts (trace id from the claim run id, W3C ``traceparent``) are
property-tested; the no-op path (no endpoint, or no OpenTelemetry) is
checked to cost nothing and import nothing; and a real in-process node,
its spans caught by the SDK's ``InMemorySpanExporter``, runs a shell task
(a failed try, then a retry), an HTTP task with a notification, a failing
task whose notification cannot be delivered, and (with a real etcd) a
fenced run with its claim span.

Waits are conditions with deadlines.
"""
from __future__ import annotations

import http.server
import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import trio
from hypothesis import given, strategies as st

from node.run import tracing_shell as tracing
from node.run.attempt import RunContext, run_headers
from node.run.executor_shell import run_env
from tests.cluster_util import ROOT, WebhookReceiver, start_solo_node
from tests.etcd_server import etcd_server, free_port  # noqa: F401  (module-scoped fixture)

TOKEN = "tracing-test-token"
FAR = "once:2099-01-01T00:00:00Z"

try:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError:  # the otel extra is not installed
    InMemorySpanExporter = None

needs_otel = pytest.mark.skipif(InMemorySpanExporter is None,
                                reason="OpenTelemetry SDK not installed (pip install '.[otel]')")

run_ids = st.builds(lambda slot, node, h: f"{slot}-{node}-{h:08x}",
                    st.integers(-2**40, 2**40),
                    st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=20),
                    st.integers(0, 2**32 - 1))


# ------------------------------------------------------------ pure functions
@given(run_ids, st.integers(1, 9999))
def test_trace_id_is_a_function_of_the_claim_run_id(run_id, attempt):
    tid = tracing.trace_id_for(run_id)
    assert len(tid) == 32 and int(tid, 16) != 0 and tid == tid.lower()
    assert tracing.trace_id_for(run_id) == tid                       # deterministic
    assert tracing.trace_id_for(f"{run_id}.{attempt}") == tid        # an attempt is in its claim's trace
    assert tracing.claim_run_id(f"{run_id}.{attempt}") == run_id
    sid = tracing.root_span_id_for(run_id)
    assert len(sid) == 16 and int(sid, 16) != 0
    assert tracing.root_span_id_for(f"{run_id}.{attempt}") == sid


@given(run_ids, run_ids)
def test_different_runs_different_traces(a, b):
    if a != b:
        assert tracing.trace_id_for(a) != tracing.trace_id_for(b)


def test_trace_id_known_value():
    # blake2b (16 bytes, person "peerd-trace") of the claim run id: any
    # implementation of the record's trace_id must give the same
    import hashlib

    rid = "1764806400-node-a-0badcafe"
    want = hashlib.blake2b(rid.encode(), digest_size=16, person=b"peerd-trace").hexdigest()
    assert tracing.trace_id_for(rid) == want
    assert tracing.trace_id_for(rid + ".3") == want


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1))
def test_traceparent_is_w3c(trace_int, span_int):
    tid, sid = f"{trace_int:032x}", f"{span_int:016x}"
    tp = tracing.traceparent(tid, sid)
    version, t, s, flags = tp.split("-")
    assert (version, t, s, flags) == ("00", tid, sid, "01")
    assert len(tp) == 55


@pytest.mark.parametrize("tid,sid", [
    ("0" * 32, "1" * 16), ("1" * 32, "0" * 16), ("A" * 32, "1" * 16), ("1" * 31, "1" * 16),
    ("1" * 32, "1" * 17), ("g" * 32, "1" * 16),
])
def test_traceparent_refuses_bad_ids(tid, sid):
    with pytest.raises(ValueError):
        tracing.traceparent(tid, sid)


# ------------------------------------------------------------ no-op path
def _ctx(**kw) -> RunContext:
    return RunContext(task_id="t", slot=0, run_id="0-n-00000000.1", attempt=1, node="n", fencing_token=None,
                      env={}, cwd=None, timeout_s=5.0, **kw)


def test_executor_hands_on_traceparent_only_when_set():
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert run_env(_ctx(traceparent=tp), base={})["TRACEPARENT"] == tp
    assert ("traceparent", tp) in run_headers(_ctx(traceparent=tp))
    assert "TRACEPARENT" not in run_env(_ctx(), base={})
    assert not [h for h, _ in run_headers(_ctx()) if h.lower() == "traceparent"]


def test_disabled_without_endpoint_or_packages(monkeypatch, caplog):
    class Cfg:
        name = "n"
        otlp_endpoint = ""

    assert tracing.from_config(Cfg()) is tracing.NOOP
    Cfg.otlp_endpoint = "http://127.0.0.1:4318"
    monkeypatch.setattr(tracing, "available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="peerd.tracing"):
        assert tracing.from_config(Cfg()) is tracing.NOOP
    assert "not installed" in caplog.text
    span = tracing.NOOP.run_span("t", "0-n-00000000")
    assert span.traceparent is None
    span.set(a=1)
    span.end("succeeded")
    assert tracing.NOOP.child_span("attempt 1", "0-n-00000000.1").traceparent is None
    tracing.NOOP.record_span("claim", "0-n-00000000", 0, under_root=True, status="won")


def test_disabled_imports_no_opentelemetry():
    code = textwrap.dedent("""
        import sys
        from node.cli.config import build_config
        from node import shell as node
        from node.run import tracing_shell as tracing
        cfg = build_config(flags={"name": "n", "insecure": True}, environ={})
        assert tracing.from_config(cfg) is tracing.NOOP
        bad = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not bad, bad
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@needs_otel
def test_otlp_url_and_resource():
    assert tracing._traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert tracing._traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert tracing._traces_url("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"

    class Cfg:
        name = "n1"
        otlp_endpoint = "http://127.0.0.1:1"   # nothing is sent until a span ends

    t = tracing.from_config(Cfg())
    try:
        assert isinstance(t, tracing.OtelTracing)
        res = t.provider.resource.attributes
        assert res["service.name"] == "peerd" and res["peerd.node"] == "n1"
    finally:
        t.shutdown()


# ------------------------------------------------------------ a real node
@pytest.fixture
def receiver():
    r = WebhookReceiver()
    yield r
    r.close()


async def _traced_node(tmp_path, nursery, **flags):
    n = await start_solo_node(tmp_path, nursery, token=TOKEN, **flags)
    exporter = InMemorySpanExporter()
    n.tracing = tracing.OtelTracing(n.name, exporter=exporter)   # before any run
    return n, exporter


async def _wait(cond, what: str, timeout: float = 30.0):
    with trio.fail_after(timeout):
        while not (v := cond()):
            await trio.sleep(0.05)
    return v


def _finished(node, tid: str, n_records: int = 1):
    recs = node.runs_json(tid)
    if len(recs) >= n_records and all(r["status"] not in ("running", "pending") for r in recs):
        return recs
    return None


def _spans_of(exporter, claim_run_id: str):
    want = int(tracing.trace_id_for(claim_run_id), 16)
    return {s.name: s for s in exporter.get_finished_spans() if s.context.trace_id == want}


def _hex(span) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


@needs_otel
async def test_node_traces_runs(tmp_path, nursery, receiver, caplog):
    out = tmp_path / "traceparent.txt"
    flag = tmp_path / "second-try"
    dead_port = free_port()
    n, exporter = await _traced_node(tmp_path, nursery)
    try:
        tasks = [
            {"id": "sh", "schedule": FAR, "retries": {"max": 1, "backoff": 0},
             "command": {"type": "shell",
                         "run": f'echo "$TRACEPARENT" >> {out}; test -e {flag} || {{ touch {flag}; exit 3; }}'}},
            {"id": "web", "schedule": FAR,
             "command": {"type": "http", "method": "POST", "url": f"{receiver.url}/task", "body": "{}"},
             "notify": [{"on": ["success"], "url": f"{receiver.url}/notify", "retries": 0}]},
            {"id": "bad", "schedule": FAR, "command": {"type": "shell", "run": "exit 1"},
             "notify": [{"on": ["failure"], "url": f"http://127.0.0.1:{dead_port}/x", "retries": 0,
                         "timeout": 2}]},
        ]
        await n.apply_tasks(tasks)

        # a shell task: attempt 1 fails (exit 3), attempt 2 succeeds
        await n.run_now("sh")
        recs = await _wait(lambda: _finished(n, "sh", 2), "two attempts of sh")
        claim = tracing.claim_run_id(recs[0]["run_id"])
        spans = await _wait(lambda: (s := _spans_of(exporter, claim)) and "run sh" in s and s, "the sh trace")
        assert set(spans) == {"run sh", "attempt 1", "attempt 2"}      # no fencing: no claim span
        root, a1, a2 = spans["run sh"], spans["attempt 1"], spans["attempt 2"]
        assert root.parent is None
        assert _hex(root) == (tracing.trace_id_for(claim), tracing.root_span_id_for(claim))
        for a in (a1, a2):
            assert a.parent.span_id == root.context.span_id
            assert a.attributes["peerd.task_id"] == "sh" and a.attributes["peerd.node"] == "solo"
        assert a1.attributes["peerd.status"] == "failed" and a1.attributes["peerd.exit_code"] == 3
        assert a1.attributes["peerd.run_id"] == f"{claim}.1" and a1.attributes["peerd.attempt"] == 1
        assert a2.attributes["peerd.status"] == "succeeded" and a2.attributes["peerd.exit_code"] == 0
        assert root.attributes["peerd.status"] == "succeeded" and root.attributes["peerd.attempts"] == 2
        assert root.attributes["peerd.run_id"] == claim and "peerd.slot" in root.attributes
        assert root.resource.attributes["service.name"] == "peerd"
        assert root.resource.attributes["peerd.node"] == "solo"
        # each try saw its own span as TRACEPARENT
        assert out.read_text().split() == [tracing.traceparent(*_hex(a1)), tracing.traceparent(*_hex(a2))]

        # an HTTP task: the traceparent header, then the notification's span
        await n.run_now("web")
        recs = await _wait(lambda: _finished(n, "web"), "the web run")
        claim = tracing.claim_run_id(recs[0]["run_id"])
        spans = await _wait(lambda: (s := _spans_of(exporter, claim)) and "notify success" in s
                            and "run web" in s and s, "the web trace with its notification")
        root, a1, note = spans["run web"], spans["attempt 1"], spans["notify success"]
        assert a1.parent.span_id == root.context.span_id and note.parent.span_id == root.context.span_id
        assert a1.attributes["http.response.status_code"] == 204
        assert receiver.headers("/task")[0]["traceparent"] == tracing.traceparent(*_hex(a1))
        assert receiver.headers("/notify")[0]["traceparent"] == tracing.traceparent(*_hex(note))
        assert note.attributes["peerd.status"] == "sent" and note.attributes["peerd.event"] == "success"

        # a notification that cannot be delivered: failed span, trace id in the log line
        with caplog.at_level(logging.WARNING, logger="peerd.node"):
            await n.run_now("bad")
            recs = await _wait(lambda: _finished(n, "bad"), "the bad run")
            claim = tracing.claim_run_id(recs[0]["run_id"])
            spans = await _wait(lambda: (s := _spans_of(exporter, claim)) and "notify failure" in s
                                and "run bad" in s and s, "the bad trace")
            assert spans["run bad"].attributes["peerd.status"] == "failed"
            assert spans["notify failure"].attributes["peerd.status"] == "failed"
            lines = await _wait(lambda: [r for r in caplog.records if "notification failure" in r.getMessage()],
                                "the failed notification's log line")
        assert lines[0].trace_id == tracing.trace_id_for(claim)
    finally:
        await n.shutdown()
        nursery.cancel_scope.cancel()


@needs_otel
async def test_fenced_run_has_a_claim_span(tmp_path, nursery, etcd_server):  # noqa: F811
    out = tmp_path / "token.txt"
    n, exporter = await _traced_node(tmp_path, nursery, etcd=etcd_server.url,
                                     etcd_prefix=f"/peerd-tracing-{os.getpid()}-{trio.current_time():.0f}")
    try:
        await n.apply_tasks([{"id": "fenced", "schedule": FAR,
                              "command": {"type": "shell", "run": f'echo "$PEERD_FENCING_TOKEN" > {out}'}}])
        await _wait(lambda: n.fencer is not None, "the fencer")
        await n.run_now("fenced")
        recs = await _wait(lambda: _finished(n, "fenced"), "the fenced run", timeout=60)
        claim = tracing.claim_run_id(recs[0]["run_id"])
        spans = await _wait(lambda: (s := _spans_of(exporter, claim)) and "run fenced" in s and s,
                            "the fenced trace")
        assert set(spans) == {"run fenced", "claim", "attempt 1"}
        root, c = spans["run fenced"], spans["claim"]
        assert c.parent.span_id == root.context.span_id
        assert c.attributes["peerd.status"] == "won"
        token = int(out.read_text())
        assert c.attributes["peerd.fencing_token"] == token == root.attributes["peerd.fencing_token"]
        assert spans["attempt 1"].attributes["peerd.fencing_token"] == token
    finally:
        await n.shutdown()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------ a real daemon over OTLP/HTTP
class Collector:
    """A stand-in OTLP/HTTP collector: decodes each POST /v1/traces
    (protobuf ExportTraceServiceRequest) into (resource attrs, span) pairs."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[tuple[dict, object]] = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/v1/traces":
                    req = ExportTraceServiceRequest.FromString(body)
                    for rs in req.resource_spans:
                        res = {a.key: a.value.string_value for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            outer.spans.extend((res, s) for s in ss.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@needs_otel
def test_daemon_sends_traces_to_an_otlp_collector(tmp_path, monkeypatch):
    from tests.cluster_util import api, running_cluster, wait_for

    collector = Collector()
    out = tmp_path / "tp.txt"
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")   # export batches every 100 ms
    try:
        with running_cluster(tmp_path, 1, extra_args=["--otlp-endpoint", collector.url],
                             wait_converged_s=30) as c:
            addr = c.procs[0].api_addr
            task = {"id": "otlp", "schedule": FAR, "command": {"type": "shell", "run": f'echo "$TRACEPARENT" > {out}'}}
            assert api(addr, "PUT", "/v1/tasks", [task])[0] == 200
            assert api(addr, "POST", "/v1/tasks/otlp/run")[0] == 200
            recs = wait_for(lambda: [r for r in api(addr, "GET", "/v1/tasks/otlp/runs")[1]
                                     if r["status"] == "succeeded"], timeout=30, what="the run", cluster=c)
            claim = tracing.claim_run_id(recs[0]["run_id"])
            trace_id = bytes.fromhex(tracing.trace_id_for(claim))

            def spans():
                got = {s.name: (res, s) for res, s in list(collector.spans) if s.trace_id == trace_id}
                return got if {"run otlp", "attempt 1"} <= got.keys() else None

            got = wait_for(spans, timeout=30, what="the run's spans at the collector", cluster=c)
            res, root = got["run otlp"]
            _, attempt = got["attempt 1"]
            assert res["service.name"] == "peerd" and res["peerd.node"] == "n1"
            assert root.span_id.hex() == tracing.root_span_id_for(claim)
            assert attempt.parent_span_id == root.span_id
            assert out.read_text().strip() == tracing.traceparent(trace_id.hex(), attempt.span_id.hex())
    finally:
        collector.close()


async def test_node_without_tracing_runs_untraced(tmp_path, nursery, monkeypatch):
    # an endpoint, but no OpenTelemetry: the node runs tasks as before
    monkeypatch.setattr(tracing, "available", lambda: False)
    out = tmp_path / "tp.txt"
    n = await start_solo_node(tmp_path, nursery, token=TOKEN, otlp_endpoint="http://127.0.0.1:4318")
    try:
        assert n.tracing is tracing.NOOP
        await n.apply_tasks([{"id": "plain", "schedule": FAR,
                              "command": {"type": "shell", "run": f'echo "${{TRACEPARENT-none}}" > {out}'}}])
        await n.run_now("plain")
        recs = await _wait(lambda: _finished(n, "plain"), "the plain run")
        assert recs[0]["status"] == "succeeded"
        assert out.read_text().strip() == "none"
    finally:
        await n.shutdown()
        nursery.cancel_scope.cancel()


def test_sdk_log_lines_are_rate_limited():
    now = [0.0]
    f = tracing._OncePerInterval(60.0, clock=lambda: now[0])

    def rec(msg):
        return logging.LogRecord("opentelemetry.x", logging.WARNING, __file__, 1, msg, ("arg",), None)

    assert f.filter(rec("export failed: %s"))
    for t in (1.0, 30.0, 59.9):
        now[0] = t
        assert not f.filter(rec("export failed: %s"))
    now[0] = 61.0
    r = rec("export failed: %s")
    assert f.filter(r)
    assert r.getMessage() == "export failed: arg (3 more OpenTelemetry messages in the last 60 s not logged)"
    now[0] = 62.0
    assert not f.filter(rec("again"))
