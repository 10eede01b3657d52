"""configs/prometheus-alerts.yml: valid rules (promtool check), each alert
fires and stays quiet when its unit test says (promtool test rules), the
scrape config loads them, and every metric a rule names is one a node
exports."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from node.observe.metrics_shell import NodeMetrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=CONFIGS, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_rules_are_valid():
    p = _promtool("check", "rules", "prometheus-alerts.yml")
    assert p.returncode == 0, p.stdout + p.stderr


@needs_promtool
def test_every_alert_fires_as_its_unit_test_says():
    p = _promtool("test", "rules", "prometheus-alerts.test.yml")
    assert p.returncode == 0, p.stdout + p.stderr


@needs_promtool
def test_scrape_config_loads_the_rules():
    p = _promtool("check", "config", "prometheus.yml")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 rule files found" in p.stdout


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load((CONFIGS / "prometheus-alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((CONFIGS / "prometheus-alerts.test.yml").read_text())
    tested = {a["alertname"] for t in tests["tests"] for a in t.get("alert_rule_test", [])
              if a.get("exp_alerts")}
    assert names - {"PeerdRunsFailing", "PeerdFiresLate"} <= tested, sorted(names - tested)


def _exported_names() -> set[str]:
    snap = {"gossip": {"members_by_state": {"alive": 3}, "rejected": {"wrong_key": 1}},
            "store": {"tasks": 1}, "skew": {"n2": 0.1}, "owned": 1}
    m = NodeMetrics(snapshot=lambda: snap)
    m.runs.labels("failed").inc()
    m.slots.labels("fired").inc()
    m.fencing_claims.labels("won").inc()
    m.api_refusals.labels("unauthorized").inc()
    m.fire_lateness.observe(0.01)
    text = m.text().decode()
    return set(re.findall(r"^# TYPE (\w+)", text, re.M)) | set(re.findall(r"^(\w+)[{ ]", text, re.M))


def test_rules_name_only_metrics_a_node_exports():
    rules = yaml.safe_load((CONFIGS / "prometheus-alerts.yml").read_text())
    exported = _exported_names()
    for g in rules["groups"]:
        for r in g["rules"]:
            for name in re.findall(r"\b(peerd_\w+)", r["expr"]):
                assert name in exported, f"{r['alert']}: {name} is not exported by a node"


def test_run_record_gauge_reads_the_stores_count():
    """peerd_store_run_records showed 0 whatever the store held: it read a
    field the store's statistics call ``runs``."""
    m = NodeMetrics(snapshot=lambda: {"store": {"runs": 42, "tasks": 3}})
    text = m.text().decode()
    assert "peerd_store_run_records 42.0" in text and "peerd_tasks 3.0" in text
