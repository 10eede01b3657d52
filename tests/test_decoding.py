"""node/tasks/decoding.py at its edges: depth, value count, integer range, finite
floats, duplicate keys; and any bytes either decode or raise DecodeError."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.tasks.decoding import (
    INT_MAX,
    INT_MIN,
    MAX_DEPTH,
    DecodeError,
    check_tree,
    loads_json,
    loads_yaml,
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_depth_edge_json_and_yaml():
    assert loads_json(nested(MAX_DEPTH)) is not None
    with pytest.raises(DecodeError, match="nested deeper than 32"):
        loads_json(nested(MAX_DEPTH + 1))
    assert loads_yaml("a: " + nested(MAX_DEPTH - 1)) is not None  # the mapping is level 1
    with pytest.raises(DecodeError, match="nested deeper than 32"):
        loads_yaml("a: " + nested(MAX_DEPTH))
    # strings full of brackets do not count
    assert loads_json(json.dumps(["[" * 1000])) == ["[" * 1000]


def test_integer_edges():
    assert loads_json(f"[{INT_MAX}, {INT_MIN}]") == [INT_MAX, INT_MIN]
    for bad in (INT_MAX + 1, INT_MIN - 1, 10**20, -(10**20)):
        with pytest.raises(DecodeError, match=r"\[0\]: integer"):
            loads_json(f"[{bad}]")
    with pytest.raises(DecodeError, match="5000 digits"):
        loads_json("9" * 5000)
    with pytest.raises(DecodeError, match="integer out of range"):
        loads_yaml(f"n: {INT_MAX + 1}")


@pytest.mark.parametrize("doc", ["[NaN]", "[Infinity]", "[-Infinity]", "[1e309]", "[-1e400]"])
def test_non_finite_numbers_are_refused_with_their_path(doc):
    with pytest.raises(DecodeError, match=r"^\[0\]: "):
        loads_json(doc)


def test_finite_float_edge():
    assert loads_json("[1.7976931348623157e308, 1e-400]") == [1.7976931348623157e308, 0.0]


def test_duplicate_keys_are_named_with_their_path():
    with pytest.raises(DecodeError, match=r"^a\.b\.c: duplicate key"):
        loads_json('{"a": {"b": {"c": 1, "c": 1}}}')
    with pytest.raises(DecodeError, match=r"^\[1\]\.k: duplicate key"):
        loads_yaml("- {}\n- {k: 1, k: 2}\n")


def test_value_count_edge_and_shared_values_count_per_reference():
    shared = [0] * 9  # 10 values
    doc = [shared] * 10  # 1 + 10 * 10
    assert check_tree(doc, max_nodes=101) == 101
    with pytest.raises(DecodeError, match="more than 100 values"):
        check_tree(doc, max_nodes=100)
    loop: list = []
    loop.append(loop)
    with pytest.raises(DecodeError, match="refers to itself"):
        check_tree(loop)


@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_decode_error(data):
    try:
        loads_json(data)
    except DecodeError:
        pass
    try:
        loads_yaml(data.decode("utf-8", "replace"))
    except DecodeError:
        pass


@given(st.text(alphabet="[]{}:,-&*ab 1\n\"'!", max_size=200))
def test_structural_yaml_and_json_noise_decodes_or_raises_decode_error(text):
    for f in (loads_json, loads_yaml):
        try:
            f(text)
        except DecodeError:
            pass
