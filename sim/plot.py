"""Pictures of one simulated run: ``peersim run ... --plot FILE.png``.

One PNG, over virtual time:

1. **Membership as each node sees it.** For every running node (observer),
   how many members it holds alive, suspect, and dead or left (itself
   counted alive); across observers the median as a line and the min-max as
   a band (the coverage band: a wide band means the nodes disagree). The
   dotted line is the truth: processes running.
2. **The fault schedule** as shaded spans on every time axis: partitions
   and loss (until the next ``heal``), pauses (their length), blocked links;
   crashes, leaves and restarts as vertical lines; the start of the
   liveness phase (``heal`` at 80 %) dashed.
3. **Distributions**: detection latency (crash to each observer's DEAD, and
   to its first SUSPECT) and dissemination rounds of the injected updates,
   as histograms, with the same definitions as ``sim/metrics.py``.
4. With ``--tasks N``: due slots fired, missed and fired more than once
   (duplicates, owner-loss reruns after a crash not counted, as in
   ``sim/app.py``'s ``fire_metrics``), per time bin.

Rules:

* **Read-only.** :class:`Recorder` wraps the cluster's ``Metrics`` hooks
  (``node_up``, ``node_down``, ``member_event``: the calls the simulator
  already makes for the report) on the instance and forwards every call
  unchanged; it draws no random number and adds no event, so the run and
  its ``trace_hash`` are the same with or without ``--plot``.
* **Bounded.** The membership series is sampled at ``samples`` points (400),
  each sample costing one pass over the running observers' counters.
* matplotlib is optional (extra ``plot``); :func:`require_matplotlib` names
  the extra when it is missing. No pyplot global state: one ``Figure``
  rendered by the Agg canvas.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["Recorder", "require_matplotlib", "write_plot", "MISSING_MATPLOTLIB"]

MISSING_MATPLOTLIB = ("--plot needs matplotlib, which is not installed: "
                      "pip install 'peerd[plot]' (or pip install matplotlib)")

ALIVE, SUSPECT, GONE = 0, 1, 2
CATEGORIES = (("alive", "#1e7d3a"), ("suspect", "#d08a00"), ("dead or left", "#b3261e"))


def require_matplotlib() -> str | None:
    """None when matplotlib imports, else the error message naming the extra."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return MISSING_MATPLOTLIB
    return None


