"""Optional compiled simulator: build the hot gossip and simulator modules with mypyc.

``python -m sim.accel build [--dir DIR] [--modules a.py,b.py]`` copies the
``.py`` and ``.c`` files of the packages ``gossip/``, ``sim/`` and ``node/``
into DIR (default ``build/accel`` under the repo root), compiles the modules
in ``MODULES`` there with mypyc (it ships inside mypy: ``pip install
'.[accel]'``) and the C extensions in ``EXTENSIONS`` with the same compiler,
and writes ``accel-manifest.json``: the sha256 of every copied source, the
Python and mypy versions and the module list.
``python -m sim.accel check`` says whether that build is present and fresh.

Rules:
- The compiled path is optional and never changes a result: the compiled
  modules are the same sources, so one seed gives the same ``trace_hash``
  compiled and interpreted (tests/test_sim_accel.py checks it). Nothing in
  the repo imports this module unless ``peersim run --compiled`` is asked for.
- A build is used only while it is fresh: every ``.py`` of the three packages
  must hash exactly as in the manifest (same file set), the interpreter must
  be the one it was built for, and every compiled extension must be there.
  Otherwise ``accel_path`` returns None and ``stale_reason`` says why; the
  copy in DIR would run old code, so it is never used silently.
- ``peersim run --compiled`` (sim/cli.py) re-executes itself with DIR first
  on ``PYTHONPATH`` and ``ENV_MARKER`` set; extension modules win over
  ``.py`` files in the same directory, so ``import gossip.swim`` loads the
  ``.so`` and everything else the copied sources.
- Which modules pay off was measured (bench/README-sim.md, "Compiled
  simulator (mypyc)"): compiling a module only helps when its hot code is
  typed well enough for native calls; some make the run slower.
- The compiled child also takes pymalloc's arenas from a range on
  transparent huge pages (``sim/_hugepages.c``, ``install_huge_pages``):
  fewer TLB misses over the ~650 MB of member records at N=1000; the
  ``--compiled`` re-execution also sets the glibc tunable
  ``glibc.malloc.hugetlb=1`` for malloc's own heap. Objects and results are
  the same; ``PEERSIM_HUGEPAGES=0`` turns both off.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["MODULES", "EXTENSIONS", "PACKAGES", "ENV_MARKER", "MANIFEST", "HUGEPAGES_ENV", "MALLOC_HUGETLB",
           "default_dir", "build_dir_of", "repo_root", "source_hashes", "stale_reason", "accel_path", "build",
           "compiled_modules", "install_huge_pages", "huge_page_stats", "main"]

# The module set compiled by default (paths relative to the repo root): the
# fastest set measured. bench/results/sim-accel.json (1000 nodes x 600 s,
# user CPU s under load): pure 205, core four 138, + seal 124, all nine 131,
# core + sim/cluster.py 147. Since 2026-11-27 the simulator's hot loop is
# typed for mypyc (typed locals for the core and sealer calls, no idle
# ticks), and core + seal + sim/cluster.py, sim/network.py and sim/loop.py
# is the fastest: 1000 nodes x 200 s settled, 30.0 s against 36.2 s without
# the three sim modules (bench/README-sim.md). sim/metrics.py measured
# slower compiled (untyped), so it and the rest stay interpreted.
MODULES: tuple[str, ...] = (
    # gossip/swim.py and the modules it was split into (2026-12-04): the same code
    "gossip/swim.py",
    "gossip/swimstate.py",
    "gossip/merge.py",
    "gossip/probe.py",
    "gossip/pushpull.py",
    "gossip/members.py",
    "gossip/records.py",
    "gossip/fastnew.py",
    "gossip/settle.py",
    "gossip/broadcast.py",
    "gossip/wire.py",
    "gossip/suspicion.py",
    "gossip/seal.py",
    "sim/cluster.py",
    "sim/network.py",
    "sim/loop.py",
)
EXTENSIONS: tuple[str, ...] = ("sim/_hugepages.c",)
"""Plain C extensions built with the compiled modules (module name = path)."""
PACKAGES: tuple[str, ...] = ("gossip", "sim", "node")
HUGEPAGES_ENV = "PEERSIM_HUGEPAGES"
"""``0`` turns the huge-page arenas of compiled runs off (for A/B runs)."""
MALLOC_HUGETLB = "glibc.malloc.hugetlb=1"
"""The glibc tunable the compiled child gets (unless ``PEERSIM_HUGEPAGES=0``)."""
ENV_MARKER = "PEERSIM_COMPILED"     # set (to the build dir) in the re-executed child
MANIFEST = "accel-manifest.json"
_FORMAT = 1


REPO_ENV = "PEERSIM_REPO"
"""Set by ``--compiled`` re-executions to the repository they started from."""


def repo_root() -> Path:
    """The repository root: the one this module was imported from
    (``sim/..``), or, in a ``--compiled`` child that imports the build
    dir's copy, the one the command was started from (``$PEERSIM_REPO``)."""
    env = os.environ.get(REPO_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent


def default_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root if root is not None else repo_root()) / "build" / "accel"


