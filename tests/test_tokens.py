"""Named API tokens with roles (node/api/tokens.py) and the audit table: the
file's rules, and a real peerd process: each role's reach, 403 naming the
role, every state-changing request audited (log, GET /v1/audit, peerctl
audit, kept across a restart), SIGHUP reloading the file and keeping the
old tokens when the new file is bad."""
from __future__ import annotations

import json
import signal
import textwrap

import pytest

from node.api.tokens import TokenFileError, TokenSet, parse_token_file, role_allows
from tests.cluster_util import TOKEN, api, peerctl, running_cluster, wait_for

READ, OPERATE, ADMIN, LATE = ("r" * 20, "o" * 20, "a" * 20, "l" * 20)


def test_token_file_rules():
    ts = TokenSet(parse_token_file({"tokens": [{"name": "g", "role": "read", "token": READ},
                                               {"name": "ci", "role": "operate", "token": OPERATE}]}, "t.yaml"))
    assert ts.check(READ).name == "g" and ts.check(OPERATE).role == "operate"
    assert ts.check("x" * 20) is None and ts.check("") is None
    assert role_allows("admin", "operate") and role_allows("operate", "read") and not role_allows("read", "operate")
    assert TokenSet.single("") .tokens == () and TokenSet.single(TOKEN).check(TOKEN).role == "admin"
    assert "rrrr" not in repr(ts.tokens)
    for data, msg in [
        ([{"name": "a", "role": "root", "token": READ}], "role: must be one of read, operate, admin"),
        ([{"name": "a", "role": "read", "token": "short"}], "token: at least 16"),
        ([{"name": "a", "role": "read", "token": READ}, {"name": "a", "role": "read", "token": OPERATE}],
         "name used twice"),
        ([{"name": "a", "role": "read", "token": READ}, {"name": "b", "role": "read", "token": READ}],
         "same secret"),
        ([{"name": "a b", "role": "read", "token": READ}], "name:"),
        ([{"name": "a", "role": "read", "token": READ, "x": 1}], "unknown field 'x'"),
        ({"other": []}, "expected a list"),
    ]:
        with pytest.raises(TokenFileError, match=msg):
            parse_token_file(data, "t.yaml")


def _tokens_file(path, extra=""):
    path.write_text(textwrap.dedent(f"""
        tokens:
          - {{name: grafana, role: read, token: "{READ}"}}
          - {{name: ci, role: operate, token: "{OPERATE}"}}
          - {{name: alice, role: admin, token: "{ADMIN}"}}
    """) + extra)
    path.chmod(0o600)


def test_roles_audit_and_reload(tmp_path):
    tf = tmp_path / "tokens.yaml"
    _tokens_file(tf)
    task = tmp_path / "t.yaml"
    task.write_text('- {id: tk, schedule: "once:2099-01-01T00:00:00Z", command: {type: exec, argv: ["true"]}}\n')
    (tmp_path / "c").mkdir()
    with running_cluster(tmp_path / "c", 1, extra_args=["--api-tokens-file", str(tf)],
                         wait_converged_s=60) as c:
        n = c.procs[0]
        a = n.api_addr
        # admin applies; operate and read may not
        assert peerctl("tasks", "apply", "-f", str(task), node=a, token=OPERATE).returncode == 1
        r = peerctl("tasks", "apply", "-f", str(task), node=a, token=READ)
        assert r.returncode == 1 and "403" in r.stderr and "token 'grafana' has role read; apply needs admin" in r.stderr
        assert peerctl("tasks", "apply", "-f", str(task), node=a, token=ADMIN).returncode == 0
        # operate pauses and runs; read reads only
        assert api(a, "POST", "/v1/tasks/tk/pause", token=READ)[0] == 403
        assert api(a, "POST", "/v1/tasks/tk/pause", token=OPERATE)[0] == 200
        assert api(a, "POST", "/v1/tasks/tk/resume", token=OPERATE)[0] == 200
        assert api(a, "GET", "/v1/tasks/tk", token=READ)[0] == 200
        assert api(a, "DELETE", "/v1/tasks/tk", token=OPERATE)[0] == 403
        assert api(a, "GET", "/v1/audit", token=READ)[0] == 403           # the audit needs operate
        # the single --api-token is an admin token named api-token
        assert api(a, "POST", "/v1/tasks/tk/pause", token=TOKEN)[0] == 200
        assert api(a, "POST", "/v1/tasks/tk/pause", token="z" * 20)[0] == 401

        st, audit = api(a, "GET", "/v1/audit", token=OPERATE)
        assert st == 200
        seen = [(e["token"], e["route"], e["task"], e["status"]) for e in audit]
        assert ("alice", "/v1/tasks", None, 200) in seen
        assert ("ci", "/v1/tasks/{id}/pause", "tk", 200) in seen
        assert ("ci", "/v1/tasks/{id}", "tk", 403) in seen
        assert ("api-token", "/v1/tasks/{id}/pause", "tk", 200) in seen
        assert not any(e["status"] == 401 for e in audit)                 # no token, no audit line
        assert all(e["method"] != "GET" for e in audit)
        r = peerctl("audit", node=a, token=OPERATE)
        assert r.returncode == 0 and "alice" in r.stdout and "/v1/tasks/{id}/pause" in r.stdout
        assert "audit: POST /v1/tasks/tk/pause by ci: 200" in n.log_text()

        # SIGHUP: a new token works; a broken file keeps the old ones
        _tokens_file(tf, f'  - {{name: late, role: read, token: "{LATE}"}}\n')
        n.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: api(a, "GET", "/v1/status", token=LATE)[0] == 200, timeout=30,
                 what="the reloaded token accepted", cluster=c)
        tf.write_text("tokens: [{name: broken}]\n")
        n.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: "tokens not reloaded" in n.log_text(), timeout=30, what="the bad file reported", cluster=c)
        assert api(a, "GET", "/v1/status", token=LATE)[0] == 200
        assert n.alive()

        # the audit table outlives a restart
        n.popen.send_signal(signal.SIGTERM)
        n.popen.wait(timeout=30)
        _tokens_file(tf)
        n.start()
        wait_for(lambda: api(a, "GET", "/v1/audit", token=ADMIN)[0] == 200, timeout=60, what="restarted", cluster=c)
        after = api(a, "GET", "/v1/audit", token=ADMIN)[1]
        assert [(e["token"], e["route"], e["status"]) for e in after][:len(audit)] == \
            [(e["token"], e["route"], e["status"]) for e in audit]
        assert json.dumps(after).count(ADMIN) == 0


def test_example_token_file_parses():
    from pathlib import Path

    from node.cli.config import load_token_file

    ts = load_token_file(str(Path(__file__).resolve().parent.parent / "configs" / "tokens.example.yaml"))
    assert sorted(t.role for t in ts.tokens) == ["admin", "operate", "read"]
