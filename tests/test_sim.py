"""Simulator tests: loop, network, determinism, every scenario at N=20, CLI.

Every run prints its replay command on failure (``_why``), so a red CI line
can be reproduced with ``peersim run ...``.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim import scenarios
from sim.cli import main as peersim_main
from sim.cluster import node_names, simulate
from sim.loop import EventLoop, Trace, child_rng, stable_seed
from sim.network import Network, NetworkOptions
from sim.scenarios import Fault, check_invariants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIRED_KEYS = (
    "seed", "nodes", "virtual_seconds", "wall_seconds", "trace_hash", "detection_latency_s",
    "false_positives", "dissemination_rounds", "msgs_per_node_per_s", "bytes_per_node_per_s",
    "converged", "convergence_s", "slots_due", "slots_fired", "duplicate_fires", "missed_slots",
)


def _why(r: dict, **kw) -> str:
    bits = " ".join(f"--{k} {v}" for k, v in kw.items())
    return (f"seed={r['seed']} replay: peersim run --nodes {r['nodes']} --duration "
            f"{r['virtual_seconds']:g} --seed {r['seed']} {bits} | report: "
            + json.dumps({k: r.get(k) for k in ("converged", "false_positives", "false_suspicions",
                                                  "detection_latency_s", "undetected", "disagreement",
                                                  "drops")}, default=str))


# -- loop and RNGs ---------------------------------------------------------------

def test_loop_pops_in_time_then_push_order_and_refuses_the_past():
    loop = EventLoop()
    loop.schedule(2.0, 1, "b")
    loop.schedule(1.0, 1, "a")
    loop.schedule(2.0, 1, "c")
    assert [loop.pop()[3] for _ in range(3)] == ["a", "b", "c"]
    assert loop.now_s == 2.0
    assert loop.pop() is None
    with pytest.raises(ValueError, match="backwards"):
        loop.schedule(1.5, 1)


def test_child_rngs_are_stable_across_processes_and_independent():
    # A literal: sha256-derived, so PYTHONHASHSEED cannot change it.
    assert stable_seed(1, "a") == 3031550534146327381
    assert child_rng(1, "a").random() == child_rng(1, "a").random()
    assert child_rng(1, "a").random() != child_rng(1, "b").random()
    assert child_rng(1, "a").random() != child_rng(2, "a").random()


def test_trace_hash_depends_on_order_and_content():
    def h(records):
        t = Trace(chunk=2)
        for r in records:
            t.append(r)
        return t.hexdigest()
    assert h([(0.1, "p", 1, 2)]) == h([(0.1, "p", 1, 2)])
    assert h([(0.1, "p", 1, 2), (0.2, "p", 2, 1)]) != h([(0.2, "p", 2, 1), (0.1, "p", 1, 2)])
    # types count: 1 is not 1.0 is not True; a float differs in its last bit
    assert len({h([(0.1, "m", v)]) for v in (1, 1.0, True, "1", None)}) == 5
    assert h([(0.1, "p", 0.3)]) != h([(0.1, "p", 0.30000000000000004)])
    assert h([(0.1, "p", 2**70)]) == h([(0.1, "p", 2**70)]) != h([(0.1, "p", 2**70 + 1)])


_atoms = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=8),
                   st.booleans(), st.none())
_records = st.lists(st.tuples(st.floats(0, 1e4, allow_nan=False), st.sampled_from("pxmu"), _atoms,
                              st.lists(_atoms, max_size=3).map(tuple)), max_size=20)


@given(_records, _records, st.integers(1, 5))
def test_trace_hash_is_a_function_of_the_records(a, b, chunk):
    def h(records):
        t = Trace(chunk=chunk)
        for r in records:
            t.append(r)
        assert t.count == 0 or t.count <= len(records)
        return t.hexdigest()
    assert h(a) == h(list(a))
    if a != b:
        assert h(a) != h(b)


# -- network ---------------------------------------------------------------------

def _net(**kw):
    loop = EventLoop()
    net = Network(4, NetworkOptions(**kw), child_rng(0, "net"), loop.heap, loop.next_seq, 0)
    return net, loop


def test_network_delivers_with_jitter_and_reorders():
    net, loop = _net(one_way_delay_min_s=0.001, one_way_delay_mean_s=0.005)
    for i in range(200):
        net.transmit(0.0 + i * 1e-4, 0, 1, bytes([i % 256]) * 10)
    got = [heapq.heappop(loop.heap) for _ in range(len(loop.heap))]
    assert len(got) == 200
    delays = [e[0] - int.from_bytes(e[5][:1], "big") * 1e-4 for e in got]
    assert all(d >= 0.001 - 1e-12 for d in delays)
    payload_order = [e[5][0] for e in got]
    assert payload_order != sorted(payload_order)  # jitter reorders
    assert net.sent_msgs[0] == 200 and net.sent_bytes[0] == 2000


def test_network_loss_partition_block_oversize_and_replay():
    net, loop = _net(packet_loss_probability=1.0)
    net.transmit(0.0, 0, 1, b"x")
    assert net.drops["loss"] == 1 and not loop.heap

    net, loop = _net(datagram_size_max_bytes=100)
    net.transmit(0.0, 0, 1, b"x" * 101)
    assert net.drops["oversize"] == 1 and not loop.heap

    net, loop = _net()
    net.partition([[0, 1], [2]])  # 3 is alone in the implicit last group
    net.transmit(0.0, 0, 1, b"ok")
    net.transmit(0.0, 0, 2, b"no")
    net.transmit(0.0, 2, 3, b"no")
    assert net.drops["partition"] == 2 and len(loop.heap) == 1
    net.heal()
    net.transmit(0.0, 0, 2, b"ok")
    assert len(loop.heap) == 2

    net, loop = _net()
    net.block(0, 1)  # 1 does not hear 0; 0 still hears 1
    net.transmit(0.0, 0, 1, b"no")
    net.transmit(0.0, 1, 0, b"ok")
    assert net.drops["blocked"] == 1 and len(loop.heap) == 1
    assert not net.stream_open(0, 1) and not net.stream_open(1, 0)

    net, loop = _net(packet_replay_probability=1.0)
    net.transmit(0.0, 0, 1, b"twice")
    assert len(loop.heap) == 2


def test_network_options_are_validated():
    with pytest.raises(ValueError):
        NetworkOptions(packet_loss_probability=1.5)
    with pytest.raises(ValueError):
        NetworkOptions(one_way_delay_min_s=0.01, one_way_delay_mean_s=0.001)


# -- determinism -----------------------------------------------------------------

def _hash_in_subprocess(seed: int, hashseed: str) -> str:
    code = ("from sim.cluster import simulate; "
            f"r, _ = simulate(nodes=12, duration_s=15, seed={seed}, scenario='churn', profile='local'); "
            "print(r['trace_hash'])")
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_same_seed_same_trace_hash_across_processes_different_seed_differs():
    a = _hash_in_subprocess(5, "1")
    b = _hash_in_subprocess(5, "2")  # str hashing differs between the processes
    c, _ = simulate(nodes=12, duration_s=15, seed=5, scenario="churn", profile="local")
    d, _ = simulate(nodes=12, duration_s=15, seed=6, scenario="churn", profile="local")
    assert a == b == c["trace_hash"], "seed=5: same seed gave different traces"
    assert d["trace_hash"] != a
    assert c["trace_records"] > 1000


# -- scenarios at N=20 -------------------------------------------------------------

SCENARIO_RUNS = [
    # (scenario, profile, duration_s)
    ("steady", "local", 40),
    ("crash", "local", 60),
    ("partition", "local", 60),
    ("flaky", "local", 60),
    ("pause", "lan", 60),
    ("churn", "local", 60),
]


@pytest.mark.parametrize("scenario,profile,duration_s", SCENARIO_RUNS)
def test_scenario_invariants_hold_at_n20(scenario, profile, duration_s):
    seed = 20
    r, cluster = simulate(nodes=20, duration_s=duration_s, seed=seed, scenario=scenario,
                          profile=profile)
    why = _why(r, scenario=scenario, profile=profile)
    loss = 0.05 if scenario == "flaky" else 0.0
    assert check_invariants(r, scenario=scenario, loss=loss) == [], why
    for k in REQUIRED_KEYS:
        assert k in r, k
    assert r["converged"] is True, why
    assert r["dissemination_updates"] >= 1, why
    assert r["msgs_per_node_per_s"] > 0.5, why
    if scenario == "crash":
        assert r["detections"] == 2 * 18, why  # 2 crashed x 18 surviving observers
        assert r["undetected"] == 0, why
        # local profile, N=20: suspicion min 0.78 s, max 4.7 s after a probe round
        assert 0.2 < r["detection_latency_s"]["max"] < 6.0, why
        assert r["nodes_running_at_end"] == 18
    if scenario == "flaky":
        assert r["drops"].get("loss", 0) > 100, why
    if scenario == "pause":
        assert r["stats"]["paused_deferred"] > 0, why
        # Lifeguard case on lan timers: a 1.5-3 s stall is shorter than the
        # suspicion timeout, so nobody is declared dead.
        assert r["false_positives"] == 0, why
    if scenario == "partition":
        assert r["drops"].get("partition", 0) > 0, why
    if scenario == "steady":
        assert r["false_suspicions"] == 0, why
        assert r["undetected"] == 0 and r["detections"] == 0


@pytest.mark.parametrize("profile,duration_s", [("lan", 120)])
def test_partition_scenario_heals_on_lan_timers(profile, duration_s):
    # 40 s apart: both halves declare each other dead; the core's reconnect
    # (Config.reconnect_interval_s, serf-style) must bring them back.
    r, _ = simulate(nodes=20, duration_s=duration_s, seed=20, scenario="partition", profile=profile)
    assert r["drops"].get("partition", 0) > 0
    assert r["false_positives"] > 0  # the halves did declare each other dead
    assert r["converged"], _why(r, scenario="partition", profile=profile)


def test_short_partition_heals_without_false_dead():
    # 3 s apart on lan timers: shorter than the suspicion timeout
    # (4 * log10(20) * 1 s = 5.2 s), so members are suspected, never dead.
    n = _names(20)
    groups = (tuple(n[:10]), tuple(n[10:]))
    sched = [Fault(10.0, "partition", args=(groups,)), Fault(13.0, "heal")]
    r, _ = simulate(nodes=20, duration_s=40, seed=21, profile="lan", schedule=sched)
    assert r["drops"].get("partition", 0) > 0, _why(r)
    assert r["false_positives"] == 0, _why(r)
    assert r["converged"], _why(r)


# -- composed fault schedules ----------------------------------------------------------

def _names(n):
    from sim.cluster import node_names
    return node_names(n)


def test_asymmetric_link_causes_no_false_dead_thanks_to_indirect_probes():
    n = _names(10)
    sched = [Fault(2.0, "block", n[3], (n[4],)), Fault(2.0, "block", n[5], (n[6],)),
             Fault(25.0, "heal")]
    r, cl = simulate(nodes=10, duration_s=30, seed=3, profile="local", schedule=sched)
    assert r["drops"].get("blocked", 0) > 10, _why(r)
    assert r["false_positives"] == 0, _why(r)
    assert r["converged"], _why(r)


def test_restart_reclaims_a_dead_member():
    n = _names(10)
    sched = [Fault(5.0, "crash", n[4]), Fault(12.0, "restart", n[4])]
    r, cl = simulate(nodes=10, duration_s=25, seed=4, profile="local", schedule=sched)
    assert r["detections"] == 9 and r["undetected"] == 0, _why(r)
    assert r["converged"] and r["nodes_running_at_end"] == 10, _why(r)
    assert cl.nodes[4].boots == 2 and cl.nodes[4].core.incarnation > 0, _why(r)


def test_clock_drift_and_duplication_keep_the_cluster_converged():
    n = _names(8)
    sched = [Fault(1.0, "drift", n[1], (1.05,)), Fault(1.0, "drift", n[2], (0.95,))]
    net = NetworkOptions(packet_replay_probability=0.2)
    r, cl = simulate(nodes=8, duration_s=20, seed=5, profile="local", schedule=sched, network=net)
    assert r["converged"] and r["false_positives"] == 0, _why(r)
    assert r["stats"]["rejected"].get("replay", 0) > 0, _why(r)  # the Sealer drops the duplicates


def test_graceful_leave_is_not_a_failure():
    n = _names(8)
    r, cl = simulate(nodes=8, duration_s=20, seed=6, profile="local",
                     schedule=[Fault(5.0, "leave", n[3])])
    assert r["converged"] and r["nodes_running_at_end"] == 7, _why(r)
    assert r["false_positives"] == 0 and r["detections"] == 0, _why(r)


def test_unknown_fault_node_and_kind_are_clear_errors():
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault(1.0, "explode")
    with pytest.raises(ValueError, match="unknown node"):
        simulate(nodes=3, duration_s=1, seed=1, schedule=[Fault(0.5, "crash", "zz")])
    with pytest.raises(ValueError, match="unknown scenario"):
        scenarios.build("nope", ["a"], 10, child_rng(0, "x"))


def test_scenario_schedules_follow_their_definitions():
    names = _names(20)
    rng = child_rng(1, "s")
    crash = scenarios.crash(names, 90, rng)
    crashes = [f for f in crash if f.kind == "crash"]
    assert len(crashes) == 2 and all(f.at_s == 30.0 for f in crashes)
    part = scenarios.partition(names, 90, rng)
    (p,) = [f for f in part if f.kind == "partition"]
    groups = p.args[0]
    assert sorted(groups[0] + groups[1]) == names and len(groups[0]) == 10
    pauses = [f for f in scenarios.pause(names, 90, rng) if f.kind == "pause"]
    assert len(pauses) == 2 and all(1.5 <= f.args[0] <= 3.0 for f in pauses)
    churn = scenarios.churn(names, 90, rng)
    assert {f.kind for f in churn} >= {"crash", "leave", "restart", "heal"}
    for sched in (crash, part, churn):
        assert max(f.at_s for f in sched) <= 0.8 * 90


# -- CLI ---------------------------------------------------------------------------------

def test_cli_run_prints_seed_first_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = peersim_main(["run", "--nodes", "8", "--duration", "15", "--seed", "9", "--scenario", "crash",
                       "--profile", "local", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert text.splitlines()[0] == "SEED=9"
    assert "replay: peersim run --nodes 8 --duration 15 --seed 9 --scenario crash" in text
    assert "detection latency" in text and "invariants: ok" in text
    r = json.loads(out.read_text())
    for k in REQUIRED_KEYS:
        assert k in r, k
    assert r["seed"] == 9 and r["nodes"] == 8 and r["slots_fired"] is None
    assert set(r["detection_latency_s"]) == {"p50", "p99", "max"}
    assert set(r["dissemination_rounds"]) == {"p50", "p99"}


def test_cli_failing_invariant_prints_replay_and_exits_nonzero(monkeypatch, capsys):
    import sim.scenarios
    monkeypatch.setattr(sim.scenarios, "check_invariants", lambda r, **kw: ["forced failure"])
    rc = peersim_main(["run", "--nodes", "4", "--duration", "3", "--seed", "77", "--profile", "local",
                       "--quiet"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "INVARIANT FAILED" in text and "forced failure" in text
    assert "SEED=77" in text
    assert "replay: peersim run --nodes 4 --duration 3 --seed 77 --scenario steady --profile local" in text


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        peersim_main(["run", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--nodes", "--duration", "--seed", "--loss", "--scenario", "--json", "--profile",
                 "churn", "partition"):
        assert word in text
    with pytest.raises(SystemExit) as e:
        peersim_main(["run", "--nodes", "0", "--duration", "5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        peersim_main(["run", "--nodes", "3", "--duration", "5", "--loss", "2"])
    assert e.value.code == 2
    assert "must be within [0, 1]" in capsys.readouterr().err


def test_warm_bootstrap_starts_converged_and_stays_deterministic():
    opts = dict(nodes=30, duration_s=20, seed=8, scenario="crash", profile="local", bootstrap="warm")
    r, cl = simulate(**opts)
    assert r["first_converged_s"] is not None and r["first_converged_s"] <= 0.2, _why(r)
    assert r["converged"] and r["undetected"] == 0 and r["detections"] == 3 * 27, _why(r)
    r2, _ = simulate(**opts)
    assert r2["trace_hash"] == r["trace_hash"]


def test_settled_bootstrap_skips_the_warm_start_broadcasts():
    base = dict(nodes=30, duration_s=20, seed=8, scenario="crash", profile="local")
    warm, _ = simulate(**base, bootstrap="warm")
    settled, cl = simulate(**base, bootstrap="settled")
    assert settled["first_converged_s"] is not None and settled["first_converged_s"] <= 0.2, _why(settled)
    assert settled["converged"] and settled["undetected"] == 0, _why(settled)
    assert settled["detections"] == 3 * 27, _why(settled)
    assert settled["trace_hash"] != warm["trace_hash"]
    assert settled["trace_hash"] == simulate(**base, bootstrap="settled")[0]["trace_hash"]
    # the warm start's re-broadcasts are what the settled start does not send
    # (N=100 x 2 s: 683 vs 2009 B per member per s at the time of writing)
    short = dict(nodes=100, duration_s=2, seed=8, scenario="steady", profile="local")
    assert (simulate(**short, bootstrap="settled")[0]["bytes_per_node_per_s"]
            < 0.5 * simulate(**short, bootstrap="warm")[0]["bytes_per_node_per_s"])
    with pytest.raises(ValueError, match="join, warm or settled"):
        simulate(nodes=3, duration_s=1, seed=1, scenario="steady", bootstrap="cold")


def test_settled_bootstrap_settles_each_core_as_soon_as_it_merged():
    """Settling each core right after its merge drops exactly the news that
    settling every core after the whole bootstrap dropped (the earlier
    code), and leaves no membership news queued anywhere."""
    from gossip.config import Config
    from sim.bootstrap import warm_bootstrap
    from sim.cluster import Cluster, ClusterOptions
    opts = ClusterOptions(nodes=40, seed=5, bootstrap="settled")
    late = Cluster(Config.local(), opts)
    assert warm_bootstrap(late, settle=False) == 0
    dropped_late = sum(n.core.settle() for n in late.nodes)
    early = Cluster(Config.local(), opts)
    dropped_early = warm_bootstrap(early, settle=True)
    assert dropped_early == dropped_late >= 40 * 39
    for n in early.nodes:
        assert not [k for k, _t in n.core._queue.pending() if k.startswith("m:")], n.name
        assert n.core.settle() == 0


def test_settled_bootstrap_holding_news_back_changes_nothing():
    """Swim.start_settle (news not even built until settle) gives the run
    that queueing every item and dropping it gives: same trace hash, same
    'settled' count; and no datagram leaves a core while it holds news."""
    from gossip.config import Config
    from gossip.effects import SendPacket
    from gossip.swim import Swim
    from sim.cluster import Cluster, ClusterOptions

    class Queueing(Swim):
        def start_settle(self):
            pass  # the earlier code: queue everything, settle() drops it

    class Watching(Swim):
        sends_while_holding = 0

        def handle_push_pull(self, src, data, now):
            reply, fx = super().handle_push_pull(src, data, now)
            self._count(fx)
            return reply, fx

        def handle_push_pull_reply(self, src, data, now):
            fx = super().handle_push_pull_reply(src, data, now)
            self._count(fx)
            return fx

        def _count(self, fx):
            if self._settling is not None:
                Watching.sends_while_holding += sum(type(e) is SendPacket for e in fx)

    schedule = scenarios.build("crash", node_names(40), 30.0, child_rng(5, "scenario"))
    opts = ClusterOptions(nodes=40, seed=5, bootstrap="settled")
    runs = [Cluster(Config.local(), opts, schedule, core_factory=f) for f in (Watching, Queueing)]
    held, queued = [cl.run(30.0)["trace_hash"] for cl in runs]
    assert held == queued, "seed=5 crash N=40 settled"
    assert Watching.sends_while_holding == 0


@pytest.mark.parametrize("scenario,bootstrap", [("crash", "join"), ("pause", "warm"), ("churn", "join")])
def test_cores_tick_only_when_due_as_in_the_udp_shell(scenario, bootstrap):
    """gossip/udp.py calls tick() only once next_deadline() has passed; a
    timer entry that fires after the deadline moved later (the probe's ack
    came before its timeout) must not tick either. tick() is not a no-op
    then: it also re-arms push-pull and reconnect rounds that next_deadline()
    leaves out (no peers yet, no dead member), so ticking early would
    replay something the real node does not do."""
    from gossip.config import Config as _Config
    from gossip.swim import Swim
    from sim.cluster import Cluster, ClusterOptions

    class DueOnly(Swim):
        early = 0

        def tick(self, now):
            if self.next_deadline() > now:
                DueOnly.early += 1
            return super().tick(now)

    early, hashes = [], []
    for skip in (True, False):
        DueOnly.early = 0
        opts = ClusterOptions(nodes=20, seed=5, bootstrap=bootstrap, clock_drift_max_ppm=500.0)
        schedule = scenarios.build(scenario, node_names(20), 40.0, child_rng(5, "scenario"))
        cl = Cluster(_Config.local(), opts, schedule, core_factory=DueOnly)
        cl.skip_idle_ticks = skip
        r = cl.run(40.0)
        early.append(DueOnly.early)
        hashes.append(r["trace_hash"])
        if skip:
            assert cl.stats["idle_ticks"] > 0
    assert early[0] == 0, f"seed=5 {scenario}: {early[0]} ticks before the deadline"
    assert early[1] > 0  # the check can fail: ticking at every wake-up is early
    assert hashes[0] != hashes[1]  # and early ticks do change the run


@pytest.mark.parametrize("scenario,bootstrap", [("crash", "join"), ("pause", "warm"), ("churn", "join")])
def test_stale_wakeups_do_not_call_into_the_core(scenario, bootstrap):
    """A stale timer entry is recognised from the deadline _arm last read
    (SimNode.want_d), without asking the core again: at N=1000 the core is
    cold in cache and a third of all timer entries are stale. So the core's
    next_deadline() is read once per _arm and once per real tick, never for
    a skipped wake-up; and the run is the one that asks the core every time."""
    from gossip.config import Config as _Config
    from gossip.swim import Swim
    from sim.cluster import Cluster, ClusterOptions

    class Counting(Swim):
        reads = 0
        ticks = 0

        def next_deadline(self):
            Counting.reads += 1
            return super().next_deadline()

        def tick(self, now):
            Counting.ticks += 1
            return super().tick(now)

    class CountingArms(Cluster):
        arms = 0

        def _arm(self, node, t_s):
            CountingArms.arms += 1
            super()._arm(node, t_s)

    class Asking(Cluster):
        def _arm(self, node, t_s):
            super()._arm(node, t_s)
            node.want_d = -math.inf  # forget it: every wake-up asks the core

    schedule = scenarios.build(scenario, node_names(20), 40.0, child_rng(5, "scenario"))
    opts = ClusterOptions(nodes=20, seed=5, bootstrap=bootstrap, clock_drift_max_ppm=500.0)
    cl = CountingArms(_Config.local(), opts, schedule, core_factory=Counting)
    r = cl.run(40.0)
    assert cl.stats["idle_ticks"] > 0
    assert Counting.ticks > 0
    # each read is _arm's or a due tick's; a skipped wake-up reads nothing
    assert Counting.reads == CountingArms.arms + Counting.ticks, f"seed=5 {scenario}"
    ref = Asking(_Config.local(), opts, schedule, core_factory=Swim)
    assert ref.run(40.0)["trace_hash"] == r["trace_hash"]
    assert ref.stats["idle_ticks"] == cl.stats["idle_ticks"]


def test_sealed_datagrams_never_repeat_a_nonce_across_restarts():
    """The simulator's nonces (boot number + counter, no RNG) are unique under
    the run's one key, also when nodes crash and restart (churn)."""
    from gossip.config import Config as _Config
    from gossip.seal import Keyring, Sealer
    from sim.cluster import Cluster, ClusterOptions

    ring = Keyring([bytes(range(32))])
    seen: list[bytes] = []

    def factory(name, epoch, nonce):
        def recording(n):
            b = nonce(n)
            seen.append(b)
            return b
        return Sealer(ring, name, epoch, nonce=recording)

    schedule = scenarios.build("churn", node_names(12), 60.0, child_rng(3, "scenario"))
    assert any(f.kind == "restart" for f in schedule)
    cl = Cluster(_Config.local(), ClusterOptions(nodes=12, seed=3), schedule, sealer_factory=factory)
    r = cl.run(60.0)
    assert r["converged"], _why(r)
    assert len(seen) > 1000 and all(len(b) == 12 for b in seen)
    assert len(set(seen)) == len(seen), "a nonce repeated (seed=3 churn)"


