"""deploy/kubernetes/*.yaml: valid against the Kubernetes schemas and
consistent with peerd's own configuration.

Schemas: the ``kubernetes-validate`` package (test extra), which ships the
JSON schemas of every Kubernetes release and validates offline, in strict
mode (unknown fields are errors). The consistency checks read the manifests
the way a node would: every ``PEERD_*`` variable is a config key and
parses, the seed name is the headless Service's, the termination grace
covers peerd's shutdown, the task ConfigMap is a valid task file.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from node.cli.settings import PARSERS
from node.tasks.files_shell import load_task_file

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
KDIR = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # oldest release we claim; the newest shipped is checked too
#: peerd's shutdown after the grace: cancel leftover runs (<= 5 s), leave
#: (<= 5 s), flush (node/shell.py Node.shutdown); the rest is margin
SHUTDOWN_AFTER_GRACE_S = 15


def manifests() -> dict[tuple[str, str], dict]:
    out = {}
    for f in sorted(KDIR.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_every_manifest_passes_the_schemas():
    files = sorted(KDIR.glob("*.yaml"))
    assert files, "no manifests in deploy/kubernetes"
    kinds = set()
    for f in files:
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            kinds.add(doc["kind"])
            for version in (K8S_VERSION, kv.latest_version()):
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as e:
                    pytest.fail(f"{f.name}: {doc['kind']}/{doc['metadata']['name']} against {version}: {e}")
    assert {"StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds


def test_the_validator_rejects_a_broken_manifest():
    """The check above can fail: a misspelt field and a wrong type are caught."""
    sts = manifests()[("StatefulSet", "peerd")]
    bad = yaml.safe_load(yaml.safe_dump(sts))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"exec": {"command": ["x"]}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(sts))
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
    listed = set(k["resources"])
    present = {f.name for f in KDIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def _container_env(sts: dict) -> dict[str, str | dict]:
    c = sts["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion, with the downward-API values faked."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


def test_environment_is_peerds_configuration():
    m = manifests()
    sts = m[("StatefulSet", "peerd")]
    env = _container_env(sts)
    fake = {"POD_NAME": "peerd-0", "POD_NAMESPACE": "prod", "POD_IP": "10.1.2.3"}
    for name, value in env.items():
        if not name.startswith("PEERD_"):
            continue
        key = name[len("PEERD_"):].lower()
        assert key in PARSERS, f"{name} is not a peerd setting"
        if isinstance(value, str):
            PARSERS[key](_expand(value, fake), name)  # raises ConfigError with the reason

    # seeds: the headless Service of the StatefulSet, by its DNS name
    svc_name = sts["spec"]["serviceName"]
    svc = m[("Service", svc_name)]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    seeds = PARSERS["seeds"](_expand(env["PEERD_SEEDS"], fake), "PEERD_SEEDS")
    assert seeds == ((f"{svc_name}.prod.svc.cluster.local", 7946),)
    assert PARSERS["advertise"](_expand(env["PEERD_ADVERTISE"], fake), "PEERD_ADVERTISE") == ("10.1.2.3", 7946)
    assert {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]} == {(7946, "UDP"), (7946, "TCP")}

    # the secret holds what the pod reads from it
    secret = m[("Secret", "peerd-secrets")]
    assert env["PEERD_API_TOKEN"]["secretKeyRef"] == {"name": "peerd-secrets", "key": "api-token"}
    assert {"gossip.key", "api-token"} <= set(secret["stringData"])


def test_termination_grace_covers_a_graceful_leave():
    sts = manifests()[("StatefulSet", "peerd")]
    grace = float(_container_env(sts)["PEERD_SHUTDOWN_GRACE_S"])
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + SHUTDOWN_AFTER_GRACE_S


def test_probes_scrape_annotations_and_budget():
    m = manifests()
    tmpl = m[("StatefulSet", "peerd")]["spec"]["template"]
    c = tmpl["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["exec"]["command"] == ["peerd-healthcheck"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
    ann = tmpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["api"]
    pdb = m[("PodDisruptionBudget", "peerd")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_task_configmap_is_a_valid_task_file(tmp_path: Path):
    cm = manifests()[("ConfigMap", "peerd-tasks")]
    f = tmp_path / "tasks.yaml"
    f.write_text(cm["data"]["tasks.yaml"])
    assert [t.id for t in load_task_file(str(f))] == ["heartbeat"]
