"""Carrying out the node core's effects (shell): requests to peers, claims
and re-claims through the fencer, runs started in child processes,
notifications sent, notes logged and counted.
"""
from __future__ import annotations

import logging
import os
import time

import trio

from gossip.addr import format_addr

from node import peerwire
from node.run import followups
from node.core_effects import CancelRun, Claim, Note, Notify, Reclaim, Request, StartRun
from node.fencing.fencer_shell import FencerClosed
from node.run.traceids import trace_id_for
from node.tasks.commands import command_with_args
from node.tasks.model import SecretError, resolve_env

from node.clock_shell import wall_clock
from node.run_output_shell import LiveOutput

log = logging.getLogger("peerd.node")

_SKIP_IS_MISFIRE = ("misfire_skip", "coalesced", "expired", "catchup_limit")


def _push_ok(raw: bytes) -> bool:
    try:
        rep = peerwire.decode(raw)
    except peerwire.PeerProtocolError:
        return False
    return rep.get("t") == "reply" and bool(rep.get("ok"))


def _read_secret(path: str) -> bytes:
    """A secret file's bytes (bounded: at most one byte over the limit is read)."""
    from node.tasks.model import MAX_SECRET_BYTES

    with open(path, "rb") as fh:
        return fh.read(MAX_SECRET_BYTES + 1)


