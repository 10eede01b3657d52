"""Table tests of the Lifeguard suspicion timeout (memberlist suspicion_test.go)."""
import math

import pytest

from gossip.config import Config
from gossip.suspicion import Suspicion, remaining_suspicion_time


# (confirmations n, k, elapsed_s, min_s, max_s, expected remaining_s): the
# memberlist TestSuspicion_remainingSuspicionTime table.
TABLE = [
    (0, 3, 0.0, 2.0, 30.0, 30.0),
    (1, 3, 2.0, 2.0, 30.0, 14.0),
    (2, 3, 3.0, 2.0, 30.0, 4.81),
    (3, 3, 4.0, 2.0, 30.0, -2.0),
    (4, 3, 5.0, 2.0, 30.0, -3.0),
    (5, 3, 10.0, 2.0, 30.0, -8.0),
]


@pytest.mark.parametrize("n,k,elapsed,lo,hi,expected", TABLE)
def test_remaining_suspicion_time_table(n, k, elapsed, lo, hi, expected):
    assert remaining_suspicion_time(n, k, elapsed, lo, hi) == pytest.approx(expected, abs=1e-9)


def test_k_zero_means_minimum():
    assert remaining_suspicion_time(0, 0, 1.0, 2.0, 30.0) == pytest.approx(1.0)


def test_suspicion_confirmations_shrink_deadline():
    # memberlist TestSuspicion_Timer shape: k=3, min 2 s, max 30 s
    s = Suspicion("accuser", 100.0, 3, 2.0, 30.0)
    assert s.deadline() == pytest.approx(130.0)
    assert not s.confirm("accuser")          # the accuser is not a confirmation
    assert s.confirm("b")
    assert not s.confirm("b")                # not independent
    assert s.deadline() == pytest.approx(116.0)
    assert s.confirm("c")
    assert s.deadline() == pytest.approx(107.81)
    assert s.confirm("d")
    assert s.deadline() == pytest.approx(102.0)
    assert not s.confirm("e")                # k reached: ignored
    assert s.confirmations == 3


def test_deadline_monotone_non_increasing():
    s = Suspicion("a", 0.0, 5, 1.0, 6.0)
    last = s.deadline()
    for i in range(10):
        s.confirm(f"x{i}")
        assert s.deadline() <= last
        assert s.deadline() >= 1.0
        last = s.deadline()


@pytest.mark.parametrize("n,expected_min", [(1, 4.0), (5, 4.0), (10, 4.0), (100, 8.0), (1000, 12.0)])
def test_config_suspicion_bounds(n, expected_min):
    cfg = Config.lan()
    assert cfg.suspicion_min_s(n) == pytest.approx(expected_min)
    assert cfg.suspicion_max_s(n) == pytest.approx(6 * expected_min)


@pytest.mark.parametrize("n,k", [(1, 0), (3, 0), (4, 2), (100, 2)])
def test_config_suspicion_k(n, k):
    assert Config.lan().suspicion_k(n) == k


@pytest.mark.parametrize("n,limit", [(1, 4), (9, 4), (10, 8), (99, 8), (100, 12), (1000, 16)])
def test_retransmit_limit(n, limit):
    assert Config.lan().retransmit_limit(n) == limit


@pytest.mark.parametrize("n,mult", [(1, 1), (32, 1), (33, 2), (64, 2), (65, 3), (128, 3), (1000, 6)])
def test_push_pull_scale(n, mult):
    # memberlist TestPushPullScale: double per doubling beyond 32
    assert Config.lan().push_pull_interval_for(n) == pytest.approx(30.0 * mult)


def test_profiles_and_replace():
    lan = Config.lan()
    assert (lan.probe_interval_s, lan.probe_timeout_s, lan.indirect_checks) == (1.0, 0.5, 3)
    assert (lan.suspicion_mult, lan.suspicion_max_timeout_mult, lan.retransmit_mult) == (4, 6, 4)
    assert (lan.gossip_interval_s, lan.gossip_nodes, lan.push_pull_interval_s) == (0.2, 3, 30.0)
    assert lan.awareness_max_multiplier == 8
    assert lan.payload_budget_bytes == 1400 - 96
    loc = Config.local()
    assert loc.probe_interval_s == 0.2 and loc.suspicion_mult == 3
    assert lan.replace(probe_interval_s=2.0).probe_interval_s == 2.0
    with pytest.raises(ValueError):
        lan.replace(probe_interval_s=0)
    with pytest.raises(ValueError):
        lan.replace(packet_budget_bytes=200)
    assert math.isclose(loc.suspicion_min_s(5), 0.6)
