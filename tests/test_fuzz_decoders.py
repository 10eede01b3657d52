"""Every decoder a peer or a client reaches (sim/fuzz.py's targets) under
hypothesis: raw bytes and mutated valid samples either pass or raise the one
error type the caller turns into a refusal. The long runs (and atheris) are
``python -m sim.fuzz``; figures in README."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from node.cli.config import build_config
from node.cli.settings import ConfigError
from sim.fuzz import check_one, mutate, targets

TARGETS = targets()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_valid_samples_pass(name):
    t = TARGETS[name]
    for s in t.seeds:
        assert check_one(t, s) is None, name


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512), seed=st.integers(0, 2**32), mutated=st.booleans())
def test_any_input_is_accepted_or_refused(name, data, seed, mutated):
    t = TARGETS[name]
    if mutated:
        data = mutate(random.Random(seed), t.seeds)
    f = check_one(t, data)
    assert f is None, f"{name}: {f.error} on input {data[:200].hex()}"


def test_the_checker_reports_an_unexpected_error():
    """The harness itself can fail: a decoder raising outside its allowed
    type is a finding."""
    from sim.fuzz import Target

    def boom(data: bytes) -> None:
        raise KeyError("x")
    assert check_one(Target("t", boom, (ValueError,)), b"") is not None


@pytest.mark.parametrize("suffix,body,words", [
    (".yaml", b"name: n1\nname: n2\n", ["duplicate", "name"]),
    (".toml", b"name = \"\xff\"\n", ["not UTF-8"]),
    (".json", b"[" * 5000, ["nest"]),
])
def test_config_file_errors_name_the_file(tmp_path, suffix, body, words):
    p = tmp_path / ("node" + suffix)
    p.write_bytes(body)
    try:
        build_config(flags={}, environ={}, config_file=str(p))
    except ConfigError as e:
        assert str(p) in str(e)
        for w in words:
            assert w in str(e), str(e)
    else:
        assert not words, "accepted"


def test_a_pushed_definition_under_another_tasks_key_is_refused():
    """Found by the fuzzer: a peer's entry ``task/t2`` whose definition says
    ``id: t1`` made NodeCore.serve raise KeyError from the scheduler."""
    from node import peerwire
    from node.core import NodeCore
    from node.core_effects import Note
    from node.state.store import Store
    from node.tasks.model import Task

    core = NodeCore("me", Store("me"), rng=random.Random(0))
    other = Store("peer")
    t1 = Task.from_dict({"id": "t1", "schedule": "@every 1s", "command": {"type": "shell", "run": "true"}})
    entries = other.put_task("t2", t1.to_dict(), None, 1_800_000_000.0)
    reply, effects = core.serve("peer", peerwire.encode({"t": "push", "entries": [list(e) for e in entries]}),
                                1_800_000_000.0)
    assert peerwire.decode(reply)["ok"]
    notes = [e for e in effects if isinstance(e, Note) and e.event == "task_invalid"]
    assert notes and "stored as 't2'" in notes[0].fields["error"]
    assert "t2" not in core.tasks
