"""Secrets of the node itself: the API token and the etcd password from
files, ``peerd keygen -o FILE`` writing a 0600 key, and a warning at start
when the key file is readable by group or others."""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gossip.seal_shell import generate_key, read_keyring
from node.cli import daemon
from node.cli.config import build_config
from node.cli.settings import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _peerd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PEERD_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "node.cli.daemon", *args], capture_output=True, text=True,
                          env=env, cwd=str(cwd or ROOT), timeout=60)


def test_keygen_o_writes_a_0600_key_and_refuses_to_overwrite(tmp_path):
    key = tmp_path / "gossip.key"
    old = os.umask(0o022)
    try:
        r = _peerd("keygen", "-o", str(key))
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # the key is not printed when written to a file
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(read_keyring(str(key)).keys()) == 1
    before = key.read_text()
    r = _peerd("keygen", "-o", str(key))
    assert r.returncode == 2 and "exists" in r.stderr
    assert key.read_text() == before
    r = _peerd("keygen")
    assert r.returncode == 0 and len(r.stdout.strip()) == 44  # base64 of 32 bytes


def test_api_token_and_etcd_password_from_files(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("s3cret-token\n")
    pw = tmp_path / "etcd-pw"
    pw.write_text("hunter2\nignored second line\n")
    cfg = build_config(flags={"name": "a", "insecure": True, "api_token_file": str(tok),
                              "etcd_password_file": str(pw)}, environ={})
    assert cfg.api_token == "s3cret-token"
    assert cfg.etcd_password == "hunter2"
    cfg = build_config(flags={"name": "a", "insecure": True}, environ={"PEERD_API_TOKEN_FILE": str(tok)})
    assert cfg.api_token == "s3cret-token"


@pytest.mark.parametrize("content,flags,needle", [
    ("", {}, "empty"),
    ("\n\n", {}, "empty"),
    ("x" * 5000, {}, "longer than 4096"),
    (None, {}, "cannot read"),
    ("tok", {"api_token": "other"}, "not both"),
])
def test_bad_token_files_are_config_errors(tmp_path, content, flags, needle):
    tok = tmp_path / "token"
    if content is not None:
        tok.write_text(content)
    with pytest.raises(ConfigError) as ei:
        build_config(flags={"name": "a", "insecure": True, "api_token_file": str(tok), **flags}, environ={})
    assert "api_token_file" in str(ei.value) and needle in str(ei.value)


def test_start_warns_about_a_group_or_world_readable_key_file(tmp_path, caplog):
    key = tmp_path / "gossip.key"
    key.write_text(generate_key() + "\n")
    tok = tmp_path / "token"
    tok.write_text("t\n")
    os.chmod(key, 0o644)
    os.chmod(tok, 0o600)
    cfg = build_config(flags={"name": "a", "key_file": str(key), "api_token_file": str(tok)}, environ={})
    caplog.set_level(logging.WARNING, logger="peerd")
    assert daemon._check_start_files(cfg) is None
    msgs = [r.getMessage() for r in caplog.records]
    assert any("key_file" in m and str(key) in m and "0644" in m and "chmod 600" in m for m in msgs), msgs
    assert not any("api_token_file" in m for m in msgs)
    caplog.clear()
    os.chmod(key, 0o600)
    assert daemon._check_start_files(cfg) is None
    assert not caplog.records


def test_a_real_peerd_warns_about_its_key_file_before_refusing_a_bad_task_file(tmp_path):
    """The real process: the warning is on stderr, the bad task file exits 2
    (so the test needs no running node)."""
    key = tmp_path / "gossip.key"
    key.write_text(generate_key() + "\n")
    os.chmod(key, 0o640)
    bad = tmp_path / "tasks.toml"
    bad.write_text('[[tasks]]\nid = "t"\nschedule = { once = 1e300 }\ncommand = { type = "shell", run = "x" }\n')
    r = _peerd("--name", "w", "--key-file", str(key), "--tasks", str(bad), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2, r.stderr
    assert "readable by group or others (mode 0640)" in r.stderr
    assert f"{bad}: task 't': schedule" in r.stderr and "Traceback" not in r.stderr
