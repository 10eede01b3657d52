"""Measurements of a simulated run, computed from what the cores emit.

Nothing here looks inside a core: every figure comes from the effects the
cores return (member events, user messages) and from the network's counters,
compared with the ground truth the simulator knows (who really crashed, left
or stalled, and when).

Definitions
-----------
* **Views.** A node's view is the set of member names it holds as alive or
  suspect (suspect members are still members, as memberlist's ``Members()``
  lists them), plus itself. **Converged**: every running node (not leaving)
  has exactly the set of running nodes as its view. ``converged_at_s`` is
  the last time the cluster became converged; ``convergence_s`` is that time
  minus the last fault (None if not converged at the end).
* **Detection latency** of a crash of X: for each observer that was running
  at the crash and is still running at the end, the virtual time from the
  crash to the observer's DEAD event about X (first SUSPECT too).
  ``undetected`` counts observer/crash pairs that never got there (X
  restarted first, or the run ended).
* **False positives**: DEAD events about a member that was running and had
  never crashed or left before (``false_suspicions`` for SUSPECT).
  Declarations about members that were paused at some point are also
  counted separately (``false_positives_paused``).
* **Dissemination rounds**: an update is injected with
  ``core.update_local(tags={"simu": uid})`` on a random running node every
  ``update_interval_s`` (an ALIVE at a new incarnation, spread by the core's
  own infection-style gossip); a node received it when it emits an event
  about that member with ``simu >= uid``. Its rounds are (time the last eligible node
  received it - injection time) / ``gossip_interval_s``. Eligible: running
  from before the injection until the end. Updates some eligible node never
  received count as ``incomplete``. Also per crash: (last observer's DEAD -
  first observer's DEAD) / gossip_interval (``dead_dissemination_rounds``).
* **Load**: datagrams and stream segments sent, and their sealed bytes,
  per running node per virtual second, over the measurement window (from
  the first convergence to the end).
"""
from __future__ import annotations

import math

__all__ = ["Metrics", "percentile", "summary"]


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile ``p`` (0..100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: list[float]) -> dict:
    """``{p50, p99, max, n}`` of ``values`` (None when empty), rounded."""
    s = sorted(values)
    def r(x):
        return None if x is None else round(x, 6)
    return {"p50": r(percentile(s, 50)), "p99": r(percentile(s, 99)),
            "max": r(s[-1] if s else None), "n": len(s)}


# Member state codes used by the metrics (decoded from the core's enum).
IN_VIEW = 1
OUT_OF_VIEW = 0


class _Crash:
    __slots__ = ("target", "t_s", "observers", "dead_at", "suspect_at", "open")

    def __init__(self, target: str, t_s: float, observers: set[str]) -> None:
        self.target = target
        self.t_s = t_s
        self.observers = observers
        self.dead_at: dict[str, float] = {}
        self.suspect_at: dict[str, float] = {}
        self.open = True


class _Update:
    __slots__ = ("uid", "t_s", "origin", "received")

    def __init__(self, uid: int, t_s: float, origin: str) -> None:
        self.uid = uid
        self.t_s = t_s
        self.origin = origin
        self.received: dict[str, float] = {}


