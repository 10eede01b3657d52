"""The optional mypyc-compiled simulator (sim/accel.py, ``peersim run --compiled``).

The build test compiles sim.accel.MODULES into a temporary directory (about
35-60 s on the 2-core machine) and checks that small runs give the same
trace_hash compiled and interpreted, each run in its own subprocess. It is
skipped when mypy (which carries mypyc) is not importable: install the
``accel`` extra. The other tests need no compiler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim import accel
from sim.cli import main as peersim_main

ROOT = Path(__file__).resolve().parent.parent

# (nodes, duration, seed, scenario, bootstrap) for the batch hash comparison
RUNS = ([(20, 60, seed, sc, "join") for sc in ("crash", "flaky") for seed in (1, 2)]
        + [(40, 30, 1, "crash", b) for b in ("warm", "settled")])

_BATCH = """\
import json, sys
import gossip.fastnew
import gossip.swim
from sim.cluster import simulate
out = {"swim_file": gossip.swim.__file__, "hashes": []}
# Member is a hand-written immutable class (fast under mypyc): same semantics
m = gossip.swim.Member("a", ("h", 1), gossip.swim.MemberState.ALIVE, 1, {}, b"", 0.0)
for op, f in (("set", lambda: setattr(m, "incarnation", 2)), ("del", lambda: delattr(m, "name")),
              ("new", lambda: setattr(m, "other", 1))):
    try:
        f()
        out[op] = "mutable"
    except Exception as exc:
        out[op] = type(exc).__name__
out["member_eq"] = m == gossip.fastnew._new_member("a", ("h", 1), gossip.swim.MemberState.ALIVE, 1, {}, b"", 0.0)
out["member_native"] = gossip.fastnew._NATIVE
for n, d, seed, sc, boot in json.loads(sys.argv[1]):
    rep, _ = simulate(nodes=n, duration_s=d, seed=seed, scenario=sc, bootstrap=boot)
    out["hashes"].append(rep["trace_hash"])
