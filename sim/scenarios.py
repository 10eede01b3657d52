"""Fault schedules by name: ``steady``, ``crash``, ``partition``, ``flaky``,
``pause``, ``churn``.

A schedule is a plain, sorted list of :class:`Fault` values with virtual
times; ``sim/cluster.py`` applies them. Each scenario is a function
``(names, duration_s, rng, *, loss=...) -> list[Fault]`` so tests compose
their own schedules (concatenate, shift, or write faults by hand).

Phases (after VOPR's safety then liveness modes): faults happen during the
first ``FAULT_PHASE_END`` (80 %) of a run; at that point every scenario emits
``heal`` (partitions, blocked links and loss removed) and nothing new fails,
so the last 20 % is a liveness phase at whose end the checkers require
converged views. Crashed nodes stay crashed: converged means the live nodes
agree that they are gone.

All choices draw from ``rng`` over *sorted* names, so a schedule is a pure
function of (names, duration, seed).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = [
    "Fault", "FAULT_KINDS", "FAULT_PHASE_END", "SCENARIOS", "build",
    "steady", "crash", "partition", "flaky", "pause", "churn", "heal_at",
]

# What a fault does (``node``/``args`` per kind):
FAULT_KINDS = (
    "crash",      # node: process dies, state gone, datagrams to it dropped
    "restart",    # node: new core (incarnation 0), greater sealer epoch, rejoin via seeds
    "leave",      # node: graceful leave (core.leave), then the process stops
    "pause",      # node, args=(duration_s,): handles nothing, then catches up
    "partition",  # args=(groups,): tuple of tuples of names; others form one more group
    "heal",       # remove partitions, blocked links, per-link and global loss
    "loss",       # args=(probability,): loss on every link from now on
    "block",      # node=src, args=(dst,): dst stops hearing src (asymmetric)
    "unblock",    # node=src, args=(dst,)
    "drift",      # node, args=(rate,): node clock runs at `rate` x virtual time
)

FAULT_PHASE_END = 0.8


@dataclass(frozen=True, slots=True, order=True)
class Fault:
    """One scheduled fault. Sorted by time, then by kind order, then node."""

    at_s: float
    kind: str = field(compare=False)
    node: str | None = field(default=None, compare=False)
    args: tuple = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")
        if self.at_s < 0:
            raise ValueError(f"fault time must be >= 0, got {self.at_s}")


def heal_at(duration_s: float) -> float:
    """Start of the liveness phase."""
    return FAULT_PHASE_END * duration_s


def _loss_faults(duration_s: float, loss: float) -> list[Fault]:
    if not loss:
        return []
    return [Fault(0.0, "loss", args=(loss,))]


def _end(duration_s: float) -> list[Fault]:
    return [Fault(heal_at(duration_s), "heal")]


def _pick(names: list[str], rng: random.Random, fraction: float) -> list[str]:
    k = max(1, round(fraction * len(names)))
    return sorted(rng.sample(sorted(names), min(k, len(names))))


def steady(names: list[str], duration_s: float, rng: random.Random, *, loss: float = 0.0) -> list[Fault]:
    """No faults (``--loss`` still applies until the liveness phase)."""
    return _loss_faults(duration_s, loss) + _end(duration_s)


def crash(names: list[str], duration_s: float, rng: random.Random, *, loss: float = 0.0,
          fraction: float = 0.1) -> list[Fault]:
    """``fraction`` (10 %) of the nodes crash together at one third of the run."""
    at_s = duration_s / 3.0
    faults = [Fault(at_s, "crash", n) for n in _pick(names, rng, fraction)]
    return _loss_faults(duration_s, loss) + faults + _end(duration_s)


def partition(names: list[str], duration_s: float, rng: random.Random, *, loss: float = 0.0) -> list[Fault]:
    """Two random halves cannot talk from 1/3 to 2/3 of the run, then heal."""
    shuffled = sorted(names)
    rng.shuffle(shuffled)
    half = len(shuffled) // 2
    groups = (tuple(sorted(shuffled[:half])), tuple(sorted(shuffled[half:])))
    return _loss_faults(duration_s, loss) + [
        Fault(duration_s / 3.0, "partition", args=(groups,)),
        Fault(2.0 * duration_s / 3.0, "heal"),
    ] + _end(duration_s)


def flaky(names: list[str], duration_s: float, rng: random.Random, *, loss: float = 0.05) -> list[Fault]:
    """Loss ``loss`` (default 5 %) on every link until the liveness phase."""
    return _loss_faults(duration_s, loss or 0.05) + _end(duration_s)


def pause(names: list[str], duration_s: float, rng: random.Random, *, loss: float = 0.0,
          fraction: float = 0.1, pause_min_s: float = 1.5, pause_max_s: float = 3.0) -> list[Fault]:
    """``fraction`` of the nodes each stall once for 1.5-3 s at a random time
    in the fault phase (the Lifeguard case: a slow node must not accuse
    healthy ones when it wakes up)."""
    lo = duration_s / 6.0
    hi = max(lo, heal_at(duration_s) - pause_max_s)
    faults = []
    for n in _pick(names, rng, fraction):
        faults.append(Fault(rng.uniform(lo, hi), "pause", n, (rng.uniform(pause_min_s, pause_max_s),)))
    return _loss_faults(duration_s, loss) + sorted(faults) + _end(duration_s)


def churn(names: list[str], duration_s: float, rng: random.Random, *, loss: float = 0.0,
          events: int | None = None, up_fraction_min: float = 0.7) -> list[Fault]:
    """Nodes keep leaving, crashing and coming back (restart = rejoin with a
    new process) between 1/6 and 0.7 of the run; at least
    ``up_fraction_min`` of the nodes stay up. ``events`` defaults to
    ``max(4, N // 2)``. Seeds (the first three names) take part too."""
    names = sorted(names)
    n_events = events if events is not None else max(4, len(names) // 2)
    lo, hi = duration_s / 6.0, 0.7 * duration_s
    step = (hi - lo) / max(1, n_events)
    up = set(names)
    down: list[str] = []
    faults = []
    for i in range(n_events):
        at_s = lo + i * step + rng.uniform(0.0, step * 0.5)
        can_fail = len(up) - 1 >= up_fraction_min * len(names)
        if down and (not can_fail or rng.random() < 0.4):
            node = down.pop(rng.randrange(len(down)))
            up.add(node)
            faults.append(Fault(at_s, "restart", node))
        elif can_fail:
            node = rng.choice(sorted(up))
            up.discard(node)
            down.append(node)
            faults.append(Fault(at_s, "leave" if rng.random() < 0.5 else "crash", node))
    return _loss_faults(duration_s, loss) + faults + _end(duration_s)


SCENARIOS = {
    "steady": steady,
    "crash": crash,
    "partition": partition,
    "flaky": flaky,
    "pause": pause,
    "churn": churn,
}


def build(name: str, names: list[str], duration_s: float, rng: random.Random, *,
          loss: float | None = None) -> list[Fault]:
    """The schedule of scenario ``name`` (sorted by time).

    Raises:
        ValueError: unknown scenario name.
    """
    try:
        fn = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}") from None
    kwargs = {} if loss is None else {"loss": loss}
    return sorted(fn(list(names), duration_s, rng, **kwargs))


# Scenarios whose runs must have no false DEAD declaration when ``--loss`` is
# 0: nothing in them drops a datagram of a running node or stalls one.
NO_FALSE_POSITIVE_SCENARIOS = ("steady", "crash", "churn")


def check_invariants(report: dict, *, scenario: str, loss: float) -> list[str]:
    """The checkers run at the end of every ``peersim run``.

    Returns:
        One line per violated invariant (empty when all hold):
        views converged after the faults stopped; with no loss and no pause
        (and no partition), no member that never failed was declared dead.
    """
    failures = []
    if not report.get("converged"):
        failures.append("views did not converge after the faults stopped: "
                        + "; ".join(report.get("disagreement") or []))
    if scenario in NO_FALSE_POSITIVE_SCENARIOS and not loss and report.get("false_positives"):
        failures.append(f"{report['false_positives']} false positive(s) with no loss and no pause: "
                        f"(t, observer, target) {report.get('false_positive_examples')}")
    return failures
