"""``peersim run --plot FILE.png`` (sim/plot.py): a small run writes a PNG,
the run is the same with or without the plot (same trace_hash), and a
missing matplotlib is a clear error naming the ``plot`` extra."""
from __future__ import annotations

import json
import sys

import pytest

from sim import cli, plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(tmp_path, name: str, *extra: str) -> tuple[int, dict]:
    out = tmp_path / f"{name}.json"
    rc = cli.main(["run", "--nodes", "6", "--duration", "30", "--seed", "5", "--profile", "local",
                   "--quiet", "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_plot_writes_a_png_and_leaves_the_run_unchanged(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[plot]')")
    png = tmp_path / "crash.png"
    rc, with_plot = run(tmp_path, "a", "--scenario", "crash", "--plot", str(png))
    assert rc == 0
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    rc, without = run(tmp_path, "b", "--scenario", "crash")
    assert rc == 0
    assert with_plot["trace_hash"] == without["trace_hash"], "seed 5: --plot changed the run"


def test_plot_of_a_task_run_counts_the_slots_of_the_report(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[plot]')")
    from gossip.config import Config
    from sim.app_run import app_report, build_app_cluster
    from sim.cluster import ClusterOptions, node_names
    from sim.loop import child_rng
    from sim.scenarios import build

    seed, n, duration = 7, 5, 30.0
    schedule = build("crash", node_names(n), duration, child_rng(seed, "scenario"))
    cluster = build_app_cluster(Config.local(), ClusterOptions(nodes=n, seed=seed), schedule,
                                duration_s=duration, tasks=3, catchup_margin_s=7.5, start_s=7.5)
    rec = plot.Recorder(cluster, duration, samples=50)
    report = cluster.run(duration)
    rec.finish()
    app_report(cluster, report)
    slots = rec.slots()
    assert len(rec.t) == 50 and rec.t[-1] == pytest.approx(duration)
    assert len(slots["fired"]) == report["slots_fired"], f"seed {seed}"
    assert len(slots["missed"]) == report["missed_slots"], f"seed {seed}"
    assert len(slots["duplicate"]) == report["duplicate_fires"], f"seed {seed}"
    # every running node sees itself and the others alive at the end
    alive_min, _, _ = rec.series[plot.ALIVE]
    assert alive_min[-1] == report["nodes_running_at_end"], f"seed {seed}"
    png = tmp_path / "tasks.png"
    plot.write_plot(str(png), rec, {**report, "scenario": "crash", "profile": "local"})
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot.require_matplotlib() == plot.MISSING_MATPLOTLIB
    png = tmp_path / "x.png"
    rc = cli.main(["run", "--nodes", "3", "--duration", "5", "--seed", "1", "--plot", str(png)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "peerd[plot]" in err and "matplotlib" in err
    assert not png.exists()