def build_dir_of(repo: str | os.PathLike | None, build_dir: str | os.PathLike | None = None) -> Path:
    """``build_dir`` when given, else the default under ``repo``."""
    return Path(build_dir) if build_dir is not None else default_dir(repo)


def _py_tag() -> str:
    return f"{sys.implementation.cache_tag}-{sys.version.split()[0]}"


def source_hashes(root: str | os.PathLike) -> dict[str, str]:
    """sha256 of every ``.py`` and ``.c`` in PACKAGES under ``root``, by
    relative path."""
    root = Path(root)
    out: dict[str, str] = {}
    for pkg in PACKAGES:
        base = root / pkg
        for path in sorted([*base.rglob("*.py"), *base.rglob("*.c")]):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(root).as_posix()
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def _ext_path(build_dir: Path, module: str) -> Path | None:
    """The compiled extension of ``module`` (``gossip/swim.py``,
    ``sim/_hugepages.c``) in build_dir."""
    stem = build_dir / module.rsplit(".", 1)[0]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = stem.with_name(stem.name + suffix)
        if p.exists():
            return p
    return None


def _read_manifest(build_dir: Path) -> dict:
    with open(build_dir / MANIFEST, encoding="utf-8") as fh:
        m = json.load(fh)
    if not isinstance(m, dict):
        raise ValueError("manifest is not a JSON object")
    return m


def stale_reason(repo: str | os.PathLike, build_dir: str | os.PathLike | None = None) -> str | None:
    """None when the build in ``build_dir`` is present and matches the
    sources under ``repo``; else a one-line reason."""
    repo = Path(repo)
    bdir = build_dir_of(repo, build_dir)
    try:
        m = _read_manifest(bdir)
    except FileNotFoundError:
        return f"no build at {bdir} (no {MANIFEST})"
    except (OSError, ValueError) as exc:
        return f"unreadable {bdir / MANIFEST}: {exc}"
    if m.get("format") != _FORMAT:
        return f"{MANIFEST} format {m.get('format')!r}, expected {_FORMAT}"
    if m.get("python") != _py_tag():
        return f"built for Python {m.get('python')}, running {_py_tag()}"
    want = m.get("sources")
    if not isinstance(want, dict):
        return f"{MANIFEST}: no sources"
    have = source_hashes(repo)
    if have != want:
        changed = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        return f"sources changed since the build: {', '.join(changed[:3])}{more}"
    mods = m.get("modules")
    if not isinstance(mods, list) or not mods:
        return f"{MANIFEST}: no modules"
    exts = m.get("extensions", [])
    if not isinstance(exts, list):
        return f"{MANIFEST}: bad extensions"
    for mod in [*mods, *exts]:
        if _ext_path(bdir, mod) is None:
            return f"compiled module missing in {bdir}: {mod}"
    return None


def accel_path(repo_root: str | os.PathLike, build_dir: str | os.PathLike | None = None) -> str | None:
    """The build directory (for ``PYTHONPATH``) if its build is fresh, else None.

    Args:
        repo_root: the repository whose sources the build must match.
        build_dir: default ``<repo_root>/build/accel``.
    Returns:
        the absolute build dir, or None (``stale_reason`` says why).
    """
    bdir = build_dir_of(repo_root, build_dir)
    if stale_reason(repo_root, bdir) is not None:
        return None
    return str(bdir.resolve())


def compiled_modules() -> list[str]:
    """Dotted names of the modules of this process that are compiled
    extensions (``gossip.swim`` ...), sorted; [] when interpreted."""
    out = []
    for name in sorted(sys.modules):
        if not name.startswith(tuple(p + "." for p in PACKAGES)):
            continue
        f = getattr(sys.modules[name], "__file__", None) or ""
        if f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            out.append(name)
    return out


_SETUP = """\
from setuptools import Extension, setup
from mypyc.build import mypycify

setup(
    name="peerd_accel",
    ext_modules=mypycify({args!r}, opt_level={opt!r}, debug_level="1")
    + [Extension(path[:-2].replace("/", "."), [path], extra_compile_args=["-O2"]) for path in {exts!r}],
)
"""