class Metrics:
    """Ground truth plus per-node views, fed by the cluster.

    The cluster calls ``node_up``/``node_down``/``node_paused`` on faults and
    ``member_event`` for each membership effect.
    """

    def __init__(self, gossip_interval_s: float) -> None:
        self.gossip_interval_s = gossip_interval_s
        self.running: set[str] = set()       # truth: processes up (paused included)
        self.checked: set[str] = set()       # running and not leaving
        self.views: dict[str, set[str]] = {}
        self.started_at: dict[str, float] = {}
        self.ever_down: set[str] = set()
        self.ever_paused: set[str] = set()
        self.crashes: list[_Crash] = []
        self.open_crash: dict[str, _Crash] = {}
        self.updates: dict[int, _Update] = {}
        self.updates_by_origin: dict[str, list[int]] = {}
        self.false_positives = 0
        self.false_suspicions = 0
        self.false_positives_paused = 0
        self.false_suspicions_paused = 0
        self.fp_examples: list[tuple] = []
        self.dirty = True
        self.converged = False
        self.converged_at_s: float | None = None
        self.first_converged_s: float | None = None
        self.last_fault_s = 0.0
        self.convergence_checks = 0

    # -- truth ---------------------------------------------------------------

    def node_up(self, name: str, t_s: float) -> None:
        self.running.add(name)
        self.checked.add(name)
        self.views[name] = {name}
        self.started_at[name] = t_s
        self.dirty = True

    def node_leaving(self, name: str, t_s: float) -> None:
        self.checked.discard(name)
        self.ever_down.add(name)
        self.dirty = True

    def node_down(self, name: str, t_s: float, *, crashed: bool) -> None:
        was_checked = name in self.checked
        self.running.discard(name)
        self.checked.discard(name)
        self.views.pop(name, None)
        self.ever_down.add(name)
        rec = self.open_crash.pop(name, None)
        if rec is not None:
            rec.open = False
        if crashed and was_checked:
            observers = set(self.checked)
            rec = _Crash(name, t_s, observers)
            self.crashes.append(rec)
            self.open_crash[name] = rec
        self.dirty = True

    def node_restarting(self, name: str) -> None:
        rec = self.open_crash.pop(name, None)
        if rec is not None:
            rec.open = False

    def node_paused(self, name: str) -> None:
        self.ever_paused.add(name)

    def fault(self, t_s: float) -> None:
        self.last_fault_s = t_s
        self.dirty = True

    # -- what the cores say ----------------------------------------------------

    def member_event(self, observer: str, target: str, in_view: bool, is_dead: bool,
                     is_suspect: bool, t_s: float, tags=None) -> None:
        if target == observer:
            return
        if tags and self.updates_by_origin:
            v = tags.get("simu")
            uids = self.updates_by_origin.get(target)
            if v is not None and uids:
                self._received(observer, uids, v, t_s)
        view = self.views.get(observer)
        if view is None:
            return
        if in_view:
            if target not in view:
                view.add(target)
                self.dirty = True
        elif target in view:
            view.discard(target)
            self.dirty = True
        if is_dead or is_suspect:
            rec = self.open_crash.get(target)
            if rec is not None:
                if observer in rec.observers:
                    if observer not in rec.suspect_at:
                        rec.suspect_at[observer] = t_s
                    if is_dead and observer not in rec.dead_at:
                        rec.dead_at[observer] = t_s
            elif target in self.running and target not in self.ever_down:
                if is_dead:
                    self.false_positives += 1
                    if target in self.ever_paused:
                        self.false_positives_paused += 1
                    if len(self.fp_examples) < 10:
                        self.fp_examples.append((round(t_s, 6), observer, target))
                else:
                    self.false_suspicions += 1
                    if target in self.ever_paused:
                        self.false_suspicions_paused += 1

    def update_injected(self, uid: int, origin: str, t_s: float) -> None:
        self.updates[uid] = _Update(uid, t_s, origin)
        self.updates_by_origin.setdefault(origin, []).append(uid)

    def _received(self, observer: str, uids: list[int], value: str, t_s: float) -> None:
        try:
            v = int(value)
        except ValueError:
            return
        for uid in uids:
            if uid <= v:
                rec = self.updates[uid].received
                if observer not in rec:
                    rec[observer] = t_s

    # -- convergence -------------------------------------------------------------

    def check_converged(self, t_s: float) -> bool:
        """Recompute convergence if anything changed since the last check."""
        if not self.dirty:
            return self.converged
        self.dirty = False
        self.convergence_checks += 1
        truth = self.checked
        views = self.views
        ok = bool(truth) and all(views[n] == truth for n in truth)
        if ok and not self.converged:
            self.converged_at_s = t_s
            if self.first_converged_s is None:
                self.first_converged_s = t_s
        self.converged = ok
        return ok

    def disagreement(self, limit: int = 5) -> list[str]:
        """Readable examples of views that differ from the truth."""
        out = []
        truth = self.checked
        for n in sorted(truth):
            view = self.views.get(n, set())
            if view != truth:
                missing = sorted(truth - view)
                extra = sorted(view - truth)
                out.append(f"{n}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                           f" extra {extra[:5]}{'...' if len(extra) > 5 else ''}")
                if len(out) >= limit:
                    break
        return out

    # -- results ---------------------------------------------------------------------

    def results(self, end_s: float) -> dict:
        det, sus, dead_rounds = [], [], []
        undetected = 0
        for rec in self.crashes:
            for obs in sorted(rec.observers):
                if obs not in self.running or self.started_at.get(obs, 0.0) > rec.t_s:
                    continue  # observer itself went down (or restarted) since
                if obs in rec.dead_at:
                    det.append(rec.dead_at[obs] - rec.t_s)
                else:
                    undetected += 1
                if obs in rec.suspect_at:
                    sus.append(rec.suspect_at[obs] - rec.t_s)
            if len(rec.dead_at) >= 2:
                times = sorted(rec.dead_at.values())
                dead_rounds.append((times[-1] - times[0]) / self.gossip_interval_s)
        rounds, incomplete = [], 0
        for uid in sorted(self.updates):
            upd = self.updates[uid]
            eligible = [n for n in sorted(self.running)
                        if n != upd.origin and self.started_at.get(n, 0.0) <= upd.t_s]
            if not eligible:
                continue
            got: list = [upd.received.get(n) for n in eligible]
            if any(x is None for x in got):
                incomplete += 1
            else:
                rounds.append((max(got) - upd.t_s) / self.gossip_interval_s)
        d = summary(det)
        return {
            "detection_latency_s": {"p50": d["p50"], "p99": d["p99"], "max": d["max"]},
            "detections": d["n"],
            "undetected": undetected,
            "first_suspicion_s": {k: v for k, v in summary(sus).items() if k != "n"},
            "false_positives": self.false_positives,
            "false_suspicions": self.false_suspicions,
            "false_positives_paused": self.false_positives_paused,
            "false_suspicions_paused": self.false_suspicions_paused,
            "false_positive_examples": self.fp_examples,
            "dissemination_rounds": {k: v for k, v in summary(rounds).items() if k in ("p50", "p99")},
            "dissemination_updates": len(rounds),
            "dissemination_incomplete": incomplete,
            "dead_dissemination_rounds": {k: v for k, v in summary(dead_rounds).items() if k in ("p50", "p99")},
            "converged": self.converged,
            "converged_at_s": self.converged_at_s,
            "first_converged_s": self.first_converged_s,
            "last_fault_s": self.last_fault_s,
            "convergence_s": (round(max(0.0, self.converged_at_s - self.last_fault_s), 6)
                              if self.converged and self.converged_at_s is not None else None),
        }
