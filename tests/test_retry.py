"""Backoff computation (node/run/retry.py): table tests and properties."""

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.run.retry import backoff_ceiling_s, backoff_delay_s


@pytest.mark.parametrize(
    ("attempt", "base_s", "multiplier", "max_s", "ceiling"),
    [
        (1, 1.0, 2.0, 60.0, 1.0),
        (2, 1.0, 2.0, 60.0, 2.0),
        (3, 1.0, 2.0, 60.0, 4.0),
        (7, 1.0, 2.0, 60.0, 60.0),  # 64 capped
        (10_000, 1.0, 2.0, 60.0, 60.0),  # no OverflowError
        (5, 0.5, 1.0, 60.0, 0.5),  # multiplier 1: constant
        (1, 10.0, 2.0, 3.0, 3.0),  # base above the cap
        (4, 0.0, 2.0, 3.0, 0.0),
        (4, 1.0, 3.0, 0.0, 0.0),
    ],
)
def test_ceiling_table(attempt, base_s, multiplier, max_s, ceiling):
    assert backoff_ceiling_s(attempt, base_s=base_s, multiplier=multiplier, max_s=max_s) == ceiling


def test_full_jitter_is_uniform_below_ceiling_and_seeded():
    a = [backoff_delay_s(3, base_s=1, multiplier=2, max_s=60, rng=random.Random(7), jitter="full") for _ in range(3)]
    assert a[0] == a[1] == a[2]  # same seed, same delay
    rng = random.Random(1)
    draws = [backoff_delay_s(3, base_s=1, multiplier=2, max_s=60, rng=rng, jitter="full") for _ in range(2000)]
    assert all(0 <= d <= 4.0 for d in draws)
    # full jitter spreads over the whole [0, 4] range
    assert min(draws) < 0.2 and max(draws) > 3.8
    assert 1.8 < sum(draws) / len(draws) < 2.2


def test_equal_jitter_waits_at_least_half():
    rng = random.Random(2)
    draws = [backoff_delay_s(3, base_s=1, multiplier=2, max_s=60, rng=rng, jitter="equal") for _ in range(2000)]
    assert all(2.0 <= d <= 4.0 for d in draws)
    # equal jitter is the default
    assert backoff_delay_s(3, base_s=1, multiplier=2, max_s=60, rng=random.Random(5)) == \
        backoff_delay_s(3, base_s=1, multiplier=2, max_s=60, rng=random.Random(5), jitter="equal")
    assert min(draws) < 2.2 and max(draws) > 3.8


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(attempt=0, base_s=1, multiplier=2, max_s=1),
        dict(attempt=True, base_s=1, multiplier=2, max_s=1),
        dict(attempt=1, base_s=-1, multiplier=2, max_s=1),
        dict(attempt=1, base_s=math.inf, multiplier=2, max_s=1),
        dict(attempt=1, base_s=1, multiplier=0.5, max_s=1),
        dict(attempt=1, base_s=1, multiplier=2, max_s=math.nan),
        dict(attempt=1, base_s=1, multiplier=2, max_s=1, jitter="decorrelated"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    attempt = kwargs.pop("attempt")
    with pytest.raises(ValueError):
        backoff_delay_s(attempt, rng=random.Random(0), **kwargs)


finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(
    attempt=st.integers(min_value=1, max_value=5000),
    base_s=finite,
    multiplier=st.floats(min_value=1, max_value=100, allow_nan=False),
    max_s=finite,
    seed=st.integers(min_value=0, max_value=2**32),
    jitter=st.sampled_from(["full", "equal"]),
)
def test_delay_bounds(attempt, base_s, multiplier, max_s, seed, jitter):
    ceiling = backoff_ceiling_s(attempt, base_s=base_s, multiplier=multiplier, max_s=max_s)
    d = backoff_delay_s(attempt, base_s=base_s, multiplier=multiplier, max_s=max_s,
                        rng=random.Random(seed), jitter=jitter)
    assert 0 <= d <= ceiling <= max_s
    if jitter == "equal":
        assert d >= ceiling / 2


@given(
    base_s=finite,
    multiplier=st.floats(min_value=1, max_value=100, allow_nan=False),
    max_s=finite,
)
def test_ceiling_monotone_and_capped(base_s, multiplier, max_s):
    ceilings = [backoff_ceiling_s(a, base_s=base_s, multiplier=multiplier, max_s=max_s) for a in range(1, 80)]
    assert all(x <= y for x, y in zip(ceilings, ceilings[1:]))
    assert all(c <= max_s for c in ceilings)
    assert ceilings[0] == min(base_s, max_s)