def build(build_dir: str | os.PathLike | None = None, modules: tuple[str, ...] | list[str] = MODULES,
          repo: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Copy the sources to ``build_dir``, compile ``modules`` with mypyc and
    write the manifest.

    Raises:
        RuntimeError: mypy/mypyc is missing or the compile failed (the
            compiler output is in the message).
        ValueError: a module is not one of the copied sources.
    """
    repo = Path(repo) if repo is not None else repo_root()
    bdir = build_dir_of(repo, build_dir)
    try:
        import mypy.version
    except ImportError:
        raise RuntimeError("mypy is not installed (it carries mypyc): pip install '.[accel]'") from None
    hashes = source_hashes(repo)
    for mod in modules:
        if mod not in hashes:
            raise ValueError(f"module {mod!r} is not a source under {', '.join(PACKAGES)}/")
    bdir = bdir.resolve()
    if bdir == repo.resolve() or repo.resolve() in bdir.parents and bdir.name in PACKAGES:
        raise ValueError(f"refusing to build into {bdir}")
    # fresh copy: remove the previous copy of the packages (and old extensions)
    for pkg in PACKAGES:
        shutil.rmtree(bdir / pkg, ignore_errors=True)
    for old in bdir.glob("*__mypyc*"):
        old.unlink()
    (bdir / MANIFEST).unlink(missing_ok=True)
    for rel in hashes:
        dst = bdir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / rel, dst)
    copied = source_hashes(bdir)
    if copied != hashes:
        raise RuntimeError("sources changed while copying; build again")
    (bdir / "build").mkdir(exist_ok=True)
    setup = bdir / "build" / "setup.py"
    args = ["--ignore-missing-imports", "--follow-imports=silent", *modules]
    exts = [e for e in EXTENSIONS if e in hashes]
    setup.write_text(_SETUP.format(args=args, opt=os.environ.get("MYPYC_OPT_LEVEL", "3"), exts=exts))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(setup), "build_ext", "--inplace"], cwd=bdir,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-40:]
        raise RuntimeError("mypyc build failed:\n" + "\n".join(tail))
    missing = [m for m in [*modules, *exts] if _ext_path(bdir, m) is None]
    if missing:
        raise RuntimeError(f"mypyc produced no extension for {', '.join(missing)}")
    manifest = {
        "format": _FORMAT,
        "python": _py_tag(),
        "mypy": mypy.version.__version__,
        "modules": list(modules),
        "extensions": exts,
        "build_seconds": round(time.monotonic() - t0, 1),
        "sources": hashes,
    }
    tmp = bdir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, bdir / MANIFEST)
    if not quiet:
        print(f"built {len(modules)} module(s) in {manifest['build_seconds']} s into {bdir}")
    return bdir


def install_huge_pages() -> bool:
    """In a compiled child: take pymalloc's arenas from a range on
    transparent huge pages (``sim/_hugepages.c``) from now on. False when
    turned off (``PEERSIM_HUGEPAGES=0``), not built, or not possible here (no
    THP); the run is the same either way, only its speed differs."""
    if os.environ.get(HUGEPAGES_ENV, "1") == "0":
        return False
    try:
        from sim import _hugepages  # type: ignore[attr-defined]
    except ImportError:
        return False
    _hugepages.install()
    return bool(_hugepages.stats()["installed"])


def huge_page_stats() -> dict | None:
    """The huge-page arena counters (arenas placed in the range, reused,
    outside it), or None when ``install_huge_pages`` did not install it."""
    mod = sys.modules.get("sim._hugepages")
    if mod is None:
        return None
    st = dict(mod.stats())
    st["malloc_hugetlb"] = MALLOC_HUGETLB in os.environ.get("GLIBC_TUNABLES", "")
    return st if st["installed"] else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.accel",
                                description="Build or check the optional mypyc-compiled simulator.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser("build", help="copy the sources and compile MODULES with mypyc")
    b.add_argument("--dir", default=None, help="build directory (default build/accel)")
    b.add_argument("--modules", default=None,
                   help="comma-separated module paths (default: " + ",".join(MODULES) + ")")
    c = sub.add_parser("check", help="is the build present and fresh? (exit 0 yes, 1 no)")
    c.add_argument("--dir", default=None, help="build directory (default build/accel)")
    args = p.parse_args(argv)
    if args.command == "build":
        mods = tuple(m.strip() for m in args.modules.split(",") if m.strip()) if args.modules else MODULES
        try:
            build(args.dir, mods)
        except (RuntimeError, ValueError, OSError) as exc:
            print(f"sim.accel: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "check":
        bdir = build_dir_of(None, args.dir or None)
        reason = stale_reason(repo_root(), bdir)
        if reason is None:
            m = _read_manifest(bdir)
            print(f"fresh: {bdir} ({', '.join(m['modules'])}; mypy {m.get('mypy')})")
            return 0
        print(f"stale: {reason}; run: python -m sim.accel build" + (f" --dir {args.dir}" if args.dir else ""))
        return 1
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