class Recorder:
    """Membership views over virtual time, read from a ``sim.cluster.Cluster``.

    Create it after the cluster and before ``cluster.run``; call
    :meth:`finish` after the run.

    Args:
        cluster: the cluster (its ``metrics`` hooks are wrapped).
        duration_s: the run's virtual length.
        samples: points of the membership series.
    """

    def __init__(self, cluster: Any, duration_s: float, *, samples: int = 400) -> None:
        self.cluster = cluster
        self.duration_s = float(duration_s)
        self.samples = max(2, int(samples))
        self.step_s = self.duration_s / (self.samples - 1)
        self._next = 0  # index of the next sample to take
        self.view: dict[str, dict[str, int]] = {}
        self.counts: dict[str, list[int]] = {}
        self.t: list[float] = []
        # per category: (min, median, max) lists
        self.series: list[tuple[list[float], list[float], list[float]]] = [([], [], []) for _ in CATEGORIES]
        self.observers: list[int] = []
        # per category: the lowest and highest count any node had since the last sample
        self._lo = [math.inf] * len(CATEGORIES)
        self._hi = [-math.inf] * len(CATEGORIES)
        self.running: list[int] = []
        m = cluster.metrics
        self._metrics = m
        orig_up, orig_down, orig_event = m.node_up, m.node_down, m.member_event

        def node_up(name, t_s, _orig=orig_up):
            self._advance(t_s)
            self.view[name] = {}
            self.counts[name] = [1, 0, 0]
            return _orig(name, t_s)

        def node_down(name, t_s, *, crashed, _orig=orig_down):
            self._advance(t_s)
            self.view.pop(name, None)
            self.counts.pop(name, None)
            return _orig(name, t_s, crashed=crashed)

        def member_event(observer, target, in_view, is_dead, is_suspect, t_s, tags=None, _orig=orig_event):
            self._advance(t_s)
            self._note(observer, target, in_view, is_suspect)
            return _orig(observer, target, in_view, is_dead, is_suspect, t_s, tags)

        m.node_up = node_up
        m.node_down = node_down
        m.member_event = member_event

    def _note(self, observer: str, target: str, in_view: bool, is_suspect: bool) -> None:
        if target == observer:
            return
        view = self.view.get(observer)
        if view is None:
            return
        code = SUSPECT if is_suspect else (ALIVE if in_view else GONE)
        counts = self.counts[observer]
        old = view.get(target)
        if old == code:
            return
        if old is not None:
            counts[old] -= 1
        counts[code] += 1
        view[target] = code
        # the band covers every value between two samples, not only the
        # values at the sample times (a suspicion refuted within 0.2 s shows)
        lo, hi = self._lo, self._hi
        for c in (code, old) if old is not None else (code,):
            v = counts[c]
            if v < lo[c]:
                lo[c] = v
            if v > hi[c]:
                hi[c] = v

    def _advance(self, t_s: float) -> None:
        """Take every sample whose time is before ``t_s`` (the state has
        been constant since the last event)."""
        while self._next < self.samples and self._next * self.step_s < t_s:
            self._sample(self._next * self.step_s)
            self._next += 1

    def _fold(self) -> None:
        """Widen the last sample's band by what happened since it."""
        if self.t:
            for i, (lo, _, hi) in enumerate(self.series):
                a, b = self._lo[i], self._hi[i]
                if a != math.inf:
                    lo[-1] = a if lo[-1] != lo[-1] else min(lo[-1], a)
                if b != -math.inf:
                    hi[-1] = b if hi[-1] != hi[-1] else max(hi[-1], b)
        self._lo = [math.inf] * len(CATEGORIES)
        self._hi = [-math.inf] * len(CATEGORIES)

    def _sample(self, at_s: float) -> None:
        self._fold()
        self.t.append(at_s)
        rows = list(self.counts.values())
        self.observers.append(len(rows))
        self.running.append(len(self._metrics.running))
        for i, (lo, med, hi) in enumerate(self.series):
            if rows:
                vals = sorted(r[i] for r in rows)
                lo.append(vals[0])
                med.append(statistics.median(vals))
                hi.append(vals[-1])
            else:
                lo.append(math.nan)
                med.append(math.nan)
                hi.append(math.nan)

    def finish(self) -> None:
        """Take the samples up to the end of the run."""
        self._advance(self.duration_s + self.step_s)
        self._fold()

    # -- figures the report summarises, per value ---------------------------------------------

    def detection(self) -> tuple[list[float], list[float]]:
        """(crash -> DEAD, crash -> first SUSPECT) per observer, seconds
        (the pairs ``sim/metrics.py`` counts)."""
        m = self._metrics
        det, sus = [], []
        for rec in m.crashes:
            for obs in sorted(rec.observers):
                if obs not in m.running or m.started_at.get(obs, 0.0) > rec.t_s:
                    continue
                if obs in rec.dead_at:
                    det.append(rec.dead_at[obs] - rec.t_s)
                if obs in rec.suspect_at:
                    sus.append(rec.suspect_at[obs] - rec.t_s)
        return det, sus

    def dissemination(self) -> list[float]:
        """Rounds until the last eligible node had each injected update."""
        m = self._metrics
        rounds = []
        for uid in sorted(m.updates):
            upd = m.updates[uid]
            eligible = [n for n in sorted(m.running) if n != upd.origin and m.started_at.get(n, 0.0) <= upd.t_s]
            got = [upd.received.get(n) for n in eligible]
            if eligible and all(x is not None for x in got):
                rounds.append((max(got) - upd.t_s) / m.gossip_interval_s)
        return rounds

    def slots(self) -> dict | None:
        """Per due slot of an app run (``--tasks``): virtual time and outcome
        (``fired``, ``missed``), plus duplicate fires by virtual time; None
        for a membership-only run."""
        c = self.cluster
        if not hasattr(c, "ledger") or not hasattr(c, "tasks_applied"):
            return None
        from sim.app import EPOCH_BASE
        from sim.app_run import _every_s

        start_s, end_s = c.window_s
        crashed_at = getattr(getattr(c, "downs", None), "down", {}) or {}
        due = set()
        for d in c.tasks_applied:
            step = _every_s(d["schedule"])
            if step is None:
                continue
            s = math.ceil((EPOCH_BASE + start_s) / step) * step
            while s <= EPOCH_BASE + end_s:
                due.add((d["id"], int(s)))
                s += step
        by_slot: dict[tuple[str, int], list[tuple]] = {}
        for rec in c.ledger:
            by_slot.setdefault((rec[0], rec[1]), []).append(rec)
        fired_t, missed_t, dup_t = [], [], []
        for key in sorted(due):
            (fired_t if key in by_slot else missed_t).append(key[1] - EPOCH_BASE)
        for key in sorted(by_slot):
            if key[1] < EPOCH_BASE + start_s:
                continue
            fires = by_slot[key]
            for i, rec in enumerate(fires[1:], 1):
                rerun = rec[6] == "rerun_owner_loss" and all(
                    crashed_at.get((e[2], e[3]), math.inf) <= rec[4] for e in fires[:i])
                if not rerun:
                    dup_t.append(key[1] - EPOCH_BASE)
        return {"fired": fired_t, "missed": missed_t, "duplicate": dup_t, "window": (start_s, end_s)}