print(json.dumps(out))
"""


def _env(extra_path: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", accel.ENV_MARKER)}
    env["PYTHONPATH"] = extra_path if extra_path else str(ROOT)
    return env


def _batch(build_dir: str | None) -> dict:
    # -P: the cwd must not shadow the build on sys.path
    p = subprocess.run([sys.executable, "-P", "-c", _BATCH, json.dumps(RUNS)], cwd=ROOT,
                       env=_env(build_dir), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _cli(args: list[str], json_path: Path, build_dir: str | None = None) -> tuple[int, dict | None, str]:
    extra = ["--compiled", "--accel-dir", build_dir] if build_dir else []
    p = subprocess.run([sys.executable, "-m", "sim.cli", "run", *args, "--quiet", "--json", str(json_path),
                        *extra], cwd=ROOT, env=_env(None), capture_output=True, text=True, timeout=300)
    rep = json.loads(json_path.read_text()) if p.returncode in (0, 1) and json_path.exists() else None
    return p.returncode, rep, p.stdout + p.stderr


# -- no compiler needed --------------------------------------------------------

def test_missing_build_is_a_clear_error(tmp_path, capsys):
    rc = peersim_main(["run", "--nodes", "4", "--duration", "3", "--seed", "1", "--compiled",
                       "--accel-dir", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no build at" in err and "python -m sim.accel build --dir" in err
    assert accel.accel_path(ROOT, tmp_path / "nothing") is None


def _fake_build(tmp_path: Path) -> Path:
    """A manifest that matches the sources, with empty stand-ins for the
    extensions: enough for the freshness logic, not for running."""
    bdir = tmp_path / "accel"
    import importlib.machinery
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for mod in (*accel.MODULES, *accel.EXTENSIONS):
        p = bdir / (mod.rsplit(".", 1)[0] + suffix)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    manifest = {"format": 1, "python": accel._py_tag(), "mypy": "test", "modules": list(accel.MODULES),
                "extensions": list(accel.EXTENSIONS), "sources": accel.source_hashes(ROOT)}
    (bdir / accel.MANIFEST).write_text(json.dumps(manifest))
    return bdir


def test_freshness_follows_the_sources(tmp_path):
    bdir = _fake_build(tmp_path)
    assert accel.stale_reason(ROOT, bdir) is None
    assert accel.accel_path(ROOT, bdir) == str(bdir.resolve())
    m = json.loads((bdir / accel.MANIFEST).read_text())
    m["sources"]["gossip/swim.py"] = "0" * 64
    (bdir / accel.MANIFEST).write_text(json.dumps(m))
    reason = accel.stale_reason(ROOT, bdir)
    assert reason is not None and "gossip/swim.py" in reason
    assert accel.accel_path(ROOT, bdir) is None


def test_missing_extension_and_other_python_are_stale(tmp_path):
    bdir = _fake_build(tmp_path)
    next(bdir.joinpath("gossip").glob("wire.*")).unlink()
    assert "gossip/wire.py" in accel.stale_reason(ROOT, bdir)
    bdir = _fake_build(tmp_path / "c")
    next(bdir.joinpath("sim").glob("_hugepages.*")).unlink()
    assert "sim/_hugepages.c" in accel.stale_reason(ROOT, bdir)
    bdir = _fake_build(tmp_path / "b")
    m = json.loads((bdir / accel.MANIFEST).read_text())
    m["python"] = "cpython-00-0.0.0"
    (bdir / accel.MANIFEST).write_text(json.dumps(m))
    assert "built for Python" in accel.stale_reason(ROOT, bdir)
    (bdir / accel.MANIFEST).write_text("[1, 2]")
    assert "unreadable" in accel.stale_reason(ROOT, bdir)


def test_pure_report_says_not_compiled(tmp_path):
    rc, rep, out = _cli(["--nodes", "4", "--duration", "5", "--seed", "1"], tmp_path / "r.json")
    assert rc == 0, out
    assert rep["compiled"] is False and rep["compiled_modules"] == []
    assert rep["huge_pages"] is None


def test_c_sources_count_for_freshness(tmp_path):
    assert "sim/_hugepages.c" in accel.source_hashes(ROOT)
    bdir = _fake_build(tmp_path)
    m = json.loads((bdir / accel.MANIFEST).read_text())
    m["sources"]["sim/_hugepages.c"] = "0" * 64
    (bdir / accel.MANIFEST).write_text(json.dumps(m))
    assert "sim/_hugepages.c" in accel.stale_reason(ROOT, bdir)


# -- the real build ------------------------------------------------------------

@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    try:
        import mypy.version  # noqa: F401  (mypyc ships inside mypy)
    except ImportError:
        pytest.skip("mypy (mypyc) not importable: pip install '.[accel]' to test the compiled simulator")
    d = tmp_path_factory.mktemp("accel")
    try:
        accel.build(d, quiet=True)
    except RuntimeError as exc:
        pytest.fail(f"mypyc build failed: {exc}")
    return str(d)


def test_compiled_batch_gives_the_same_trace_hashes(build_dir):
    assert accel.stale_reason(ROOT, build_dir) is None
    compiled = _batch(build_dir)
    pure = _batch(None)
    assert compiled["swim_file"].startswith(build_dir) and compiled["swim_file"].endswith(".so"), compiled
    assert pure["swim_file"].endswith("gossip/swim.py"), pure
    for out in (compiled, pure):
        assert [out["set"], out["del"], out["new"]] == ["FrozenInstanceError"] * 3, out
        assert out["member_eq"] is True
    assert compiled["member_native"] is True and pure["member_native"] is False
    for run, h_c, h_p in zip(RUNS, compiled["hashes"], pure["hashes"]):
        assert h_c == h_p, f"trace_hash differs compiled vs interpreted for (nodes, s, seed, scenario, bootstrap)={run}"


def test_cli_compiled_app_run_matches(build_dir, tmp_path):
    args = ["--nodes", "6", "--duration", "60", "--seed", "3", "--scenario", "partition",
            "--tasks", "5", "--fencing"]
    rc_c, rep_c, out_c = _cli(args, tmp_path / "c.json", build_dir)
    rc_p, rep_p, out_p = _cli(args, tmp_path / "p.json")
    assert rc_c == rc_p == 0, (out_c, out_p)
    assert rep_c["compiled"] is True
    assert "gossip.swim" in rep_c["compiled_modules"], rep_c["compiled_modules"]
    assert sorted(m.rsplit(".", 1)[0].replace("/", ".")
                  for m in (*accel.MODULES, *accel.EXTENSIONS)) == rep_c["compiled_modules"]
    assert rep_p["compiled"] is False
    assert rep_c["trace_hash"] == rep_p["trace_hash"], "seed=3 replay: " + rep_p["replay"]
    assert rep_c["slots_fired"] == rep_p["slots_fired"]
    hp = rep_c["huge_pages"]
    if _thp_possible():
        assert hp is not None and hp["arenas_in_range"] > 0 and hp["arenas_outside"] == 0, hp
        assert hp["arena_bytes"] > 0 and hp["range_used_bytes"] >= hp["arenas_in_range"] * hp["arena_bytes"]
        assert hp["malloc_hugetlb"] is True
    # turned off: the same run, no huge-page arenas
    os.environ[accel.HUGEPAGES_ENV] = "0"
    try:
        rc_o, rep_o, out_o = _cli(args, tmp_path / "o.json", build_dir)
    finally:
        del os.environ[accel.HUGEPAGES_ENV]
    assert rc_o == 0, out_o
    assert rep_o["huge_pages"] is None and rep_o["compiled"] is True
    assert rep_o["trace_hash"] == rep_c["trace_hash"]


def _thp_possible() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


_ARENAS = """\
import json
from sim import _hugepages as h
out = {"first": h.install(), "again": h.install(), "before": h.stats()}
keep = [[i] for i in range(300_000)]          # ~ 30 MB of small objects
out["filled"] = h.stats()
del keep                                      # their arenas are freed ...
junk = [(i, i) for i in range(300_000)]       # ... and handed out again
out["refilled"] = h.stats()
out["sum"] = sum(a for a, _b in junk)
print(json.dumps(out))
"""


def test_huge_page_arenas_place_and_reuse_arenas(build_dir):
    if not _thp_possible():
        pytest.skip("transparent huge pages are off on this kernel")
    p = subprocess.run([sys.executable, "-P", "-c", _ARENAS], cwd=ROOT, env=_env(build_dir),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["first"] is True and out["again"] is False
    filled, refilled = out["filled"], out["refilled"]
    assert filled["installed"] and filled["arenas_in_range"] >= 10, out
    assert refilled["arenas_reused"] > 0, out  # freed arenas come back from the range
    assert refilled["arenas_outside"] == 0, out
    assert out["sum"] == sum(range(300_000))


def test_compiled_child_uses_the_repository_files(build_dir, capfd):
    # The child imports the build dir's copy of sim/bench.py; its results
    # file must still be the repository's (it once landed under the build dir).
    from sim.cli import _reexec_compiled
    rc = _reexec_compiled(["table"], build_dir, module="sim.bench", prog="test")
    out = capfd.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "| protocol | steady |" in out.out, out.out[-2000:]
