"""The house rules of the source tree, checked by reading the code with ``ast``
(nothing is imported, so a broken module still gets a precise message).

The rules (docs/ARCHITECTURE.md draws the picture):

1. **Three packages, imports run one way.** ``sim`` may import ``node`` and
   ``gossip``; ``node`` may import ``gossip``; ``gossip`` imports neither
   ``node`` nor ``sim``, and ``node`` does not import ``sim``. At any level:
   inside functions and under ``if TYPE_CHECKING:`` too.

2. **Cores do no I/O.** A core module must not import ``trio``, ``socket``,
   ``time``, ``os``, ``subprocess``, ``sqlite3``, ``asyncio`` or
   ``threading``, at any level. Time and randomness come in as arguments
   (a ``random.Random`` passed in is fine). Every module is a core except:

   - a module whose file name ends in ``_shell.py``;
   - in ``node/``: ``node/shell.py`` (the node's trio shell), the entry
     points and the reading of configuration from files and the environment
     in ``node/cli/`` (all of it but ``settings.py``, a core),
     ``node/pyrunner.py`` (runs inside the child process
     of a ``python`` task) and ``node/client.py`` (the blocking HTTP client,
     a public import path: ``from node.client import Client``);
   - in ``gossip/``: ``gossip/transport.py`` and ``gossip/udp.py``.

   A core also must not import a shell that imports one of those when it is
   imported: importing a core never pulls in trio.

   ``sim/`` is not checked: the simulator runs in one process and its real
   process harness is a shell of its own.

3. **Floors inside node/: an import never runs up a floor.** Each module of
   ``node/`` stands on one floor (the table ``FLOORS`` below, first match
   wins); it may import modules on its own floor or lower, never higher:

   ====  ==================================================================
   0     the rooms: state, ownership, tasks, schedule, the run, fencing and
         observe cores, API tokens, peerwire, knobs, the settings values
         (``node/cli/settings.py``); ``node/pyrunner.py``
   1     the node core (``node/core.py`` and the modules split out of it)
         and the read model built from it (``node/api/views.py``,
         ``node/api/status_page.py``)
   2     the shells: every ``*_shell.py``, ``node/shell.py``,
         ``node/client.py``, ``node/cli/config.py`` (flags, file and
         environment, read by the shells)
   3     the entry points: ``node/cli/daemon.py``, ``demo.py``,
         ``peerctl.py``
   ====  ==================================================================

   A module of ``node/`` that no row matches fails the test: add a row.
   Package ``__init__`` files stand on the highest floor of what they
   re-export. Imports at every level count (a function-level import is still
   a dependency).

4. **No import cycles at import time.** Only imports that run when the module
   is imported count: top-level statements, not function bodies and not
   ``if TYPE_CHECKING:``. Importing ``a.b.c`` from outside package ``a.b``
   first runs ``a/__init__`` and ``a/b/__init__``, so those count as edges
   too (that is how ``node.schedule`` once cycled through ``node.tasks``).

5. **Every module starts with a docstring** whose first line says its one
   concern.

Known breaches are listed in ``KNOWN`` with the reason; the test fails if a
new breach appears and also if a listed one is gone (then delete its row).
"""
from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gossip", "node", "sim")
FORBIDDEN = ("trio", "socket", "time", "os", "subprocess", "sqlite3", "asyncio", "threading")

# Modules allowed to do I/O though their name does not end in ``_shell.py``.
NAMED_SHELLS = (
    "node/shell.py",
    "node/cli/__init__.py",
    "node/cli/config.py",
    "node/cli/daemon.py",
    "node/cli/demo.py",
    "node/cli/peerctl.py",
    "node/pyrunner.py",
    "node/client.py",
    "gossip/transport.py",
    "gossip/udp.py",
)

# Floors of node/ (rule 3). First matching pattern wins; patterns are
# fnmatch patterns on the path from the repository root.
FLOORS: tuple[tuple[str, int], ...] = (
    # 3: entry points
    ("node/cli/daemon.py", 3),
    ("node/cli/demo.py", 3),
    ("node/cli/peerctl.py", 3),
    ("node/cli/__init__.py", 3),
    # 2: shells
    ("node/*_shell.py", 2),
    ("node/shell.py", 2),
    ("node/client.py", 2),
    ("node/cli/config.py", 2),
    # 1: the node core and the read model built from it
    ("node/core.py", 1),
    ("node/core_*.py", 1),
    ("node/api/views.py", 1),
    ("node/api/status_page.py", 1),
    ("node/api/__init__.py", 1),
    # 0: the rooms
    ("node/__init__.py", 0),
    ("node/knobs.py", 0),
    ("node/peerwire.py", 0),
    ("node/cli/settings.py", 0),
    ("node/state/*", 0),
    ("node/ownership/*", 0),
    ("node/tasks/*", 0),
    ("node/schedule/*", 0),
    ("node/run/*", 0),
    ("node/pyrunner.py", 0),
    ("node/fencing/*", 0),
    ("node/observe/*", 0),
    ("node/api/tokens.py", 0),
    ("node/api/messages.py", 0),
)
FLOOR_NAMES = {0: "a room", 1: "the node core", 2: "a shell", 3: "an entry point"}