# -- drawing -------------------------------------------------------------------------------------

def _fault_spans(schedule, duration_s: float) -> tuple[list[tuple], list[tuple]]:
    """(spans, lines): spans ``(from, to, label, colour)``, lines ``(t, label, colour, style)``."""
    spans, lines = [], []
    faults = sorted(schedule)
    heals = [f.at_s for f in faults if f.kind == "heal"]

    def until_heal(t: float) -> float:
        return min([h for h in heals if h > t] or [duration_s])

    for f in faults:
        if f.at_s > duration_s:
            continue
        if f.kind == "partition":
            spans.append((f.at_s, until_heal(f.at_s), "partition", "#7a5cc4"))
        elif f.kind == "loss":
            spans.append((f.at_s, until_heal(f.at_s), f"loss p={f.args[0]:g}", "#8c8c8c"))
        elif f.kind == "block":
            spans.append((f.at_s, until_heal(f.at_s), "blocked link", "#5c8cc4"))
        elif f.kind == "pause":
            spans.append((f.at_s, min(duration_s, f.at_s + f.args[0]), "pause", "#d08a00"))
        elif f.kind == "crash":
            lines.append((f.at_s, "crash", "#b3261e", "-"))
        elif f.kind == "leave":
            lines.append((f.at_s, "leave", "#6b6b6b", "-"))
        elif f.kind == "restart":
            lines.append((f.at_s, "restart", "#1e7d3a", "-"))
        elif f.kind == "heal":
            lines.append((f.at_s, "heal", "#333333", "--"))
    return spans, lines


def _shade(ax, spans, lines, *, legend: bool) -> None:
    seen = set()
    for a, b, label, colour in spans:
        ax.axvspan(a, b, color=colour, alpha=0.13, lw=0,
                   label=label if legend and label not in seen else None)
        seen.add(label)
    for t, label, colour, style in lines:
        ax.axvline(t, color=colour, lw=0.8, ls=style, alpha=0.7,
                   label=label if legend and label not in seen else None)
        seen.add(label)


