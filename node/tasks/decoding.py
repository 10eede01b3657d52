"""Bounded decoders for input from outside: JSON bodies and task files (pure).

Every document the API or a task file hands to peerd goes through here
before anything else looks at it, so that a hostile or broken document costs
bounded work and is refused with a reason that names where it went wrong.

Rules (each limit is checked, documented and tested at its edge):

1. **Nesting depth** at most :data:`MAX_DEPTH` (32) containers. A task needs
   about 20 (list, task, ``command``, ``kwargs`` and the 16 levels
   ``command.args``/``kwargs`` may hold). JSON is scanned for depth *before*
   ``json.loads`` runs (the standard decoder recurses, so 100,000 ``[`` would
   otherwise end in ``RecursionError``); YAML counts depth while composing.
2. **Values** at most :data:`MAX_NODES` (2,000,000) per document, counted
   *after* YAML aliases are expanded (computed on the shared node graph in
   time linear in its distinct nodes), so a "billion laughs" file is refused
   in milliseconds instead of being walked. An alias that refers to itself
   is refused.
3. **Numbers** are finite and fit msgpack: integers in
   ``[-2**63, 2**64 - 1]`` (at most :data:`MAX_INT_DIGITS` digits are even
   converted, far below Python's 4,300-digit limit), floats finite (no
   ``NaN``, ``Infinity``, ``1e999``).
4. **Duplicate keys** in a mapping are refused (JSON and YAML would keep the
   last one silently; TOML refuses them itself).

Errors are :class:`DecodeError` with ``path`` (a tuple of keys and list
indexes from the document's root) and ``reason``, so a caller can name the
task and the field (``tasks.yaml: task 'backup': command.kwargs.n: ...``).
Nothing here does I/O.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml

__all__ = [
    "DecodeError",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_NODES",
    "check_tree",
    "format_path",
    "loads_json",
    "loads_yaml",
]

#: Deepest nesting of lists/mappings accepted in one document.
MAX_DEPTH = 32
#: Most values (containers and scalars, aliases expanded) in one document.
MAX_NODES = 2_000_000
#: Integers: the msgpack range (what replication can carry).
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
#: Longest integer literal converted at all (2**64 has 20 digits).
MAX_INT_DIGITS = 20


class DecodeError(ValueError):
    """A document is refused; ``path`` says where, ``reason`` why."""

    def __init__(self, path: tuple, reason: str) -> None:
        self.path = tuple(path)
        self.reason = reason
        where = format_path(self.path)
        super().__init__(f"{where}: {reason}" if where else reason)


def format_path(path: tuple) -> str:
    """``("tasks", 3, "command", "run")`` -> ``tasks[3].command.run``."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            s = str(p)
            if len(s) > 64:
                s = s[:61] + "..."
            out += ("." if out else "") + s
    return out


class _Refused:
    """A value the decoder would not build (kept so the tree check can name
    its field): a non-finite float, an integer too long or out of range."""

    __slots__ = ("text", "reason")

    def __init__(self, text: str, reason: str) -> None:
        self.text = text if len(text) <= 24 else text[:21] + "..."
        self.reason = reason

    def __repr__(self) -> str:
        return self.text


class _Mapping(dict):
    """A decoded mapping that remembers keys given more than once."""

    __slots__ = ("duplicates",)