def test_app_hook_sees_member_events_and_ticks_on_its_own_deadline():
    """The seam where the scheduler/store cores will ride on simulated nodes."""
    from gossip.config import Config as _Config
    from sim.cluster import Cluster, ClusterOptions

    class Recorder:
        def __init__(self, node):
            self.node, self.events, self.ticks, self.next_at = node, [], [], None

        def on_member_event(self, event, now):
            self.events.append((event.kind.value, event.member.name))
            return []

        def handle_user(self, sender, data, now):
            return []

        def tick(self, now):
            self.ticks.append(now)
            self.next_at = now + 1.0
            return [("fire", self.node.name, now)]  # not a gossip effect: goes to app_effect

        def next_deadline(self):
            return self.next_at if self.next_at is not None else self.node.local(0.0)

    apps = {}

    def factory(node):
        apps[node.name] = Recorder(node)
        return [apps[node.name]]

    fired = []
    cl = Cluster(_Config.local(), ClusterOptions(nodes=4, seed=2), [Fault(2.0, "crash", "n003")],
                 app_factory=factory)
    cl.app_effect = lambda node, eff, t_s: fired.append((node.name, t_s))
    r = cl.run(6.0)
    assert r["converged"]
    rec = apps["n000"]
    assert ("join", "n001") in rec.events and ("dead", "n003") in rec.events
    assert 5 <= len(rec.ticks) <= 8  # about one per second of its own clock
    assert len([f for f in fired if f[0] == "n000"]) == len(rec.ticks)


