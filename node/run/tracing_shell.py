"""Traces of runs (OpenTelemetry), optional.

With the ``otel`` extra installed (``pip install 'peerd[otel]'``) and
``otlp_endpoint`` set, every run is one trace sent over OTLP/HTTP:

    run <task_id>            root, on the node that runs it
    ├── claim                the fencing claim in etcd (fencing on only)
    ├── attempt 1            one per try: the process or the HTTP call
    ├── attempt 2 ...
    └── notify <event>       one per notification sent about the run

The trace id is a pure function of the claim run id (:func:`trace_id_for`),
and so is the root span's id (:func:`root_span_id_for`): every node, the
run record and every log line agree on it without asking anyone, and the
claim span (which happens before the run starts) and the notifications
(which may be sent later) hang under the root without carrying a context
around. A claim that is lost is a root of its own in the same trace id.

Each attempt hands its context on in W3C trace context form
(:func:`traceparent`): processes get ``TRACEPARENT``, HTTP tasks the
``traceparent`` header, so a traced program's spans join the run's trace.

Without the packages or without an endpoint, :func:`from_config` returns
:data:`NOOP`, whose spans do nothing; nothing from ``opentelemetry`` is
imported then.
"""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("peerd.tracing")

#: Timeout of an export request to the collector (the SDK's default is
#: 10 s): the spans still buffered are sent when the process exits, and a
#: collector that is down must not hold the exit for long.
EXPORT_TIMEOUT_S = 5.0
#: While the collector is down the SDK logs every failed batch: at most one
#: of its lines is let through per this many seconds.
OTEL_LOG_INTERVAL_S = 60.0

__all__ = [
    "NOOP",
    "NoopTracing",
    "OtelTracing",
    "available",
    "claim_run_id",
    "from_config",
    "root_span_id_for",
    "trace_id_for",
    "traceparent",
]

from node.run.traceids import claim_run_id, root_span_id_for, trace_id_for, traceparent  # noqa: E402,F401


