"""The day-field change as an upgrade: `explain` says when a task's slots
changed, and `peerctl tasks upgrade-check` lists the tasks of a file (or of
the cluster) that now fire on other days."""
from __future__ import annotations

import json
import random

from node.api import views
from node.core import NodeCore
from node.cli.peerctl import main as peerctl
from node.state.store import Store
from node.tasks.model import Task

NOW = 1_780_272_000.0  # 2026-06-01


def _core_with(spec: str) -> NodeCore:
    core = NodeCore("n1", Store("n1"), rng=random.Random(0))
    t = Task.from_dict({"id": "t", "schedule": spec, "command": {"type": "shell", "run": "true"}})
    core.apply_tasks([t], NOW)
    return core


def test_explain_names_the_first_date_that_differs():
    e = views.explain_json(_core_with("0 0 */2 * 1"), "t", 3, NOW)
    assert e["upgrade"] and "no longer fires on 2026-06-03" in e["upgrade"]
    assert views.explain_json(_core_with("30 2 * * *"), "t", 3, NOW)["upgrade"] is None


def test_upgrade_check_of_a_file(tmp_path, capsys):
    f = tmp_path / "tasks.yaml"
    f.write_text("tasks:\n"
                 "  - {id: odd-mondays, schedule: '0 0 */2 * 1', command: {type: shell, run: 'true'}}\n"
                 "  - {id: nightly, schedule: '30 2 * * *', command: {type: shell, run: 'true'}}\n"
                 "  - {id: first-or-2nd-friday, schedule: '0 0 1 * 5#2', command: {type: shell, run: 'true'}}\n")
    assert peerctl(["--json", "tasks", "upgrade-check", "-f", str(f)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["odd-mondays", "first-or-2nd-friday"]
    assert "refused" in rows[1]["difference"]


def test_upgrade_check_with_nothing_to_report(tmp_path, capsys):
    f = tmp_path / "tasks.yaml"
    f.write_text("tasks:\n  - {id: n, schedule: '@every 5m', command: {type: shell, run: 'true'}}\n")
    assert peerctl(["tasks", "upgrade-check", "-f", str(f)]) == 0
    assert "no task fires on other days" in capsys.readouterr().out
