"""The real-process chaos run's verdict: what its nodes' logs say, summaries, and which verdicts are failures (a core).

``sim/chaos_harness_shell.py`` gathers the verdicts of a run (the ledger,
the nodes' logs, the timings it measured) with the helpers here;
``failures`` states the invariants of ``sim/chaos.py`` over them.
"""
from __future__ import annotations

import re
import statistics

__all__ = ["failures"]

_LOST_RE = re.compile(r"was unfinished; marked lost task_id=(\S+) run_id=(\d+)-")
_RECLAIM_RE = re.compile(r"peerd\.fencer: reclaimed (\S+)/(\d+) from dead ")
_SKIP_RE = re.compile(r"(\S+) +\w+ +\[(\S+)\] peerd\.node: slot (?:skipped: (\S+)|not claimed \(([^)]*)\))"
                      r".*task_id=(\S+) slot=(\d+)")


def _why_missed(missed: list[tuple[str, int]], logs: list[str]) -> list[dict]:
    """What the nodes' logs say about each missed slot (``slot skipped``
    and ``slot not claimed`` lines), for the report."""
    want = set(missed)
    said: dict[tuple[str, int], list[str]] = {}
    for text in logs:
        for m in _SKIP_RE.finditer(text):
            key = (m.group(5), int(m.group(6)))
            if key in want:
                said.setdefault(key, []).append(
                    f"{m.group(1)} {m.group(2)} " + (f"skipped: {m.group(3)}" if m.group(3)
                                                     else f"not claimed ({m.group(4)})"))
    return [{"task": t, "slot": s, "log": said.get((t, s), [])} for t, s in missed[:50]]


def _rss_growth(rss: dict) -> dict:
    growth = {n: round(v["last"] - v["first"], 1) for n, v in rss.items()}
    if not growth:
        return {}
    return {"max_node": max(growth, key=growth.get), "max_mb": max(growth.values()),
            "median_mb": round(statistics.median(growth.values()), 1)}


def _timing_summary(items: list[dict], key: str) -> dict:
    """Per fault kind: how many were timed, how many reached the state, and
    the p50 and max of the times."""
    out: dict[str, dict] = {}
    for kind in sorted({d["kind"] for d in items}):
        xs = [d[key] for d in items if d["kind"] == kind]
        got = sorted(x for x in xs if x is not None)
        out[kind] = {"n": len(xs), "reached": len(got),
                     "p50": statistics.median(got) if got else None, "max": got[-1] if got else None}
    return out


def failures(v: dict) -> list[str]:
    out = []
    if v.get("definitions_lost"):
        out.append(f"definitions lost: {v['definitions_lost']}")
    if v.get("missed_outside_net_window", v.get("missed")):
        out.append(f"{v['missed']} slot(s) missed, {v.get('missed_outside_net_window')} outside network "
                   f"fault windows: {v['missed_examples']}")
    if v.get("duplicates_without_lost_run"):
        out.append(f"slots run twice without a lost run: {v['duplicates_without_lost_run']}")
    if v.get("fires_without_token"):
        out.append(f"{v['fires_without_token']} fire(s) without a token")
    if v.get("tokens_unique") is False or v.get("tokens_grow_with_slot") is False:
        out.append("fencing tokens not unique or not growing with the slot")
    if not v.get("membership_converged"):
        out.append(f"membership did not converge: {v.get('membership_error')}")
    if v.get("runs_started_early"):
        out.append(f"{v['runs_started_early']} run(s) started before their slot (by up to "
                   f"{v['runs_started_early_max_s']} s; by node {v['runs_started_early_by_node']})")
    if v.get("api_unreachable"):
        out.append(f"API not answering at the end: {v['api_unreachable']}")
    if v.get("unexpected_exits"):
        out.append(f"nodes exited: {v['unexpected_exits']}")
    if v.get("tracebacks"):
        out.append(f"tracebacks in logs: {v['tracebacks']}")
    return out