# Known breaches: (rule, file, imported module) -> why it is still there.
KNOWN: dict[tuple[str, str, str], str] = {}


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Import:
    """One imported module as seen in a file."""

    file: str          # path from the root, e.g. "node/core.py"
    line: int
    text: str          # the statement, e.g. "from node.core import NodeCore"
    target: str        # the module name imported ("node.core", "trio", "os.path")
    at_import: bool    # runs when the module is imported (top level, not TYPE_CHECKING)

    def where(self) -> str:
        return f"{self.file}:{self.line}: `{self.text}`"


def modules(root: Path) -> dict[str, str]:
    """Module name -> path from the root, for every .py under the packages."""
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            rel = p.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = rel.as_posix()
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def read_imports(root: Path, name: str, rel: str, mods: dict[str, str]) -> list[Import]:
    """Every import statement of one module, resolved to module names."""
    source = (root / rel).read_text()
    tree = ast.parse(source, filename=rel)
    is_pkg = rel.endswith("__init__.py")
    out: list[Import] = []

    def add(node: ast.stmt, target: str, at_import: bool) -> None:
        text = " ".join(ast.unparse(node).split())
        imp = Import(rel, node.lineno, text, target, at_import)
        if imp not in out:
            out.append(imp)

    def visit(node: ast.AST, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(child, alias.name, at_import)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for alias in child.names:
                    sub = f"{mod}.{alias.name}"
                    add(child, sub if sub in mods else mod, at_import)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), at_import)
            else:
                visit(child, at_import)

    visit(tree, True)
    return out


def all_imports(root: Path) -> tuple[dict[str, str], list[Import]]:
    mods = modules(root)
    imps: list[Import] = []
    for name, rel in mods.items():
        imps += read_imports(root, name, rel, mods)
    return mods, imps


def _top(target: str) -> str:
    return target.split(".")[0]


