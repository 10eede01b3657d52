"""Task model validation, canonical dict round trip and task files."""
import json
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, strategies as st

from node.run.retry import RetryPolicy
from node.tasks.commands import ExecCommand, HttpCommand, PythonCommand, ShellCommand
from node.tasks.files_shell import load_task_file
from node.tasks.model import Task, TaskError
from node.tasks.parse import parse_tasks

ROOT = Path(__file__).resolve().parent.parent


def base(**over):
    d = {"id": "backup", "schedule": "0 3 * * *", "command": {"type": "shell", "run": "echo hi"}}
    d.update(over)
    return d


def errors_of(d, source="tasks.yaml"):
    with pytest.raises(TaskError) as info:
        parse_tasks([d], source)
    return info.value.errors


def test_defaults():
    t = Task.from_dict(base())
    assert t.name == "backup" and t.timezone == "UTC" and t.dst is None
    assert t.timeout_s == 3600 and t.retries == RetryPolicy(0, 1.0, 60.0, 2.0)
    assert (t.overlap, t.misfire, t.catchup_window_s, t.on_owner_loss) == ("forbid", "run_once", 3600, "rerun")
    assert t.tags == {} and t.env == {} and t.cwd is None and t.paused is False and t.history == 100
    assert isinstance(t.command, ShellCommand)


def test_issue_example_message():
    assert errors_of(base(schedule="61 * * * *")) == [
        "tasks.yaml: task 'backup': schedule '61 * * * *': minute must be 0-59"]


ERRORS = [
    (dict(id="bad id!"), "task #1: id 'bad id!': must be 1-128 characters"),
    (dict(id="x" * 129), "id 'xxxxxxxxx"),
    (dict(schedule=None), "task 'backup': schedule: required"),
    (dict(schedule="* * *"), "schedule '* * *': expected 5 or 6 fields"),
    (dict(schedule="@every 0s"), "schedule '@every 0s': @every period must be a whole number of seconds, at least 1s"),
    (dict(timezone="Mars/Olympus"), "timezone 'Mars/Olympus': unknown IANA time zone"),
    (dict(timezone="../../etc/passwd"), "timezone '../../etc/passwd': unknown IANA time zone"),
    (dict(dst={"gap": "jump"}), "dst.gap 'jump': must be one of shift, skip"),
    (dict(dst={"overlap": 2}), "dst.overlap 2: must be one of once, twice"),
    (dict(dst={"gapp": "skip"}), "dst.gapp: unknown field (did you mean 'gap'?)"),
    (dict(dst="shift"), "dst 'shift': must be a mapping"),
    (dict(jitter="5x"), "jitter '5x': not a duration"),
    (dict(timeout=0), "timeout 0: must be between 0.001s and 604800s"),
    (dict(timeout="8d"), "timeout '8d': must be between"),
    (dict(retries={"max": -1}), "retries.max -1: must be between 0 and 100"),
    (dict(retries={"max": "3"}), "retries.max '3': must be an integer"),
    (dict(retries={"backoff": "10s", "max_backoff": "1s"}), "retries.max_backoff '1s': must be at least retries.backoff"),
    (dict(retries={"multiplier": 0.5}), "retries.multiplier 0.5: must be a number between 1 and 10"),
    (dict(retries={"tries": 3}), "retries.tries: unknown field"),
    (dict(overlap="queue"), "overlap 'queue': must be one of allow, forbid, replace, buffer_one, buffer_all"),
    (dict(misfire="all"), "misfire 'all': must be one of skip, run_once, run_all"),
    (dict(catchup_window="-1s"), "catchup_window '-1s': must not be negative"),
    (dict(on_owner_loss="panic"), "on_owner_loss 'panic': must be one of rerun, skip"),
    (dict(tags={"zone": 1}), "tags.zone 1: must be a string (quote it in YAML)"),
    (dict(tags=["a"]), "tags ['a']: must be a mapping of strings"),
    (dict(env={"1BAD": "x"}), "env.1BAD: invalid key"),
    (dict(env={"PORT": 80}), "env.PORT 80: must be a string"),
    (dict(cwd=""), "cwd '': must be a non-empty path string"),
    (dict(paused="yes"), "paused 'yes': must be true or false"),
    (dict(history=0), "history 0: must be between 1 and 10000"),
    (dict(timout="5s"), "timout: unknown field (did you mean 'timeout'?)"),
    (dict(command=None), "command: required"),
    (dict(command="echo"), "command 'echo': must be a mapping"),
    (dict(command={"type": "ssh"}), "command.type 'ssh': must be one of shell, exec, python, http"),
    (dict(command={"type": "shell", "run": ""}), "command.run '': must be a non-empty string"),
    (dict(command={"type": "shell", "run": "x", "argv": ["x"]}), "command.argv: unknown field"),
    (dict(command={"type": "exec", "argv": []}), "command.argv []: must be a non-empty list of strings"),
    (dict(command={"type": "exec", "argv": ["ls", 1]}), "command.argv ['ls', 1]: must be a non-empty list"),
    (dict(command={"type": "python", "target": "os.system"}), "command.target 'os.system': must be 'module:function'"),
    (dict(command={"type": "python", "target": "m:f", "args": "x"}), "command.args 'x': must be a list of plain values"),
    (dict(command={"type": "python", "target": "m:f", "kwargs": {1: 2}}), "command.kwargs {1: 2}: must be a mapping"),
    (dict(command={"type": "http", "url": "ftp://x"}), "command.url 'ftp://x': must be an http:// or https:// URL"),
    (dict(command={"type": "http", "url": "http://x", "method": "FETCH"}), "command.method 'FETCH': must be one of GET"),
    (dict(command={"type": "http", "url": "http://x", "expect_status": 99}), "command.expect_status [99]: must be a status code 100-599"),
    (dict(command={"type": "http", "url": "http://x", "body": {"a": 1}}), "command.body {'a': 1}: must be a string"),
]


