"""Child-side entry for ``python`` tasks: ``python -m node.pyrunner [SPEC]``.

The node never imports task code itself: it starts this module in a child
process (its own process group, see :mod:`node.run.processes_shell`), so a crash
(``os.abort``, a segfault in a C extension), a hang or ``sys.exit`` in the
task cannot hurt the node.

Protocol
--------
The spec is a JSON object ``{"target": "pkg.module:func", "args": [...],
"kwargs": {...}}``, read from ``argv[1]`` when given, else from stdin (at most
``MAX_SPEC_BYTES``). ``target`` may name a nested attribute
(``pkg.mod:Class.method``). The module is imported with the working
directory first on ``sys.path`` (``-m`` puts it there), so task modules next
to the task's ``cwd`` import.

Exit status:
  * 0 - the callable returned. Its value is printed to stdout as JSON when
    serialisable, else as ``repr``; ``None`` prints nothing.
  * 1 - the callable raised; the traceback goes to stderr.
  * n - the callable called ``sys.exit(n)`` (SystemExit propagates untouched).
  * 2 - the spec is bad or the target cannot be imported/resolved
    (message on stderr, prefixed ``pyrunner:``).
  * -N (as seen by the parent) - the child died of signal N.

Coroutine functions are not supported (exit 2 with a clear message): run an
event loop inside a sync wrapper.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import traceback
from typing import Any

__all__ = ["EXIT_BAD_SPEC", "MAX_SPEC_BYTES", "load_spec", "main", "resolve_target"]

#: Exit status for a bad spec or an unresolvable target.
EXIT_BAD_SPEC = 2
#: Bound on the spec read from stdin.
MAX_SPEC_BYTES = 16 * 1024 * 1024

#: A python task's target, ``module.path:callable.path``; the attempt core
#: (node/run/attempt.py) checks it at validation with the same pattern.
_TARGET_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


class SpecError(ValueError):
    """The spec is malformed or its target cannot be resolved."""


def load_spec(raw: str | bytes) -> dict[str, Any]:
    """Parse and check a spec; returns ``{"target", "args", "kwargs"}``.

    Raises:
        SpecError: with a message naming the bad field.
    """
    try:
        spec = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"spec is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError("spec must be a JSON object")
    unknown = sorted(set(spec) - {"target", "args", "kwargs"})
    if unknown:
        raise SpecError(f"spec: unknown field(s) {unknown}")
    target = spec.get("target")
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise SpecError(f"spec: target must look like 'package.module:function', got {target!r}")
    args = spec.get("args", [])
    kwargs = spec.get("kwargs", {})
    if not isinstance(args, list):
        raise SpecError("spec: args must be a list")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise SpecError("spec: kwargs must be an object with string keys")
    return {"target": target, "args": args, "kwargs": kwargs}


def resolve_target(target: str) -> Any:
    """Import ``module`` and walk the dotted attribute path of ``target``.

    Raises:
        SpecError: import failed or an attribute is missing / not callable.
    """
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import module {module_name!r}: {e}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"{target!r}: no attribute {part!r}") from None
    if not callable(obj):
        raise SpecError(f"{target!r} is not callable")
    if inspect.iscoroutinefunction(obj):
        raise SpecError(f"{target!r} is a coroutine function; async targets are not supported")
    return obj


def _render(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def main(argv: list[str] | None = None) -> int:
    """Run one spec; returns the exit status (``sys.exit`` in the callable
    propagates as ``SystemExit``)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv:
            raw: str | bytes = argv[0]
        else:
            raw = sys.stdin.buffer.read(MAX_SPEC_BYTES + 1)
            if len(raw) > MAX_SPEC_BYTES:
                raise SpecError(f"spec on stdin exceeds {MAX_SPEC_BYTES} bytes")
        spec = load_spec(raw)
        func = resolve_target(spec["target"])
    except SpecError as e:
        print(f"pyrunner: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_SPEC
    try:
        result = func(*spec["args"], **spec["kwargs"])
    except SystemExit:
        sys.stdout.flush()
        raise
    except BaseException:
        sys.stdout.flush()
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    if inspect.iscoroutine(result):
        result.close()
        print(f"pyrunner: {spec['target']!r} returned a coroutine; async targets are not supported",
              file=sys.stderr, flush=True)
        return EXIT_BAD_SPEC
    if result is not None:
        print(_render(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