def test_load_window_is_consistent_and_does_not_change_the_trace():
    """load_window_s measures sent msgs/bytes per running member between two
    virtual times; the window over [10, 50] is the mean of [10, 30] and
    [30, 50] (all members up in steady), and measuring changes no decision."""
    from sim.cluster import simulate
    base, _ = simulate(nodes=20, duration_s=60, seed=4, scenario="steady", profile="local")
    assert base["load_window"] is None
    rates = {}
    for w in ((10.0, 30.0), (30.0, 50.0), (10.0, 50.0)):
        r, _ = simulate(nodes=20, duration_s=60, seed=4, scenario="steady", profile="local",
                        load_window_s=w)
        assert r["trace_hash"] == base["trace_hash"], f"seed=4 window {w} changed the trace"
        lw = r["load_window"]
        assert (lw["from_s"], lw["to_s"]) == pytest.approx(w, abs=0.11)
        assert lw["msgs_per_node_per_s"] > 0
        rates[w] = lw["msgs_per_node_per_s"]
    assert rates[10.0, 50.0] == pytest.approx((rates[10.0, 30.0] + rates[30.0, 50.0]) / 2, abs=0.002)
    with pytest.raises(ValueError, match="load_window_s"):
        simulate(nodes=5, duration_s=5, seed=1, load_window_s=(3.0, 2.0))