class EffectsMixin:
    """The core's effects: a mixin of :class:`node.shell.Node`, whose
    constructor holds the state it uses."""

    # ---------------------------------------------------------------- effects
    def _do(self, effects, *, wake: bool = True) -> None:
        """Carry out the core's effects."""
        n = self._nursery
        for eff in effects:
            t = type(eff)
            if t is Note:
                self._on_note(eff)
            elif n is None:
                continue
            elif t is Request:
                if self._collect is not None and eff.kind == "push":
                    self._collect.append(eff)
                    self._acked[eff.xid] = False
                n.start_soon(self._send_request, eff)
            elif t is StartRun:
                n.start_soon(self._execute, eff)
            elif t is CancelRun:
                scope = self._scopes.get(eff.run_id)
                if scope is not None:
                    scope.cancel()
            elif t is Claim:
                n.start_soon(self._claim, eff)
            elif t is Reclaim:
                n.start_soon(self._reclaim, eff)
            elif t is Notify:
                n.start_soon(self._notify, eff)
        self._dirty.set()
        if wake:
            self._wake.set()

    def _on_note(self, note: Note) -> None:
        f = note.fields
        ev = note.event
        m = self.metrics
        if ev == "slot_skipped":
            m.slots.labels(f["reason"]).inc()
            if f["reason"] in _SKIP_IS_MISFIRE:
                m.misfires.labels(f.get("misfire") or "unknown").inc()
            log.info("slot skipped: %s", f["reason"], extra={"task_id": f["task_id"], "slot": f["slot"]})
        elif ev == "slot_fired":
            m.slots.labels("fired").inc()
            m.fire_lateness.observe(f["late_s"])
        elif ev == "misfire":
            m.misfires.labels(f["policy"]).inc()
        elif ev == "claim":
            if f["result"] not in ("won", "reclaim_won"):
                log.info("slot not claimed (%s%s)", f["result"], f": {f['detail']}" if f.get("detail") else "",
                         extra={"task_id": f["task_id"], "slot": f["slot"]})
        elif ev == "claim_after_shutdown":
            log.warning("slot claimed after the shutdown wait; not run (the claim stands in etcd under "
                        "our ending session)", extra={"task_id": f["task_id"], "slot": f["slot"]})
        elif ev == "run_started":
            if f["attempt"] > 1:
                m.retries.inc()
            log.info("run started", extra={"task_id": f["task_id"], "run_id": f["run_id"], "attempt": f["attempt"],
                                           "trace_id": trace_id_for(f["run_id"])})
        elif ev == "run_finished":
            m.runs.labels(f["status"]).inc()
            m.run_duration.observe(f["duration_s"])
            why = f": {f['error']}" if f.get("error") else ""
            log.info("run finished: %s (exit %s)%s", f["status"], f["exit_code"], why,
                     extra={"task_id": f["task_id"], "run_id": f["run_id"], "status": f["status"],
                            "trace_id": trace_id_for(f["run_id"])})
        elif ev == "clock":
            if f["suspect"]:
                log.error("this node's clock disagrees with most peers by more than max_skew_s (%s): owning "
                          "nothing until it agrees (check NTP)", ", ".join(f["skewed"]))
            else:
                log.warning("this node's clock agrees with its peers again: taking part in ownership")
        elif ev == "chain_triggered":
            m.chained.inc()
            log.info("chained run triggered by %s run %s", f["upstream"], f["run_id"],
                     extra={"task_id": f["task_id"], "slot": f["slot"]})
        elif ev == "rerun_dropped":
            log.info("rerun not needed: the run seen lost ended %s on its node", f["status"],
                     extra={"task_id": f["task_id"], "slot": f["slot"], "run_id": f["run_id"]})
        elif ev == "run_lost":
            log.warning("run of member %s was unfinished; marked lost", f["node"],
                        extra={"task_id": f["task_id"], "run_id": f["run_id"],
                               "trace_id": trace_id_for(str(f["run_id"]))})
        elif ev == "handoff_timeout":
            m.handoff_timeouts.inc()
            log.info("handoff for %s %s (asked %s); taking over with the state we have", f["task_id"],
                     f["why"], ", ".join(f["asked"]) or "nobody", extra={"task_id": f["task_id"]})
        elif ev == "ae_round":
            if f["result"] != "served":
                m.antientropy_rounds.labels(f["result"]).inc()
                if f["result"] == "failed":
                    log.debug("anti-entropy with %s failed: %s", f["peer"], f.get("why"), extra={"peer": f["peer"]})
            m.antientropy_bytes.inc(f["bytes"])
        elif ev == "replication_in":
            m.replication_updates.labels("in").inc(f["n"])
        elif ev == "replication_out":
            m.replication_updates.labels("out").inc(f["n"])
        elif ev in ("bad_message", "rejected_entries"):
            log.warning("bad message from %s: %s", f["peer"], f["error"], extra={"peer": f["peer"]})
        elif ev == "task_invalid":
            log.error("task %s in the store is invalid here: %s", f["task_id"], f["error"],
                      extra={"task_id": f["task_id"]})
        elif ev == "joined":
            log.info("joined the cluster through %s", f["member"], extra={"member": f["member"]})
        elif ev == "boot_alone":
            log.warning("no seed answered within %.0fs; owning tasks alone until one does", f["grace_s"])

    async def _send_request(self, eff: Request) -> None:
        m = self.gossip.core.member(eff.peer) if self.gossip else None
        if m is None:
            self._do(self.core.request_failed(eff.xid, wall_clock(), f"member {eff.peer} is unknown here"))
            return
        try:
            with trio.fail_after(eff.timeout_s):
                raw = await self.gossip.request(m.addr, eff.data, timeout_s=eff.timeout_s)
        except trio.TooSlowError:
            self._do(self.core.request_failed(eff.xid, wall_clock(), f"no answer in {eff.timeout_s:g} s"))
            return
        except Exception as e:
            self._do(self.core.request_failed(eff.xid, wall_clock(), f"{type(e).__name__}: {e}"))
            return
        if eff.kind == "push" and eff.xid in self._acked:
            self._acked[eff.xid] = _push_ok(raw)
            self._ack_event.set()
        self._do(self.core.request_answered(eff.xid, raw, wall_clock()))

    async def _claim(self, eff: Claim) -> None:
        t0 = time.time_ns()
        attrs = dict(task_id=eff.task_id, slot=eff.slot)
        try:
            res = await self.fencer.claim(eff.task_id, eff.slot, eff.run_id,
                                          deadline=trio.current_time() + eff.attempt_s)
        except FencerClosed:
            self.tracing.record_span("claim", eff.run_id, t0, under_root=False, status="closed", **attrs)
            self._do(self.core.claim_answered(eff.task_id, eff.slot, eff.run_id, "closed", None, wall_clock()))
            return
        self.metrics.fencing_claims.labels(res.reason).inc()
        outcome = "won" if res.won and res.reason != "fire_without_token" else res.reason
        # a claim won is under the run's root span; a lost one is a root of its own
        self.tracing.record_span("claim", eff.run_id, t0, under_root=res.won, status=outcome,
                                 error=res.detail or None, fencing_token=res.token, **attrs)
        hc = res.holder_claim
        self._do(self.core.claim_answered(eff.task_id, eff.slot, eff.run_id, outcome, res.token, wall_clock(),
                                          detail=res.detail,
                                          holder=(hc.node, hc.run_id, hc.started) if hc else None))

    async def _reclaim(self, eff: Reclaim) -> None:
        t0 = time.time_ns()
        attrs = dict(task_id=eff.task_id, slot=eff.slot, reclaim_from=eff.dead, reclaim_run_id=eff.expected_run_id)
        try:
            res = await self.fencer.reclaim(eff.task_id, eff.slot, eff.run_id, eff.dead,
                                            deadline=trio.current_time() + eff.attempt_s,
                                            expected_run_id=eff.expected_run_id, alive_wait_s=0.0,
                                            unstarted_only=eff.unstarted)
        except FencerClosed:
            self.tracing.record_span("claim", eff.run_id, t0, under_root=False, status="closed", **attrs)
            self._do(self.core.claim_answered(eff.task_id, eff.slot, eff.run_id, "closed", None, wall_clock()))
            return
        self.metrics.fencing_claims.labels(res.reason).inc()
        if res.won:
            outcome = "won" if res.reason != "fire_without_token" else res.reason
        elif res.reason == "lost" and res.detail.startswith("claimer alive"):
            outcome = "claimer_alive"
        else:
            outcome = res.reason
        self.tracing.record_span("claim", eff.run_id, t0, under_root=res.won, status=outcome,
                                 error=res.detail or None, fencing_token=res.token, **attrs)
        self._do(self.core.claim_answered(eff.task_id, eff.slot, eff.run_id, outcome, res.token, wall_clock(),
                                          detail=res.detail))

    async def _execute(self, eff: StartRun) -> None:
        from node.run.attempt import RunContext
        from node.run.executor_shell import execute_with_retries

        task = eff.task
        scope = trio.CancelScope()
        self._scopes[eff.run_id] = scope
        self.metrics.running.inc()
        from node.run.tracing_shell import trace_id_for

        # the run's trace (node/run/tracing_shell.py): root span "run <task>", one
        # child span per attempt; its id is in every log line of the run
        trace_id = trace_id_for(eff.run_id)
        root = self.tracing.run_span(task.id, eff.run_id, slot=eff.slot, fencing_token=eff.token,
                                     reason=eff.reason)
        attempt_spans: dict = {}
        final: list = [None, None]      # the last attempt's status and error

        params = eff.params or {}
        secret_error = None
        try:
            # secret references resolve here, on the node that runs the task,
            # and never go into a record, a log line or the API
            task_env = resolve_env(dict(task.env or {}), os.environ, _read_secret)
        except SecretError as e:
            task_env, secret_error = {}, str(e)
        run_env = task_env | task.param_defaults() | dict(params.get("env") or {})
        command = command_with_args(task.command, list(params.get("args") or []))

        def ctx(attempt: int) -> RunContext:
            attempt_id = f"{eff.run_id}.{attempt}"
            live = self._live.get(attempt_id)
            if live is None:
                live = self._live[attempt_id] = LiveOutput(self._output_file(task, attempt_id))
                self._live_by_claim[eff.run_id] = attempt_id
            span = attempt_spans.get(attempt)
            if span is None:
                span = attempt_spans[attempt] = self.tracing.child_span(
                    f"attempt {attempt}", attempt_id, task_id=task.id, slot=eff.slot, attempt=attempt,
                    fencing_token=eff.token)
            return RunContext(
                task_id=task.id, slot=eff.slot, run_id=attempt_id, attempt=attempt, on_output=live.feed,
                node=self.name, fencing_token=eff.token, env=run_env,
                cwd=task.cwd or None, timeout_s=float(task.timeout_s), traceparent=span.traceparent,
            )

        current: list[int] = []
        last: list[int] = [0]

        def on_start(c: RunContext) -> None:
            current[:] = [c.attempt]
            last[0] = c.attempt
            self._do(self.core.attempt_started(eff.run_id, c.attempt, wall_clock()))

        def on_done(c: RunContext, r) -> None:
            current.clear()
            live = self._live.pop(c.run_id, None)
            if live is not None:
                live.close()
            final[:] = [r.status, r.error]
            span = attempt_spans.pop(c.attempt, None)
            if span is not None:
                span.set(exit_code=r.exit_code, **{"http.response.status_code": getattr(r, "http_status", None)})
                span.end(r.status, r.error)
            self._do(self.core.attempt_finished(
                eff.run_id, c.attempt, r.status, wall_clock(), exit_code=r.exit_code, started=r.started,
                finished=r.finished, output=r.output, error=r.error))

        cancelled_attempt = None
        try:
            with scope:
                if secret_error is not None:
                    from node.run.attempt import RunResult

                    c1 = ctx(1)
                    on_start(c1)
                    t = time.time()
                    on_done(c1, RunResult(status="error", exit_code=None, started=t, finished=t, output="",
                                          error=secret_error))
                else:
                    await execute_with_retries(command, ctx, task.retries, self.rng, on_done, on_start=on_start)
            if scope.cancelled_caught:
                # during an attempt, or waiting to retry (the next attempt
                # is the one cancelled)
                cancelled_attempt = current[0] if current else last[0] + 1
        except Exception as e:
            # a bug in the executor: the run ends as 'error' with the reason
            log.exception("executor failed: %s: %s", type(e).__name__, e,
                          extra={"task_id": task.id, "run_id": eff.run_id, "trace_id": trace_id})
            final[:] = ["error", f"executor failed: {type(e).__name__}: {e}"]
            if current:
                self._do(self.core.attempt_finished(eff.run_id, current[0], "error", wall_clock(),
                                                    error=f"executor failed: {type(e).__name__}: {e}"))
        finally:
            self._scopes.pop(eff.run_id, None)
            for aid in [a for a in self._live if a.rsplit(".", 1)[0] == eff.run_id]:
                self._live.pop(aid).close()
            self._live_by_claim.pop(eff.run_id, None)
            self.metrics.running.dec()
            self._do(self.core.run_ended(eff.run_id, wall_clock(), cancelled_attempt=cancelled_attempt))
            status, error = ("cancelled", None) if cancelled_attempt is not None else final
            for span in attempt_spans.values():     # cancelled, or the executor failed
                span.end(status or "error", error)
            root.set(attempts=last[0])
            root.end(status or "error", error)

    async def _notify(self, eff: Notify) -> None:
        """Send one notification with the target's timeout and retries
        (followups rule 3: nothing waits for it), then report it."""
        from node.run.http_client_shell import HttpError, request
        from node.run.retry import RetryPolicy

        target = eff.target
        fields = dict(eff.fields)
        if self.api_addr is not None:
            scheme = "https" if getattr(self.cfg, "api_tls_cert", "") else "http"
            fields["link"] = f"{scheme}://{format_addr(self.api_addr)}/#task/{eff.task_id}"
        body = followups.render_body(target.get("template"), fields)
        headers = [("content-type", "application/json"), ("user-agent", "peerd")]
        headers += [(k, v) for k, v in (target.get("headers") or {}).items()]
        policy = RetryPolicy(max=int(target.get("retries", 3)), backoff_s=1.0, max_backoff_s=30.0)
        tries = 1 + policy.max
        detail = ""
        ok = False
        from node.run.tracing_shell import trace_id_for

        # a span under the run's root span (a missed slot's: a trace of its own)
        trace_id = trace_id_for(eff.run_id) if eff.run_id is not None else None
        span = self.tracing.child_span(f"notify {eff.event}", eff.run_id, task_id=eff.task_id,
                                       event=eff.event, notify_target=eff.key)
        if span.traceparent is not None:
            headers.append(("traceparent", span.traceparent))
        status, attempt = "cancelled", 0
        try:
            for attempt in range(1, tries + 1):
                try:
                    resp = await request("POST", target["url"], headers=headers, body=body,
                                         timeout_s=float(target.get("timeout", 10.0)), max_body_bytes=1024)
                    ok = 200 <= resp.status < 300
                    detail = f"HTTP {resp.status}"
                except (HttpError, ValueError, OSError) as e:
                    detail = str(e)
                if ok:
                    break
                if attempt < tries:
                    self.metrics.notifications.labels("retried").inc()
                    await trio.sleep(policy.delay_s(attempt, self.rng))
            status = "sent" if ok else "failed"
        finally:
            span.set(tries=attempt, detail=detail)
            span.end(status, None if ok else detail or None)
        self.metrics.notifications.labels("sent" if ok else "failed").inc()
        if not ok:
            log.warning("notification %s to %s failed after %d tries: %s", eff.event, target["url"], tries, detail,
                        extra={"task_id": eff.task_id, "run_id": eff.run_id, "trace_id": trace_id})
        if eff.run_id is not None:
            self._do(self.core.notify_done(eff.task_id, eff.run_id, eff.key, ok, wall_clock(), detail))