def available() -> bool:
    """Whether the OpenTelemetry SDK and OTLP/HTTP exporter are installed."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in
                   ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"))
    except ModuleNotFoundError:
        return False


# ----------------------------------------------------------------- no-op
class NoopSpan:
    """A span that records nothing."""

    __slots__ = ()
    span_id = ""
    traceparent: str | None = None

    def set(self, **attrs: Any) -> None:
        pass

    def end(self, status: str | None = None, error: str | None = None) -> None:
        pass


_NOOP_SPAN = NoopSpan()


class NoopTracing:
    """Tracing switched off: every call returns a span that does nothing."""

    enabled = False

    def run_span(self, task_id: str, run_id: str, **attrs: Any) -> NoopSpan:
        return _NOOP_SPAN

    def child_span(self, name: str, run_id: str | None, **attrs: Any) -> NoopSpan:
        return _NOOP_SPAN

    def record_span(self, name: str, run_id: str, start_ns: int, *, under_root: bool,
                    status: str | None = None, error: str | None = None, **attrs: Any) -> None:
        pass

    def shutdown(self) -> None:
        pass


NOOP = NoopTracing()


# ------------------------------------------------------------ OpenTelemetry
def _attrs(attrs: dict) -> dict:
    """Span attributes: ``peerd.<key>``, None dropped, odd values as text."""
    out = {}
    for k, v in attrs.items():
        if v is None:
            continue
        if not isinstance(v, (str, bool, int, float)):
            v = str(v)
        out[k if "." in k else f"peerd.{k}"] = v
    return out


class OtelSpan:
    __slots__ = ("_span", "_ended", "span_id", "traceparent")

    def __init__(self, span: Any) -> None:
        self._span = span
        self._ended = False
        sc = span.get_span_context()
        self.span_id = f"{sc.span_id:016x}"
        self.traceparent = traceparent(f"{sc.trace_id:032x}", self.span_id)

    def set(self, **attrs: Any) -> None:
        self._span.set_attributes(_attrs(attrs))

    def end(self, status: str | None = None, error: str | None = None) -> None:
        """End the span once (later calls are ignored), with the run status
        (``peerd.status``) and error; ``succeeded`` is OK, other statuses an
        error."""
        if self._ended:
            return
        self._ended = True
        _finish(self._span, status, error)
        self._span.end()


def _finish(span: Any, status: str | None, error: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if status is not None:
        span.set_attribute("peerd.status", status)
    if error:
        span.set_attribute("peerd.error", error)
    if status is None:
        return
    if status in ("succeeded", "won", "fire_without_token", "sent"):
        span.set_status(Status(StatusCode.OK))
    else:
        span.set_status(Status(StatusCode.ERROR, error or status))


class OtelTracing:
    """Spans through an SDK ``TracerProvider`` of this node's own (the
    global provider is left alone: several nodes may share a process).

    Args:
        node: this node's name (resource attribute ``peerd.node`` and
            ``service.instance.id``).
        endpoint: OTLP/HTTP endpoint; ``/v1/traces`` is added to a bare
            ``http://host:4318``.
        exporter: a span exporter to use instead (tests: the SDK's
            ``InMemorySpanExporter``), exported synchronously.
    """

    enabled = True

    def __init__(self, node: str, endpoint: str = "", exporter: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        class _Ids(RandomIdGenerator):
            """Random ids, except the next one set by :meth:`run_span`."""

            def __init__(self) -> None:
                self.next_trace: int | None = None
                self.next_span: int | None = None

            def generate_trace_id(self) -> int:
                if self.next_trace is not None:
                    v, self.next_trace = self.next_trace, None
                    return v
                return super().generate_trace_id()

            def generate_span_id(self) -> int:
                if self.next_span is not None:
                    v, self.next_span = self.next_span, None
                    return v
                return super().generate_span_id()

        self._trace = trace
        self._ids = _Ids()
        resource = Resource.create({"service.name": "peerd", "service.instance.id": node, "peerd.node": node})
        self.provider = TracerProvider(resource=resource, id_generator=self._ids)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=_traces_url(endpoint), timeout=EXPORT_TIMEOUT_S)))
            _quiet_otel_logs()
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("peerd")
        self.node = node

    def _root_context(self, run_id: str) -> Any:
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        sc = SpanContext(int(trace_id_for(run_id), 16), int(root_span_id_for(run_id), 16),
                         is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        return self._trace.set_span_in_context(NonRecordingSpan(sc))

    def _start_root(self, name: str, run_id: str, span_id: int | None, attrs: dict,
                    start_ns: int | None = None) -> Any:
        from opentelemetry.context import Context

        self._ids.next_trace = int(trace_id_for(run_id), 16)
        self._ids.next_span = span_id
        try:
            return self.tracer.start_span(name, context=Context(), attributes=_attrs(attrs), start_time=start_ns)
        finally:
            self._ids.next_trace = self._ids.next_span = None

    def run_span(self, task_id: str, run_id: str, **attrs: Any) -> OtelSpan:
        """Start the root span ``run <task_id>`` of claim run ``run_id``:
        trace id :func:`trace_id_for`, span id :func:`root_span_id_for`."""
        span = self._start_root(f"run {task_id}", run_id, int(root_span_id_for(run_id), 16),
                                {"task_id": task_id, "run_id": run_id, "node": self.node, **attrs})
        return OtelSpan(span)

    def child_span(self, name: str, run_id: str | None, **attrs: Any) -> OtelSpan:
        """Start a span under the root span of ``run_id`` (a claim or an
        attempt run id); with no run id, a trace of its own."""
        from opentelemetry.context import Context

        ctx = self._root_context(run_id) if run_id is not None else Context()
        attrs = {"node": self.node, "run_id": run_id, **attrs}
        return OtelSpan(self.tracer.start_span(name, context=ctx, attributes=_attrs(attrs)))

    def record_span(self, name: str, run_id: str, start_ns: int, *, under_root: bool,
                    status: str | None = None, error: str | None = None, **attrs: Any) -> None:
        """A span that started at ``start_ns`` and ends now, in the trace of
        ``run_id``: under its root span, or (``under_root`` false: the run
        never starts here, e.g. a lost claim) a root itself."""
        attrs = {"node": self.node, "run_id": run_id, **attrs}
        if under_root:
            span = self.tracer.start_span(name, context=self._root_context(run_id), attributes=_attrs(attrs),
                                          start_time=start_ns)
        else:
            span = self._start_root(name, run_id, None, attrs, start_ns)
        _finish(span, status, error)
        span.end()

    def shutdown(self) -> None:
        """Send what is buffered and stop (at most a few seconds)."""
        try:
            self.provider.shutdown()
        except Exception as e:  # never fail a node's shutdown over traces
            log.warning("trace exporter shutdown failed: %s", e)


class _OncePerInterval(logging.Filter):
    """Lets one record through per ``interval_s``; the next one that passes
    says how many were held back."""

    def __init__(self, interval_s: float, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._last: float | None = None
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            self._held += 1
            return False
        if self._held:
            record.msg = f"{record.getMessage()} ({self._held} more OpenTelemetry messages in the last " \
                         f"{self.interval_s:.0f} s not logged)"
            record.args = None
            self._held = 0
        self._last = now
        return True


_OTEL_FILTER = _OncePerInterval(OTEL_LOG_INTERVAL_S)


def _quiet_otel_logs() -> None:
    """Rate-limit the SDK's own log lines (a collector that is down makes
    it log every batch). Its loggers exist once its modules are imported."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("opentelemetry") and isinstance(logger, logging.Logger) \
                and _OTEL_FILTER not in logger.filters:
            logger.addFilter(_OTEL_FILTER)


def _traces_url(endpoint: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def from_config(cfg: Any) -> NoopTracing | OtelTracing:
    """:data:`NOOP` unless ``cfg.otlp_endpoint`` is set; then an
    :class:`OtelTracing` to it, or :data:`NOOP` with a warning when the
    ``otel`` extra is not installed."""
    endpoint = getattr(cfg, "otlp_endpoint", "") or ""
    if not endpoint:
        return NOOP
    if not available():
        log.warning("otlp_endpoint is set but OpenTelemetry is not installed "
                    "(pip install 'peerd[otel]'); runs are not traced")
        return NOOP
    return OtelTracing(cfg.name, endpoint)


def now_ns() -> int:
    """Wall-clock now in ns (span times)."""
    return time.time_ns()