def _match(rel: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def is_core(rel: str) -> bool:
    """Rule 2: is this file a sans-IO core?"""
    if _top(rel.replace("/", ".")) not in ("node", "gossip"):
        return False
    return not (rel.endswith("_shell.py") or _match(rel, NAMED_SHELLS))


def floor_of(rel: str) -> int | None:
    for pattern, floor in FLOORS:
        if fnmatch.fnmatchcase(rel, pattern):
            return floor
    return None


# ------------------------------------------------------------------ checks
# Each check returns (key, message) pairs; key is matched against KNOWN.


def check_packages(root: Path) -> list[tuple[tuple, str]]:
    """Rule 1: gossip imports neither node nor sim; node does not import sim."""
    banned = {"gossip": ("node", "sim"), "node": ("sim",)}
    out = []
    for imp in all_imports(root)[1]:
        pkg = imp.file.split("/")[0]
        if _top(imp.target) in banned.get(pkg, ()):
            out.append((("package", imp.file, imp.target),
                        f"{imp.where()}: {pkg}/ must not import {_top(imp.target)}/ "
                        "(sim -> node -> gossip, never upwards)"))
    return out


def check_sans_io(root: Path) -> list[tuple[tuple, str]]:
    """Rule 2: cores import no I/O module, at any level, nor a shell that does."""
    mods, imps = all_imports(root)
    does_io = {i.file for i in imps if i.at_import and _top(i.target) in FORBIDDEN}
    out = []
    for imp in imps:
        if not is_core(imp.file):
            continue
        if _top(imp.target) in FORBIDDEN:
            out.append((("sans-io", imp.file, imp.target),
                        f"{imp.where()}: a core must not import {_top(imp.target)} "
                        "(take time and randomness as arguments, or name the file *_shell.py)"))
        elif mods.get(imp.target) in does_io and not is_core(mods[imp.target]):
            out.append((("sans-io", imp.file, imp.target),
                        f"{imp.where()}: a core must not import a shell "
                        f"({mods[imp.target]} does I/O when imported)"))
    return out


def check_floors(root: Path) -> list[tuple[tuple, str]]:
    """Rule 3: inside node/, no import runs up a floor."""
    mods, imps = all_imports(root)
    out = []
    for rel in mods.values():
        if rel.startswith("node/") and floor_of(rel) is None:
            out.append((("floor", rel, "?"),
                        f"{rel}: on no floor; add a row to FLOORS in tests/test_layering.py"))
    for imp in imps:
        if not (imp.file.startswith("node/") and imp.target in mods
                and _top(imp.target) == "node"):
            continue
        mine, theirs = floor_of(imp.file), floor_of(mods[imp.target])
        if mine is None or theirs is None or theirs <= mine:
            continue
        out.append((("floor", imp.file, imp.target),
                    f"{imp.where()}: {FLOOR_NAMES[mine]} (floor {mine}) imports "
                    f"{FLOOR_NAMES[theirs]} (floor {theirs}, {mods[imp.target]})"))
    return out


def check_cycles(root: Path) -> list[tuple[tuple, str]]:
    """Rule 4: no cycle among the imports that run at import time."""
    mods, imps = all_imports(root)
    edges: dict[str, dict[str, Import]] = {m: {} for m in mods}
    for imp in imps:
        if not imp.at_import or imp.target not in mods:
            continue
        src = next(m for m, r in mods.items() if r == imp.file)
        parts = imp.target.split(".")
        # importing a.b.c runs a, a.b and a.b.c; the packages that contain
        # src are already running when src runs, so they add no edge
        for i in range(1, len(parts) + 1):
            dst = ".".join(parts[:i])
            explicit = i == len(parts)
            if dst == src or (not explicit and (src + ".").startswith(dst + ".")):
                continue
            if dst in mods:
                edges[src].setdefault(dst, imp)
    out = []
    seen_cycles: set[frozenset] = set()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dst in sorted(edges[m]):
            if state.get(dst) == 1:
                cycle = stack[stack.index(dst):] + [dst]
                key = frozenset(cycle)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    steps = "\n    ".join(edges[a][b].where() for a, b in zip(cycle, cycle[1:]))
                    out.append((("cycle", mods[dst], " -> ".join(cycle)),
                                f"import cycle {' -> '.join(cycle)}:\n    {steps}"))
            elif dst not in state:
                dfs(dst)
        stack.pop()
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            dfs(m)
    return out


def check_docstrings(root: Path) -> list[tuple[tuple, str]]:
    """Rule 5: every module starts with a docstring."""
    out = []
    for rel in modules(root).values():
        tree = ast.parse((root / rel).read_text(), filename=rel)
        if not ast.get_docstring(tree, clean=False):
            out.append((("docstring", rel, ""),
                        f"{rel}:1: no module docstring (its first line says the module's one concern)"))
    return out


CHECKS = {
    "package": check_packages,
    "sans-io": check_sans_io,
    "floor": check_floors,
    "cycle": check_cycles,
    "docstring": check_docstrings,
}


# ------------------------------------------------------------------ the tree


@pytest.mark.parametrize("rule", sorted(CHECKS))
def test_tree_keeps_the_rule(rule):
    found = CHECKS[rule](ROOT)
    new = [msg for key, msg in found if key not in KNOWN]
    assert not new, f"{len(new)} breach(es) of the {rule} rule:\n" + "\n".join(new)
    gone = [k for k in KNOWN if k[0] == rule and k not in {key for key, _ in found}]
    assert not gone, f"fixed, delete from KNOWN in tests/test_layering.py: {gone}"


def test_the_rules_see_the_whole_tree():
    """A guard against checking nothing: the walk finds the known rooms."""
    mods, imps = all_imports(ROOT)
    for rel in ("gossip/swim.py", "gossip/udp.py", "node/core.py", "node/shell.py",
                "sim/cluster.py", "node/state/store.py"):
        assert rel in mods.values()
    assert is_core("gossip/swim.py") and is_core("node/core.py")
    assert not is_core("node/shell.py") and not is_core("gossip/udp.py")
    assert not is_core("node/state/sqlite_shell.py") and not is_core("node/cli/daemon.py")
    assert any(i.file == "node/shell.py" and i.target == "trio" for i in imps)


# ------------------------------------------------------------------ the test tests itself


BAD_TREE = {
    "gossip/__init__.py": '"""gossip."""\n',
    # a core importing trio, inside a function; gossip importing node
    "gossip/swim.py": (
        '"""swim core."""\n'
        "from gossip import wire\n"
        "def tick():\n"
        "    import trio\n"
        "    from node.core import NodeCore\n"
    ),
    # a core importing time under TYPE_CHECKING and os at the top; a cycle with swim
    "gossip/wire.py": (
        '"""wire core."""\n'
        "import os.path\n"
        "from typing import TYPE_CHECKING\n"
        "from . import swim\n"
        "if TYPE_CHECKING:\n"
        "    from time import monotonic\n"
    ),
    "gossip/udp.py": '"""udp shell."""\nimport trio\nimport socket\n',
    "node/__init__.py": "",  # no docstring
    "node/core.py": ('"""node core."""\nfrom node.state.store import Store\nimport sim\n'
                     "from node.state.sqlite_shell import SqliteStore\n"),
    "node/shell.py": '"""node shell."""\nimport trio\nfrom node.core import NodeCore\n',
    "node/state/__init__.py": '"""state."""\n',
    # a room importing the shell: up two floors, from inside a function
    "node/state/store.py": '"""store core."""\ndef f():\n    from node.shell import run\n',
    "node/state/sqlite_shell.py": '"""sqlite shell."""\nimport sqlite3\n',
    "node/stray.py": '"""a new module nobody put on a floor."""\n',
    "sim/__init__.py": '"""sim."""\nimport time\nfrom node.core import NodeCore\n',
}


@pytest.fixture
def bad_tree(tmp_path):
    for rel, text in BAD_TREE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_rules_catch_a_bad_tree(bad_tree):
    found = {rule: [msg for _, msg in check(bad_tree)] for rule, check in CHECKS.items()}
    assert sorted(found["package"]) == [
        "gossip/swim.py:5: `from node.core import NodeCore`: gossip/ must not import node/ "
        "(sim -> node -> gossip, never upwards)",
        "node/core.py:3: `import sim`: node/ must not import sim/ (sim -> node -> gossip, never upwards)",
    ]
    assert sorted(msg.split(": a core")[0] for msg in found["sans-io"]) == [
        "gossip/swim.py:4: `import trio`",
        "gossip/wire.py:2: `import os.path`",
        "gossip/wire.py:6: `from time import monotonic`",
        "node/core.py:3: `import sim`",  # sim/__init__ imports time
        "node/core.py:4: `from node.state.sqlite_shell import SqliteStore`",
        "node/state/store.py:3: `from node.shell import run`",
    ]  # gossip/udp.py, node/shell.py and the sqlite shell may import trio, socket, sqlite3
    sans_io = "\n".join(found["sans-io"])
    assert "gossip/swim.py:4: `import trio`: a core must not import trio" in sans_io
    assert ("node/core.py:4: `from node.state.sqlite_shell import SqliteStore`: a core must not "
            "import a shell (node/state/sqlite_shell.py does I/O when imported)") in sans_io
    floors = "\n".join(found["floor"])
    assert ("node/state/store.py:3: `from node.shell import run`: a room (floor 0) imports "
            "a shell (floor 2, node/shell.py)") in floors
    assert "node/stray.py: on no floor" in floors
    assert ("node/core.py:4: `from node.state.sqlite_shell import SqliteStore`: the node core "
            "(floor 1) imports a shell (floor 2, node/state/sqlite_shell.py)") in floors
    assert len(found["floor"]) == 3
    gossip_cycle, node_sim_cycle = found["cycle"]
    assert gossip_cycle.startswith("import cycle gossip.swim -> gossip.wire -> gossip.swim")
    assert "gossip/swim.py:2: `from gossip import wire`" in gossip_cycle
    assert "gossip/wire.py:4: `from . import swim`" in gossip_cycle
    assert node_sim_cycle.startswith("import cycle node.core -> sim -> node.core")
    assert found["docstring"] == [
        "node/__init__.py:1: no module docstring (its first line says the module's one concern)"]


def test_cycle_check_ignores_function_level_and_type_checking_imports(tmp_path):
    files = {
        "gossip/__init__.py": '"""g."""\n',
        "gossip/a.py": '"""a."""\nfrom gossip.b import x\n',
        "gossip/b.py": ('"""b."""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n'
                        "    from gossip.a import y\ndef f():\n    from gossip.a import z\n"),
        "node/__init__.py": '"""n."""\n',
        "sim/__init__.py": '"""s."""\n',
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert check_cycles(tmp_path) == []


def test_cycle_check_sees_cycles_through_a_package_init(tmp_path):
    """Importing node.schedule.slots runs node/schedule/__init__ first."""
    files = {
        "gossip/__init__.py": '"""g."""\n',
        "sim/__init__.py": '"""s."""\n',
        "node/__init__.py": '"""n."""\n',
        "node/schedule/__init__.py": '"""s."""\nfrom node.schedule.scheduler import Scheduler\n',
        "node/schedule/slots.py": '"""s."""\n',
        "node/schedule/scheduler.py": '"""s."""\nfrom node.tasks.model import Task\n',
        "node/tasks/__init__.py": '"""t."""\n',
        "node/tasks/model.py": '"""m."""\nfrom node.schedule.slots import Schedule\n',
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (cycle,) = [msg for _, msg in check_cycles(tmp_path)]
    assert cycle.startswith(
        "import cycle node.schedule -> node.schedule.scheduler -> node.tasks.model -> node.schedule")
