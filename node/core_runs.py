"""The node core's run lifecycle (sans-IO core): run records written as
attempts start, finish and end, cancels asked for, notifications reported.
"""
from __future__ import annotations

from dataclasses import dataclass

from node.state.runstatus import CANCELLED, RETRYABLE, RUNNING
from node.run.traceids import trace_id_for
from node.core_effects import CancelRun, Effect


@dataclass(slots=True)
class _Run:
    task_id: str
    slot: int
    token: int | None
    reason: str
    started: float
    attempt: int = 0
    attempt_started: float = 0.0
    params: dict | None = None
    upstream: dict | None = None
    unit: str | None = None          # the scheduling unit when not the task (a shard)
    shard: tuple[int, int] | None = None


class RunsMixin:
    """Run reports and run records: a mixin of
    :class:`node.core.NodeCore`, whose constructor holds the state it uses."""

    # ----------------------------------------------------------- run reports

    def attempt_started(self, run_id: str, attempt: int, now: float) -> list[Effect]:
        r = self.running.get(run_id)
        if r is None:
            return self._take()
        r.attempt = attempt
        r.attempt_started = now
        self._put_run(r, run_id, attempt, {"status": RUNNING, "exit_code": None, "started": now,
                                            "finished": None, "output": ""})
        self._note("run_started", task_id=r.task_id, run_id=f"{run_id}.{attempt}", attempt=attempt)
        return self._take()

    def attempt_finished(self, run_id: str, attempt: int, status: str, now: float, *,
                         exit_code: int | None = None, started: float | None = None,
                         finished: float | None = None, output: str = "",
                         error: str | None = None) -> list[Effect]:
        r = self.running.get(run_id)
        if r is None:
            return self._take()
        rec = {"status": status, "exit_code": exit_code, "started": now if started is None else started,
               "finished": now if finished is None else finished, "output": output or ""}
        if error:
            rec["error"] = error
        task = self.tasks.get(r.task_id)
        final = task is None or status not in RETRYABLE or attempt >= 1 + task.retries.max
        if final:
            # followups rule 2/4: decided with the final record, written with it
            full = self._record_of(r, run_id, attempt, rec)
            rec = self._decide_followups(r.task_id, full, now, rerun=False)
            self._commit(self.store.put_run(rec), float(rec.get("finished") or now), run_task=r.task_id)
            if isinstance(rec.get("notify"), dict):
                self._send_pending(r.task_id, rec, now)
        else:
            self._put_run(r, run_id, attempt, rec)
        self._note("run_finished", task_id=r.task_id, run_id=f"{run_id}.{attempt}", attempt=attempt,
                   status=status, exit_code=exit_code, error=error,
                   duration_s=max(0.0, rec["finished"] - rec["started"]))
        return self._take()

    def run_ended(self, run_id: str, now: float, *, cancelled_attempt: int | None = None,
                  why: str = "cancelled (shutdown)") -> list[Effect]:
        """The run is over (after its last attempt), or was cancelled during
        attempt ``cancelled_attempt`` (the reason is the one given to the
        ``CancelRun`` this core asked for, else ``why``)."""
        r = self.running.pop(run_id, None)
        asked = self._cancels.pop(run_id, None)
        if r is None:
            return self._take()
        if cancelled_attempt is not None:
            by = None
            if asked is not None:
                why, by = asked
            fields = {"status": CANCELLED, "exit_code": None,
                      "started": r.attempt_started if r.attempt == cancelled_attempt else now,
                      "finished": now, "output": "", "error": why}
            if by is not None:
                fields["cancelled_by"] = by
            self._put_run(r, run_id, cancelled_attempt, fields)
            self._note("run_finished", task_id=r.task_id, run_id=f"{run_id}.{cancelled_attempt}",
                       attempt=cancelled_attempt, status=CANCELLED, exit_code=None, error=why,
                       duration_s=0.0)
        self.scheduler.run_finished(r.unit or r.task_id, run_id, now)
        return self._take()

    def notify_done(self, task_id: str, run_id: str, key: str, ok: bool, now: float,
                    detail: str = "") -> list[Effect]:
        """A :class:`Notify` of a run went out (``ok``) or gave up."""
        self._notify_done(task_id, run_id, key, ok, now, detail)
        return self._take()

    def _notify_done(self, task_id: str, run_id: str, key: str, ok: bool, now: float, detail: str) -> None:
        self._notifying.discard((task_id, run_id, key))
        rec = self.store.run_record(task_id, run_id)
        result = "sent" if ok else "failed"
        if rec is not None and isinstance(rec.get("notify"), dict) and rec["notify"].get(key) == "pending":
            state = dict(rec["notify"])
            state[key] = result
            self._commit(self.store.put_run(dict(rec, notify=state)), now, run_task=task_id)
        self._note("notification", task_id=task_id, run_id=run_id, key=key, result=result, detail=detail)

    def cancel_run(self, run_id: str, by: str, now: float) -> tuple[dict | None, list[Effect]]:
        """Cancel one of our runs (``run_id`` with or without its ``.attempt``)
        on behalf of ``by``: the shell ends its process group and reports
        :meth:`run_ended`, which records ``cancelled`` with ``cancelled_by``.

        Returns ``({"task_id", "run_id", "attempt"}, effects)``, or ``(None,
        effects)`` when no such run is running here.
        """
        claim = run_id
        head, dot, tail = run_id.rpartition(".")
        if dot and tail.isdigit():
            claim = head
        r = self.running.get(claim)
        if r is None:
            return None, self._take()
        if claim not in self._cancels:
            self._cancels[claim] = (f"cancelled by {by}", by)
            self._out.append(CancelRun(claim, f"cancelled by {by}"))
            self._note("run_cancel", task_id=r.task_id, run_id=claim, by=by)
        return {"task_id": r.task_id, "run_id": claim, "attempt": r.attempt}, self._take()

    def _record_of(self, r: _Run, run_id: str, attempt: int, fields: dict) -> dict:
        rec = {"task_id": r.task_id, "slot": int(r.slot), "run_id": f"{run_id}.{attempt}",
               "node": self.name, "attempt": int(attempt), "fencing_token": r.token}
        if r.params:
            rec["params"] = r.params
        if r.upstream:
            rec["upstream"] = r.upstream
        if r.shard is not None:
            rec["shard"], rec["shards"] = r.shard
        rec["trace_id"] = trace_id_for(run_id)
        rec.update(fields)
        return rec

    def _put_run(self, r: _Run, run_id: str, attempt: int, fields: dict) -> None:
        rec = self._record_of(r, run_id, attempt, fields)
        self._commit(self.store.put_run(rec), float(rec.get("finished") or rec.get("started") or 0.0),
                     run_task=r.task_id)