@pytest.mark.parametrize("over,message", ERRORS)
def test_error_messages(over, message):
    errs = errors_of(base(**over))
    assert any(message in e for e in errs), errs
    assert all(e.startswith("tasks.yaml: task ") for e in errs)


def test_all_errors_collected_and_nothing_applied():
    data = [base(id="a", schedule="61 * * * *", overlap="x"), base(id="b"), base(id="a"),
            "not a task", base(id=None)]
    with pytest.raises(TaskError) as info:
        parse_tasks(data, "f.json")
    errs = info.value.errors
    assert "f.json: task 'a': schedule '61 * * * *': minute must be 0-59" in errs
    assert any(e.startswith("f.json: task 'a': overlap 'x'") for e in errs)
    assert "f.json: task 'a': id: duplicate (also task #1)" in errs
    assert "f.json: task #4: not a mapping" in errs
    assert "f.json: task #5: id: required" in errs
    assert len(errs) == 5
    assert str(info.value).count("\n") == 4
    assert isinstance(info.value, ValueError)


def test_commands_parse():
    t = Task.from_dict(base(command={"type": "exec", "argv": ["date", "-u"]}))
    assert t.command == ExecCommand(("date", "-u"))
    t = Task.from_dict(base(command={"type": "python", "target": "node.x:hello", "args": [1, "a"],
                                     "kwargs": {"k": [1, 2]}}))
    assert t.command == PythonCommand("node.x:hello", (1, "a"), {"k": [1, 2]})
    assert (t.command.module, t.command.function) == ("node.x", "hello")
    t = Task.from_dict(base(command={"type": "http", "url": "http://127.0.0.1:7701/v1/status",
                                     "method": "post", "expect_status": [204, 200]}))
    assert t.command.method == "POST" and t.command.expect_status == (200, 204)
    assert t.command.status_ok(204) and not t.command.status_ok(201)
    assert HttpCommand(url="http://x").status_ok(201) and not HttpCommand(url="http://x").status_ok(301)


def test_retries_shorthand_and_delay():
    import random

    t = Task.from_dict(base(retries=3))
    assert t.retries.max == 3
    r = RetryPolicy(5, 1.0, 10.0, 2.0)
    rng = random.Random(0)
    delays = [r.delay_s(n, rng) for n in range(1, 8)]
    for n, d in enumerate(delays, start=1):
        cap = min(10.0, 2.0 ** (n - 1))
        assert cap / 2 <= d <= cap


def test_resolve_now():
    t = Task.from_dict(base(schedule="now"))
    assert t.is_immediate and t.schedule == "now"
    r = t.resolve_now(1_800_000_000.9)
    assert r.schedule == "once:2027-01-15T08:00:00Z" and r.is_immediate
    assert Task.from_dict(base()).resolve_now(5).schedule == "0 3 * * *"


FULL = base(
    name="Nightly backup", schedule="30 2 * * *", timezone="Europe/Berlin",
    dst={"gap": "skip", "overlap": "twice"}, jitter="30s", timeout="1h30m",
    retries={"max": 2, "backoff": "500ms", "max_backoff": "10s", "multiplier": 3},
    overlap="buffer_one", misfire="run_all", catchup_window="2h", on_owner_loss="skip",
    tags={"zone": "a"}, env={"MODE": "full"}, cwd="/tmp", paused=True, history=7,
    params={"DATE": {"required": True, "description": "day to process"}, "LEVEL": {"default": "info"}},
    after={"task": "upstream", "on": "always"},
    notify=[{"on": ["failure", "recovery"], "url": "https://hooks.example/x", "headers": {"X-A": "1"},
             "template": {"text": "$task_id $status"}, "timeout": "5s", "retries": 2}],
    output={"keep": "file", "max_bytes": 2048},
    target={"mode": "count", "count": 2},
)


def test_round_trip_full():
    t = Task.from_dict(FULL)
    d = t.to_dict()
    assert d["timeout"] == 5400.0 and d["jitter"] == 30.0 and d["retries"]["backoff"] == 0.5
    assert Task.from_dict(d) == t
    assert Task.from_dict(msgpack.unpackb(msgpack.packb(d))) == t
    assert Task.from_dict(json.loads(json.dumps(d))) == t
    assert sorted(d) == sorted(Task.FIELDS)