def _hist(ax, series: list[tuple[list[float], str, str]], xlabel: str, title: str) -> None:
    data = [(v, lab, col) for v, lab, col in series if v]
    if not data:
        ax.text(0.5, 0.5, "none in this run", ha="center", va="center", transform=ax.transAxes, color="#666")
    else:
        hi = max(max(v) for v, _, _ in data)
        lo = min(min(v) for v, _, _ in data)
        bins = 30 if hi > lo else 1
        for v, lab, col in data:
            s = sorted(v)
            p50 = s[max(0, math.ceil(0.5 * len(s)) - 1)]
            p99 = s[max(0, math.ceil(0.99 * len(s)) - 1)]
            ax.hist(v, bins=bins, range=(lo, hi if hi > lo else lo + 1), color=col, alpha=0.6,
                    label=f"{lab}: n={len(v)}, p50 {p50:.3g}, p99 {p99:.3g}, max {s[-1]:.3g}")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def write_plot(path: str, rec: Recorder, report: dict) -> None:
    """Draw the run into ``path`` (PNG).

    Raises:
        ImportError: matplotlib is missing (see :func:`require_matplotlib`).
        OSError: the file cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    slots = rec.slots()
    duration_s = rec.duration_s
    spans, lines = _fault_spans(rec.cluster.schedule, duration_s)
    rows = 4 if slots else 3
    fig = Figure(figsize=(11, 2.6 * rows + 0.6), dpi=80)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(rows, 2, height_ratios=[1.2, 0.8] + [1] * (rows - 2), hspace=0.55, wspace=0.18)

    ax = fig.add_subplot(gs[0, :])
    ax2 = fig.add_subplot(gs[1, :], sharex=ax)
    _shade(ax, spans, lines, legend=True)
    _shade(ax2, spans, lines, legend=False)
    for i, (name, colour) in enumerate(CATEGORIES):
        lo, med, hi = rec.series[i]
        a = ax if i == ALIVE else ax2
        a.fill_between(rec.t, lo, hi, color=colour, alpha=0.3, lw=0, step="post")
        a.step(rec.t, med, where="post", color=colour, lw=1.4, label=name)
    ax.step(rec.t, rec.running, where="post", color="#222", lw=0.9, ls=":", label="running (truth)")
    ax.set_title("members each running node holds alive (line: median over the nodes; band: lowest to "
                 "highest count any node had)", fontsize=9)
    ax2.set_title("members each node holds suspect, and dead or left (same reading)", fontsize=9)
    for a in (ax, ax2):
        a.set_xlim(0, duration_s)
        a.set_ylim(bottom=0)
        a.set_ylabel("members", fontsize=8)
        a.tick_params(labelsize=7)
        a.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax2.set_xlabel("virtual time (s)", fontsize=8)

    det, sus = rec.detection()
    _hist(fig.add_subplot(gs[2, 0]), [(sus, "first SUSPECT", "#d08a00"), (det, "DEAD", "#b3261e")],
          "seconds after the crash", "failure detection (per observer)")
    _hist(fig.add_subplot(gs[2, 1]), [(rec.dissemination(), "updates", "#2458a6")],
          "gossip rounds until every node had it", "dissemination")

    if slots:
        ax3 = fig.add_subplot(gs[3, :], sharex=ax)
        _shade(ax3, spans, lines, legend=False)
        a, b = slots["window"]
        width = max(1.0, (b - a) / 120.0)
        edges = [a + i * width for i in range(int(math.ceil((b - a) / width)) + 1)]
        for key, colour, label in (("fired", "#1e7d3a", "fired"), ("missed", "#b3261e", "missed"),
                                   ("duplicate", "#d08a00", "duplicate fires")):
            v = slots[key]
            ax3.hist(v, bins=edges, histtype="step" if key == "fired" else "stepfilled",
                     color=colour, alpha=0.9 if key == "fired" else 0.6, lw=1.2,
                     label=f"{label}: {len(v)}")
        ax3.axvspan(0, a, color="#000", alpha=0.04, lw=0)
        ax3.axvspan(b, duration_s, color="#000", alpha=0.04, lw=0)
        ax3.set_xlim(0, duration_s)
        ax3.set_ylabel(f"slots per {width:g} s", fontsize=8)
        ax3.set_xlabel("virtual time of the slot (s); grey: outside the counted window", fontsize=8)
        ax3.set_title("task slots (--tasks)", fontsize=9)
        ax3.tick_params(labelsize=7)
        ax3.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)

    d = report.get("detection_latency_s") or {}
    conv = report.get("convergence_s")
    fig.suptitle(
        f"peersim run --nodes {report.get('nodes')} --duration {duration_s:g} --seed {report.get('seed')} "
        f"--scenario {report.get('scenario')} --profile {report.get('profile')}"
        + (f"  (trace {str(report.get('trace_hash'))[:12]})" if report.get("trace_hash") else "")
        + f"\nconverged {report.get('converged')}"
        + (f" {conv:.2f} s after the last fault" if isinstance(conv, (int, float)) else "")
        + f", false positives {report.get('false_positives')}, detection p50 {_num(d.get('p50'))} s "
          f"p99 {_num(d.get('p99'))} s"
        + (f", slots due {report.get('slots_due')} missed {report.get('missed_slots')} "
           f"duplicate {report.get('duplicate_fires')}" if slots else ""),
        fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.82, top=1 - 0.95 / (2.6 * rows + 0.6), bottom=0.06)
    fig.savefig(path, format="png")