def _pairs(pairs: list) -> dict:
    d = _Mapping(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        dups = []
        for k, _ in pairs:
            if k in seen and k not in dups:
                dups.append(k)
            seen.add(k)
        d.duplicates = dups
    return d


def _parse_int(text: str) -> Any:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        return _Refused(text, f"integer of {digits} digits is out of range "
                              f"({INT_MIN} to {INT_MAX})")
    return int(text)


def _parse_float(text: str) -> Any:
    f = float(text)
    if not math.isfinite(f):
        return _Refused(text, "number is too large (not a finite float)")
    return f


def _parse_constant(text: str) -> Any:
    return _Refused(text, f"{text} is not a number peerd accepts (numbers must be finite)")


# A JSON string (escapes included) or one bracket; strings are skipped whole.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


def _json_depth_ok(text: str) -> None:
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise DecodeError((), f"nested deeper than {MAX_DEPTH} levels (at character {m.start()})")
        elif c in "]}":
            depth -= 1


def loads_json(data: bytes | str, *, check: bool = True) -> Any:
    """Decode a JSON document under the rules above.

    With ``check=False`` the caller runs :func:`check_tree` itself (to name
    the task of an error from the decoded document); until then the value may
    hold refused numbers and duplicate-key markers.

    Raises:
        DecodeError: not UTF-8, not JSON (with line and column), or a rule
            broken (with the path).
    """
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError((), f"not UTF-8 (byte {e.start})") from None
    else:
        text = data
    _json_depth_ok(text)
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_int=_parse_int,
                           parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise DecodeError((), f"not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # belt and braces; the scan above bounds depth
        raise DecodeError((), f"not valid JSON: {e}") from None
    if check:
        check_tree(value)
    return value


# ---------------------------------------------------------------- YAML


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with bounded depth and size, no self-referring aliases and
    no duplicate keys (recorded on the mapping, reported by the tree check)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise DecodeError((), f"nested deeper than {MAX_DEPTH} levels "
                                      f"(line {mark.line + 1} column {mark.column + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _yaml_size(node)
        return node

    def construct_yaml_map(self, node):
        data = _Mapping()
        yield data
        dups = []
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            try:
                key = self.construct_object(key_node, deep=False)
                hash(key)
            except Exception:
                continue  # construct_mapping below reports unhashable keys
            if key in seen and key not in dups:
                dups.append(key)
            seen.add(key)
        data.update(self.construct_mapping(node))
        if dups:
            data.duplicates = dups


_YamlLoader.add_constructor("tag:yaml.org,2002:map", _YamlLoader.construct_yaml_map)


def _yaml_size(root) -> int:
    """Values in the document with aliases expanded (memoised per node), and
    the expanded depth; refuses self-containing aliases."""
    memo: dict[int, tuple[int, int]] = {}  # id -> (values, height)
    on_path: set[int] = set()

    def where(node) -> str:
        m = node.start_mark
        return f"line {m.line + 1} column {m.column + 1}"

    def size(node, depth: int) -> tuple[int, int]:
        if isinstance(node, yaml.ScalarNode):
            return 1, 0
        key = id(node)
        got = memo.get(key)
        if got is None and key in on_path:
            raise DecodeError((), f"an alias refers to a node that contains it ({where(node)})")
        if got is None and depth + 1 > MAX_DEPTH or got is not None and depth + got[1] > MAX_DEPTH:
            raise DecodeError((), f"nested deeper than {MAX_DEPTH} levels once aliases are expanded ({where(node)})")
        if got is not None:
            return got
        on_path.add(key)
        total, height = 1, 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = [c for kv in node.value for c in kv]
        for child in children:
            n, h = size(child, depth + 1)
            total += n
            height = max(height, h + 1)
            if total > MAX_NODES:
                raise DecodeError((), f"more than {MAX_NODES} values once aliases are expanded ({where(node)})")
        on_path.discard(key)
        memo[key] = (total, height)
        return total, height

    return size(root, 0)[0] if root is not None else 0


def loads_yaml(text: str, *, check: bool = True) -> Any:
    """Decode a YAML document (safe tags only) under the rules above.

    Raises:
        DecodeError: bad YAML (with the position) or a rule broken.
    """
    loader = None
    try:
        loader = _YamlLoader(text)  # the reader refuses control characters here
        value = loader.get_single_data()
    except DecodeError:
        raise
    except yaml.YAMLError as e:
        raise DecodeError((), "not valid YAML: " + " ".join(str(e).split())) from None
    except (ValueError, TypeError, RecursionError) as e:  # e.g. an int over 4300 digits
        raise DecodeError((), f"not valid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if check:
        check_tree(value)
    return value


# ---------------------------------------------------------------- tree check


def check_tree(value: Any, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> int:
    """Check a decoded document against the rules; return its value count.

    Shared containers (YAML aliases) are counted once per reference, in time
    linear in the distinct containers.

    Raises:
        DecodeError: with the path of the first offending value.
    """
    memo: dict[int, tuple[int, int]] = {}  # id -> (values, height)
    on_path: set[int] = set()

    def walk(v: Any, path: tuple, depth: int) -> tuple[int, int]:
        if isinstance(v, _Refused):
            raise DecodeError(path, v.reason)
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return 1, 0
        if isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                raise DecodeError(path, f"integer out of range ({INT_MIN} to {INT_MAX})")
            return 1, 0
        if isinstance(v, float):
            if not math.isfinite(v):
                raise DecodeError(path, "number must be finite (no NaN or infinity)")
            return 1, 0
        if not isinstance(v, (list, tuple, dict)):
            return 1, 0  # dates, times, bytes: the consumer checks their type
        key = id(v)
        got = memo.get(key)
        if got is not None:
            if depth + got[1] > max_depth:
                raise DecodeError(path, f"nested deeper than {max_depth} levels")
            return got
        if key in on_path:
            raise DecodeError(path, "refers to itself")
        if depth + 1 > max_depth:
            raise DecodeError(path, f"nested deeper than {max_depth} levels")
        on_path.add(key)
        total, height = 1, 1
        if isinstance(v, dict):
            dups = getattr(v, "duplicates", None)
            if dups:
                raise DecodeError(path + (dups[0],), "duplicate key (given more than once in one mapping)")
            items = v.items()
        else:
            items = enumerate(v)
        for k, x in items:
            n, h = walk(x, path + (k,), depth + 1)
            total += n
            height = max(height, h + 1)
            if total > max_nodes:
                raise DecodeError(path, f"more than {max_nodes} values")
        on_path.discard(key)
        memo[key] = (total, height)
        return total, height

    return walk(value, (), 0)[0]