def test_run_tunes_the_gc_and_puts_it_back(monkeypatch):
    """Cluster.run freezes the bootstrap's objects and collects young objects
    less often (sim.cluster._RunGC); afterwards, or after an error, the
    process's collector is exactly as it was, and the trace is the same."""
    import gc

    from sim import cluster as C

    before = (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count())
    seen = []
    orig = C.Metrics.check_converged

    def spy(self, t_s):
        seen.append((gc.isenabled(), gc.get_threshold()[0], gc.get_freeze_count() > 0))
        return orig(self, t_s)

    monkeypatch.setattr(C.Metrics, "check_converged", spy)
    tuned, _ = simulate(nodes=12, duration_s=5.0, seed=4, scenario="steady")
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == before
    assert seen and all(s == (before[0], C._RunGC.GEN0_THRESHOLD, True) for s in seen)
    monkeypatch.setattr(C._RunGC, "booted", lambda self: gc.enable() if self._enabled else None)
    plain, _ = simulate(nodes=12, duration_s=5.0, seed=4, scenario="steady")
    assert plain["trace_hash"] == tuned["trace_hash"]

    def boom(self, t_s):
        raise RuntimeError("boom")

    if before[2] == 0:  # a process that froze objects of its own keeps them frozen
        gc.freeze()
        try:
            frozen = gc.get_freeze_count()
            simulate(nodes=5, duration_s=2.0, seed=4, scenario="steady")
            assert gc.get_freeze_count() == frozen
        finally:
            gc.unfreeze()

    monkeypatch.setattr(C.Metrics, "check_converged", boom)
    with pytest.raises(RuntimeError):
        simulate(nodes=5, duration_s=2.0, seed=4, scenario="steady")
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == before
