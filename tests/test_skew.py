"""Clock-skew estimator: table cases."""
from __future__ import annotations

import math

import pytest

from node.ownership.skew import SkewEstimator, offset_of


@pytest.mark.parametrize(
    "t0,t1,t3,offset,rtt",
    [
        (100.0, 100.05, 100.1, 0.0, 0.1),      # in sync, 100 ms RTT
        (100.0, 110.05, 100.1, 10.0, 0.1),     # peer 10 s ahead
        (100.0, 90.0, 100.0, -10.0, 0.0),      # peer 10 s behind, zero RTT
        (0.0, 1.0, 4.0, -1.0, 4.0),            # asymmetric: the estimate is the midpoint
    ],
)
def test_offset_table(t0, t1, t3, offset, rtt):
    s = offset_of(t0, t1, t3)
    assert math.isclose(s.offset_s, offset, abs_tol=1e-9)
    assert math.isclose(s.rtt_s, rtt, abs_tol=1e-9)


def test_min_rtt_sample_wins_and_window_is_bounded():
    e = SkewEstimator(window=3)
    e.observe("p", 0.0, 5.0 + 1.0, 2.0)     # rtt 2, offset 5
    e.observe("p", 10.0, 15.05, 10.1)       # rtt 0.1, offset 5.0
    e.observe("p", 20.0, 27.0, 24.0)        # rtt 4, offset 5
    assert e.offset_s("p") == pytest.approx(5.0)
    assert e.best("p").rtt_s == pytest.approx(0.1)
    for i in range(3):                      # push the good sample out of the window
        e.observe("p", 100.0 + i, 100.0 + i + 1.5, 101.0 + i)
    assert e.best("p").rtt_s == pytest.approx(1.0)
    assert e.offset_s("p") == pytest.approx(1.0)
    assert e.offset_s("unknown") is None


@pytest.mark.parametrize(
    "offset,rtt,bound,skewed",
    [
        (0.3, 0.01, 0.5, False),
        (0.6, 0.01, 0.5, True),
        (-0.6, 0.01, 0.5, True),
        (0.6, 0.4, 0.5, False),    # not certain: |0.6| - 0.2 <= 0.5
        (0.8, 0.4, 0.5, True),
    ],
)
def test_skewed_table(offset, rtt, bound, skewed):
    e = SkewEstimator()
    e.observe("p", 100.0, 100.0 + rtt / 2 + offset, 100.0 + rtt)
    e.observe("ok", 100.0, 100.0, 100.0)
    assert e.skewed(bound) == ({"p"} if skewed else set())


@pytest.mark.parametrize("sample", [(10.0, 0.0, 9.0), (0.0, 0.0, 100.0), (math.nan, 0.0, 1.0),
                                    (0.0, math.inf, 1.0), ("x", 0.0, 1.0)])
def test_bad_samples_ignored(sample):
    e = SkewEstimator(max_rtt_s=5.0)
    assert e.observe("p", *sample) is False
    assert e.offset_s("p") is None and e.ignored == 1


def test_peer_count_bounded_and_offsets_metric():
    e = SkewEstimator(max_peers=2)
    for p in ["a", "b", "c"]:
        e.observe(p, 0.0, 1.0, 0.0)
    assert sorted(e.offsets()) == ["b", "c"]
    e.forget("b")
    assert e.offsets() == {"c": 1.0}
