"""node/tasks/diff.py: what ``apply --dry-run`` reports, as properties."""
from __future__ import annotations

from hypothesis import given, strategies as st

from node.tasks.diff import diff_tasks, field_diff

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text("ab", max_size=2))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("xyz"), inner, max_size=3)), max_leaves=8)
defs = st.dictionaries(st.sampled_from(["schedule", "timeout_s", "command", "env"]), values, max_size=4)
catalogues = st.dictionaries(st.sampled_from(["t1", "t2", "t3", "t4"]), defs, max_size=4)


def _apply(old, changes):
    """Rebuild ``new`` from ``old`` and a field diff (inverse of field_diff)."""
    import copy

    new = copy.deepcopy(old)
    for ch in changes:
        if ch["field"] == "(definition)":
            return ch["to"]
        path = ch["field"].split(".")
        cur = new
        for k in path[:-1]:
            cur = cur[k]
        if ch.get("removed"):
            del cur[path[-1]]
        else:
            cur[path[-1]] = ch["to"]
    return new


@given(defs, defs)
def test_field_diff_is_empty_iff_equal_and_rebuilds_the_new_definition(a, b):
    d = field_diff(a, b)
    assert (d == []) == (a == b and _same_types(a, b))
    assert _apply(a, d) == b


def _same_types(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_types(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(catalogues, catalogues, st.booleans())
def test_diff_partitions_the_ids(current, wanted_map, prune):
    wanted = [dict(d, id=tid) for tid, d in wanted_map.items()]
    cur = {tid: dict(d, id=tid) for tid, d in current.items()}
    r = diff_tasks(cur, wanted, prune=prune)
    changed = [c["id"] for c in r["changed"]]
    assert sorted(r["added"] + changed + r["unchanged"]) == sorted(wanted_map)
    assert set(r["added"]) == set(wanted_map) - set(current)
    assert set(r["removed"]) == ((set(current) - set(wanted_map)) if prune else set())
    for tid in r["unchanged"]:
        assert cur[tid] == dict(wanted_map[tid], id=tid)
    for lst in (r["added"], changed, r["removed"], r["unchanged"]):
        assert lst == sorted(lst)


def test_nested_field_named():
    old = {"id": "t", "command": {"type": "exec", "argv": ["a"]}, "timeout_s": 60}
    new = {"id": "t", "command": {"type": "exec", "argv": ["a", "b"]}, "timeout_s": 60, "env": {"X": "1"}}
    assert field_diff(old, new) == [
        {"field": "command.argv", "from": ["a"], "to": ["a", "b"]},
        {"field": "env", "from": None, "to": {"X": "1"}, "added": True},
    ]
    assert field_diff({"n": 1}, {"n": True}) == [{"field": "n", "from": 1, "to": True}]
