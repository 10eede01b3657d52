"""node/run/followups.py and the task fields it reads (notify, after): the rules
as properties, and cycles refused."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from node.run import followups as fu
from node.state.runstatus import RUN_STATUSES
from node.tasks.model import NOTIFY_EVENTS, Task, TaskError, after_cycle, check_notify_target

statuses = st.sampled_from(RUN_STATUSES)
targets = st.lists(st.fixed_dictionaries({"on": st.lists(st.sampled_from(NOTIFY_EVENTS), min_size=1,
                                                         max_size=5, unique=True)}), max_size=4)


@given(statuses, st.one_of(st.none(), statuses), targets)
def test_one_notification_per_target_and_run(status, prev, notify):
    events = fu.run_events(status, prev)
    pairs = fu.targets_for(notify, events)
    assert len({i for i, _ in pairs}) == len(pairs)                  # rule 1: at most one per target
    for i, ev in pairs:
        assert ev in events and ev in notify[i]["on"]
    for i, t in enumerate(notify):                                  # and every subscriber hears
        if set(t["on"]) & set(events):
            assert i in {j for j, _ in pairs}
    if "recovery" in events:
        assert status == "succeeded" and prev in ("failed", "timeout", "error", "lost")
    if status in ("cancelled", "skipped", "pending", "running"):
        assert events == []


def test_recovery_wins_over_success_for_a_target_with_both():
    assert fu.targets_for([{"on": ["success", "recovery"]}], fu.run_events("succeeded", "failed")) == \
        [(0, "recovery")]
    assert fu.targets_for([{"on": ["success"]}], fu.run_events("succeeded", "failed")) == [(0, "success")]


def test_previous_status_skips_the_run_itself_cancelled_and_triggers():
    recs = [
        {"run_id": "1-a-00000001.1", "status": "failed"},
        {"run_id": "2-a-00000002.1", "status": "cancelled"},
        {"run_id": "3-a-00000003.1", "status": "failed"},
        {"run_id": "3-a-00000003.2", "status": "succeeded"},
    ]
    assert fu.previous_status(recs, "3-a-00000003") == "failed"
    assert fu.previous_status(recs[:2], "3-a-00000003") == "failed"
    assert fu.previous_status([], "x") is None


@given(st.sampled_from(["success", "failure", "always"]), statuses, st.booleans())
def test_chain_matches(on, status, rerun):
    m = fu.chain_matches(on, status, rerun=rerun)
    if status in ("cancelled", "skipped", "pending", "running"):
        assert not m
    if status == "lost" and rerun:
        assert not m
    if on == "always" and status in ("succeeded", "failed", "timeout", "error"):
        assert m
    if on == "success":
        assert m == (status == "succeeded")


@given(st.text("abc-", min_size=1, max_size=5), st.integers(0, 2**40), st.text("xyz", min_size=1, max_size=5))
def test_trigger_id_is_stable_and_a_run_id(up, slot, down):
    a = fu.trigger_run_id(up, slot, down)
    assert a == fu.trigger_run_id(up, slot, down)
    assert a.startswith(f"{slot}-after-") and len(a.rsplit("-", 1)[1]) == 8
    assert a != fu.trigger_run_id(up, slot + 1, down)


@given(st.dictionaries(st.sampled_from("abcdef"), st.sampled_from("abcdefg")))
def test_after_cycle_is_a_real_cycle_or_none(links):
    cyc = after_cycle(links)
    if cyc is None:
        # acyclic: following links from any start ends
        for start in links:
            seen, cur = set(), start
            while cur in links:
                assert cur not in seen
                seen.add(cur)
                cur = links[cur]
    else:
        assert cyc[0] == cyc[-1] and len(cyc) >= 2
        for a, b in zip(cyc, cyc[1:]):
            assert links[a] == b


@given(st.dictionaries(st.text("abc$ {}\"\\", max_size=6), st.text("ab\"\\<>$", max_size=6), max_size=4),
       st.one_of(st.none(), st.text("$ab{}\"", max_size=20),
                 st.dictionaries(st.sampled_from(["text", "x"]), st.text("$task_id\"\\", max_size=12))))
def test_render_body_is_always_json(fields, template):
    body = fu.render_body(template, {"task_id": 'x"y\\z', **fields})
    json.loads(body)


def test_template_substitutes_fields_as_text():
    body = json.loads(fu.render_body({"text": "peerd: $task_id ${status} $unknown", "n": 3},
                                     {"task_id": "<b>\"t\"</b>", "status": None}))
    assert body == {"text": 'peerd: <b>"t"</b>  $unknown', "n": 3}


@pytest.mark.parametrize("target,field", [
    ({"on": ["nope"], "url": "http://h/"}, "on"),
    ({"on": "failure", "url": "ftp://h/"}, "url"),
    ({"on": "failure", "url": "http://h/", "type": "email"}, "type"),
    ({"on": "failure", "url": "http://h/", "headers": {"X": "a\nb"}}, "headers"),
    ({"on": "failure", "url": "http://h/", "timeout": "10m"}, "timeout"),
    ({"on": "failure", "url": "http://h/", "retries": 99}, "retries"),
    ({"on": "failure", "url": "http://h/", "urll": 1}, "urll"),
])
def test_bad_notify_targets_name_the_field(target, field):
    err, out = check_notify_target(target)
    assert out is None and err[0] == field


def test_task_fields_round_trip_and_errors():
    t = Task.from_dict({"id": "d", "after": {"task": "u", True: "failure"},
                        "command": {"type": "exec", "argv": ["true"]},
                        "notify": {"on": "failure", "url": "https://h/x"}})
    assert t.schedule == "after" and t.after == {"task": "u", "on": "failure"}
    assert Task.from_dict(t.to_dict()) == t
    assert "after" not in Task.from_dict({"id": "p", "schedule": "@every 1s",
                                          "command": {"type": "exec", "argv": ["true"]}}).to_dict()
    with pytest.raises(TaskError, match="after.on"):
        Task.from_dict({"id": "d", "after": {"task": "u", "on": "maybe"}, "command": {"type": "exec", "argv": ["true"]}})
    with pytest.raises(TaskError, match="cannot run after itself"):
        Task.from_dict({"id": "d", "after": "d", "command": {"type": "exec", "argv": ["true"]}})
    with pytest.raises(TaskError, match="needs an after"):
        Task.from_dict({"id": "d", "schedule": "after", "command": {"type": "exec", "argv": ["true"]}})


@given(st.sets(st.sampled_from([f"n{i}" for i in range(8)]), min_size=1),
       st.one_of(st.none(), st.just({"mode": "all"}), st.builds(lambda n: {"mode": "count", "count": n},
                                                                   st.integers(1, 10))))
def test_shard_lists(members, target):
    from node.ownership.ring import preference_list
    from node.ownership.shards import shard_members, split_shard_id, shard_id

    owners = preference_list("t", members, 3)
    lst = shard_members("t", target, owners, members)
    assert len(lst) == len(set(lst)) and set(lst) <= members
    assert lst[: min(len(owners), len(lst))] == owners[: len(lst)]         # owner first, then replicas
    if target is None:
        assert lst == owners[:1]
    elif target["mode"] == "all":
        assert set(lst) == members
    else:
        assert len(lst) == min(target["count"], len(members))
    assert split_shard_id(shard_id("a#b", 3)) == ("a#b", 3) and split_shard_id("plain") is None


def test_node_default_notify_applies_to_tasks_without_their_own():
    from node.cli.config import build_config
    from node.cli.settings import ConfigError
    from node.core import NodeCore
    from node.core_effects import Notify, StartRun
    from node.state.store import Store

    cfg = build_config(flags={"name": "n1", "insecure": True,
                              "notify": '[{"on": ["failure"], "url": "http://hooks.example/x"}]'}, environ={})
    assert cfg.notify[0]["url"] == "http://hooks.example/x" and cfg.notify[0]["retries"] == 3
    with pytest.raises(ConfigError, match=r"--notify\[0\].url"):
        build_config(flags={"name": "n1", "insecure": True, "notify": '[{"on": "failure", "url": "x"}]'},
                     environ={})

    core = NodeCore("n1", Store("n1"), default_notify=cfg.notify)
    now = 1_800_000_000.0
    core.start(now, joined=True)
    core.members_changed([("n1", "alive", {})], now)
    own = {"on": ["success"], "url": "http://own.example/"}
    tasks = [Task.from_dict({"id": "plain", "schedule": "once:2099-01-01T00:00:00Z",
                             "command": {"type": "exec", "argv": ["false"]}}),
             Task.from_dict({"id": "own", "schedule": "once:2099-01-01T00:00:00Z", "notify": own,
                             "command": {"type": "exec", "argv": ["false"]}})]
    core.apply_tasks(tasks, now)
    sent = []
    for tid in ("plain", "own"):
        _, _, effects = core.run_now(tid, now + 1)
        starts = [e for e in effects if type(e) is StartRun]
        assert len(starts) == 1
        core.attempt_started(starts[0].run_id, 1, now + 1)
        effs = core.attempt_finished(starts[0].run_id, 1, "failed", now + 2, exit_code=1)
        sent += [(e.task_id, e.target["url"], e.event) for e in effs if type(e) is Notify]
    # the default applies to the task without notify; a task's own replaces it
    assert sent == [("plain", "http://hooks.example/x", "failure")]