@given(st.dictionaries(st.sampled_from(list(Task.FIELDS) + ["junk"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10),
                                 st.lists(st.integers(), max_size=2),
                                 st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))))
def test_from_dict_never_crashes(d):
    try:
        t = Task.from_dict(d)
    except TaskError as exc:
        assert exc.errors
    else:
        assert Task.from_dict(t.to_dict()) == t


def test_load_yaml_json_toml(tmp_path):
    yaml_text = """
tasks:
  - id: hello
    schedule: "*/5 * * * *"
    command: {type: shell, run: "echo hello"}
  - id: once
    schedule: {once: 2026-12-01T10:00:00Z}
    command: {type: exec, argv: [date, -u]}
"""
    (tmp_path / "t.yaml").write_text(yaml_text)
    ts = load_task_file(tmp_path / "t.yaml")
    assert [t.id for t in ts] == ["hello", "once"]
    assert ts[1].schedule == "once:2026-12-01T10:00:00Z"

    (tmp_path / "t.yml").write_text("- id: a\n  schedule: now\n  command: {type: shell, run: x}\n")
    assert load_task_file(tmp_path / "t.yml")[0].schedule == "now"

    (tmp_path / "t.json").write_text(json.dumps([t.to_dict() for t in ts]))
    assert load_task_file(tmp_path / "t.json") == ts

    toml_text = """
[[tasks]]
id = "hello"
schedule = "*/5 * * * *"
command = { type = "shell", run = "echo hello" }

[[tasks]]
id = "once"
schedule = { once = 2026-12-01T10:00:00Z }
[tasks.command]
type = "exec"
argv = ["date", "-u"]
"""
    (tmp_path / "t.toml").write_text(toml_text)
    assert load_task_file(tmp_path / "t.toml") == ts


@pytest.mark.parametrize("name,text,message", [
    ("bad.yaml", "tasks: [", "bad.yaml: not valid YAML"),
    ("bad.json", "{", "bad.json: not valid JSON"),
    ("bad.toml", "tasks = [", "bad.toml: not valid TOML"),
    ("bad.txt", "", "bad.txt: unknown file type"),
    ("shape.yaml", "just a string", "shape.yaml: expected a list of tasks"),
    ("extra.yaml", "tasks: []\nother: 1", "unknown keys: other"),
    ("typo.yaml", "- id: a\n  schedule: '61 * * * *'\n  command: {type: shell, run: x}\n",
     "typo.yaml: task 'a': schedule '61 * * * *': minute must be 0-59"),
])
def test_file_errors(tmp_path, name, text, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(TaskError) as info:
        load_task_file(p)
    assert any(message in e for e in info.value.errors), info.value.errors
    assert all(e.startswith(str(p)) for e in info.value.errors)


def test_missing_file(tmp_path):
    with pytest.raises(TaskError, match="cannot read"):
        load_task_file(tmp_path / "nope.yaml")


def test_empty_file_is_no_tasks(tmp_path):
    (tmp_path / "e.yaml").write_text("")
    assert load_task_file(tmp_path / "e.yaml") == []


def test_example_file_loads_and_shows_every_field():
    import yaml

    path = ROOT / "configs" / "tasks.example.yaml"
    tasks = load_task_file(path)
    assert len(tasks) >= 4
    raw = yaml.safe_load(path.read_text())
    raw_tasks = raw["tasks"] if isinstance(raw, dict) else raw
    used = set().union(*(set(t) for t in raw_tasks))
    assert used == set(Task.FIELDS)
    assert {t.command.type for t in tasks} == {"shell", "exec", "python", "http"}
    http = [t for t in tasks if t.command.type == "http"]
    assert all(t.paused for t in http)


def test_secret_references_in_env():
    from node.tasks.model import SecretError, resolve_env, shown_env

    t = Task.from_dict({"id": "s", "schedule": "@every 1h", "command": {"type": "exec", "argv": ["true"]},
                        "env": {"A": "plain", "B": {"file": "/run/secrets/b"}, "C": {"env": "HOME"}}})
    assert Task.from_dict(t.to_dict()) == t
    assert shown_env(t.env) == {"A": "plain", "B": "<secret:file:/run/secrets/b>", "C": "<secret:env:HOME>"}
    files = {"/run/secrets/b": b"pw\n"}
    assert resolve_env(t.env, {"HOME": "/h"}, lambda p: files[p]) == {"A": "plain", "B": "pw", "C": "/h"}
    with pytest.raises(SecretError, match="secret env.C: the node's environment has no HOME"):
        resolve_env(t.env, {}, lambda p: files[p])

    def missing(p):
        raise FileNotFoundError(2, "No such file or directory")
    with pytest.raises(SecretError, match="secret env.B: cannot read /run/secrets/b"):
        resolve_env(t.env, {"HOME": "/h"}, missing)
    for bad in ({"file": "relative"}, {"env": "1X"}, {"file": "/a", "env": "B"}, {"vault": "x"}):
        with pytest.raises(TaskError, match="env.B: a secret reference is"):
            Task.from_dict({"id": "s", "schedule": "@every 1h", "command": {"type": "exec", "argv": ["true"]},
                            "env": {"B": bad}})
