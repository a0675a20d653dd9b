"""Providers and the per-call telemetry objects the engine talks to.

Trace shape of one stream (``stt.v1.Speech/StreamingRecognize``, kind SERVER):

    stt.v1.Speech/StreamingRecognize          the whole stream, final gRPC status
    ├── stt.chunk                             audio between utterances
    ├── stt.utterance                         speech onset to its final result, and where
    │   │                                     the final's latency went (LatencyBreakdown)
    │   ├── stt.chunk ...                     every chunk received inside it
    │   ├── stt.decode.interim ...            greedy decodes, linked to their chunks
    │   └── stt.decode.final                  the final decode, linked to its chunks
    └── ...

Spans are started with an explicit parent and ended explicitly; nothing holds a
current span across a ``yield``. The stream's tasks run in a ``contextvars``
context whose current span is the RPC span, and each decode runs on its worker
thread with the decode span current, so logs anywhere carry the right ids.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from .instruments import Instruments, length_class
from .options import TelemetryOptions
from .quality import (
    audio_attributes,
    log_utterance,
    recognition_attributes,
    record_audio,
    record_recognition,
    sample_rate_class,
)

logger = logging.getLogger(__name__)

RPC_SYSTEM = "grpc"
# gRPC codes that mean the server failed (semantic conventions for server spans).
SERVER_ERROR_CODES = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
GRPC_CODE_NUMBERS = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
MAX_DECODE_LINKS = 100
RECENT_CHUNKS = 600  # chunk span contexts kept for decode links (60 s at 100 ms)
# W3C Trace Context: a vendor must pass on at least 512 characters of tracestate and may drop
# a longer one. Dropped before extraction: the API parses up to 8 KB, and logs what it cannot.
MAX_TRACESTATE_CHARS = 512


@dataclass
class DecodeTiming:
    """When one decode waited and ran (``time.perf_counter`` seconds), and its model time.

    Attributes:
        queued_at: when it was queued for an inference worker.
        started_at: when a worker took it (``queued_at`` plus its queue wait).
        finished_at: when its result was back on the event loop; None until then.
        model_seconds: encoder and decoder time (``Hypothesis``), at most
            ``finished_at - started_at``.
        speculative: started before its utterance's endpoint was certain.
    """

    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    model_seconds: float = 0.0
    speculative: bool = False


@dataclass
class LatencyBreakdown:
    """Where a final's latency went, in seconds. The four phases add up to ``latency``.

    Attributes:
        latency: from the arrival of the audio at the utterance's speech end to the final's
            delivery (``stt.final.latency``).
        endpoint_wait: from that arrival to the endpoint decision (the silence the endpoint
            waited for, as the audio arrived).
        queue_wait: time the final's decodes waited for a worker after the decision.
        decode: model time of the final's decodes after the decision.
        ordering_wait: the rest: waiting for the finals before it (the context a final is
            prompted with, and their delivery, as results leave in order), and the hand-offs
            between the event loop and the workers.
        hidden_decode: model time of the final's decodes before the decision (a speculative
            final started in the pause): spent, but not waited for.
        decodes: model calls that made the final (two or three when it was decoded in parts).
        speculative: its first decode started before the endpoint decision.
    """

    latency: float
    endpoint_wait: float
    queue_wait: float
    decode: float
    ordering_wait: float
    hidden_decode: float
    decodes: int
    speculative: bool

    def phases(self) -> dict[str, float]:
        """The parts that add up to ``latency``, by ``stt.final.phase``."""
        return {
            "endpoint_wait": self.endpoint_wait,
            "queue_wait": self.queue_wait,
            "decode": self.decode,
            "ordering_wait": self.ordering_wait,
        }


def _overlap(start: float, end: float, low: float, high: float) -> float:
    return max(0.0, min(end, high) - max(start, low))


def latency_breakdown(
    arrived: float, decided: float, delivered: float, decodes: Sequence[DecodeTiming]
) -> LatencyBreakdown:
    """Splits ``delivered - arrived`` at the endpoint decision (``decided``) and along the
    decodes' queue and run intervals, which follow one another.

    Only what happens after both the arrival and the decision is waited for: a decode that ran
    before it (speculation) counts as ``hidden_decode``. A decode's model time is shared between
    before and after in proportion to its run time on each side; the run time that is not model
    time (thread hand-offs) falls to ``ordering_wait``.
    """
    latency = max(0.0, delivered - arrived)
    endpoint_wait = min(latency, max(0.0, decided - arrived))
    waited_from = max(arrived, decided)
    queue_wait = decode = hidden = 0.0
    done = [d for d in decodes if d.finished_at is not None and d.started_at is not None]
    for timing in done:
        queued_at = timing.queued_at if timing.queued_at is not None else timing.started_at
        queue_wait += _overlap(queued_at, timing.started_at, waited_from, delivered)
        run = timing.finished_at - timing.started_at
        after = _overlap(timing.started_at, timing.finished_at, waited_from, delivered)
        model_after = timing.model_seconds * (after / run) if run > 0 else 0.0
        decode += model_after
        hidden += timing.model_seconds - model_after
    ordering_wait = max(0.0, latency - endpoint_wait - queue_wait - decode)
    return LatencyBreakdown(
        latency=latency,
        endpoint_wait=endpoint_wait,
        queue_wait=queue_wait,
        decode=decode,
        ordering_wait=ordering_wait,
        hidden_decode=hidden,
        decodes=len(done),
        speculative=bool(done) and done[0].speculative,
    )


def resource_from_env(attributes: dict[str, Any]):
    """The SDK resource: ``attributes``, overridden by OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    return Resource.create(attributes).merge(OTELResourceDetector().detect())


def span_exporter(options: TelemetryOptions, console_out=None):
    """The span exporter ``OTEL_TRACES_EXPORTER`` names: OTLP over ``OTEL_EXPORTER_OTLP_PROTOCOL``,
    or the console (``console_out``, default stdout); None for any other value."""
    if options.traces_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter() if console_out is None else ConsoleSpanExporter(out=console_out)
    if options.traces_exporter != "otlp":
        return None
    if options.protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def _duplicate_old_rpc_names() -> bool:
    return "rpc/dup" in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "")


class Telemetry:
    """One per process: providers, exporters, instruments; hands out per-call telemetry."""

    def __init__(self, options: TelemetryOptions, service_version: str) -> None:
        self.options = options
        self.service_version = service_version
        self._tracer_provider = None
        self._meter_provider = None
        self.logger_provider = None
        self._prometheus_server = None
        self.instance_id = str(uuid.uuid4())
        if options.enabled:
            self._start_sdk()
        else:
            self.tracer = trace.NoOpTracerProvider().get_tracer("stt-engine")
            from opentelemetry.metrics import NoOpMeterProvider

            self.meter = NoOpMeterProvider().get_meter("stt-engine")
        self.instruments = Instruments(self.meter)
        self.dup_rpc_names = _duplicate_old_rpc_names()

    # -- setup -------------------------------------------------------------------------------
    def _resource(self, model_name: str | None = None):
        attributes = {
            "service.name": "stt-engine",
            "service.version": self.service_version,
            "service.instance.id": self.instance_id,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
            "process.runtime.name": "cpython",
        }
        if model_name:
            attributes["stt.model.name"] = model_name
        return resource_from_env(attributes)

    def _start_sdk(self) -> None:
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, ConsoleLogRecordExporter
        from opentelemetry.sdk.metrics import Histogram, MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.metrics.view import View
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from .exemplars import sticky_exemplar_reservoirs

        options = self.options
        resource = self._resource(os.environ.get("STT_MODEL", "tiny.en"))
        http = options.protocol.startswith("http")

        self._tracer_provider = TracerProvider(resource=resource)
        exporter = span_exporter(options)
        if exporter is not None:
            self._tracer_provider.add_span_processor(BatchSpanProcessor(exporter))

        readers = []
        if options.metrics_exporter == "otlp":
            if http:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            else:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif options.metrics_exporter == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        if options.metrics_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server

            self._prometheus_server = start_http_server(options.metrics_port, options.metrics_host)
            readers.append(PrometheusMetricReader())
        # Histogram buckets keep their last exemplar across exports (otel/exemplars.py).
        histograms = View(instrument_type=Histogram, exemplar_reservoir_factory=sticky_exemplar_reservoirs)
        self._meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=[histograms])

        if options.logs_exporter in ("otlp", "console"):
            self.logger_provider = LoggerProvider(resource=resource)
            if options.logs_exporter == "otlp":
                if http:
                    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
                else:
                    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
                exporter = OTLPLogExporter()
            else:
                exporter = ConsoleLogRecordExporter()
            self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(exporter))

        self.tracer = self._tracer_provider.get_tracer("stt-engine", self.service_version)
        self.meter = self._meter_provider.get_meter("stt-engine", self.service_version)
        if options.system_metrics:
            from opentelemetry.instrumentation.system_metrics import SystemMetricsInstrumentor

            SystemMetricsInstrumentor(
                config={
                    "process.cpu.time": ["user", "system"],
                    "process.cpu.utilization": None,
                    "process.memory.usage": None,
                    "process.memory.virtual": None,
                    "process.thread.count": None,
                    "process.open_file_descriptor.count": None,
                }
            ).instrument(meter_provider=self._meter_provider)

    def describe(self) -> str:
        """Where telemetry goes, for the startup log line."""
        if not self.options.enabled:
            return "telemetry disabled (OTEL_SDK_DISABLED=true)"
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or (
            "http://localhost:4318" if self.options.protocol.startswith("http") else "http://localhost:4317"
        )
        o = self.options
        parts = [f"traces={o.traces_exporter}", f"metrics={o.metrics_exporter}", f"logs={o.logs_exporter}"]
        where = (
            f"OTLP {o.protocol} to {endpoint}"
            if "otlp" in (o.traces_exporter, o.metrics_exporter, o.logs_exporter)
            else "no OTLP"
        )
        text = f"telemetry: {', '.join(parts)}; {where}"
        if o.metrics_port is not None:
            text += f"; Prometheus metrics on :{o.metrics_port}/metrics"
        return text

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flushes everything recorded so far and stops the exporters, within ``timeout``.

        The three providers flush in parallel; an unreachable collector costs at most
        ``timeout`` seconds at exit instead of each exporter's full retry schedule.
        """
        import threading

        def stop(provider) -> None:
            try:
                provider.shutdown()
            except Exception:  # noqa: BLE001 - shutdown must not fail the process
                logger.warning("telemetry flush failed", exc_info=True)

        providers = [p for p in (self._tracer_provider, self._meter_provider, self.logger_provider) if p]
        threads = [threading.Thread(target=stop, args=(p,), daemon=True) for p in providers]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._prometheus_server is not None:
            server, _thread = self._prometheus_server
            server.shutdown()

    # -- engine-wide events ------------------------------------------------------------------
    def model_loaded(self, name: str, seconds: float) -> None:
        self.instruments.model_load_duration.record(seconds, {"stt.model.name": name})
        self.instruments.model_loaded.add(1, {"stt.model.name": name})

    def model_unloaded(self, name: str) -> None:
        self.instruments.model_loaded.add(-1, {"stt.model.name": name})

    # -- per call ------------------------------------------------------------------------------
    def call(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None = None, peer: str | None = None
    ) -> CallTelemetry:
        return CallTelemetry(self, method, metadata, peer)

    def stream(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None = None, peer: str | None = None
    ) -> StreamTelemetry:
        return StreamTelemetry(self, method, metadata, peer)


def _parse_peer(peer: str | None) -> dict[str, Any]:
    """gRPC peer strings look like ``ipv4:127.0.0.1:51234`` or ``ipv6:[::1]:51234``."""
    if not peer or ":" not in peer:
        return {}
    _, address = peer.split(":", 1)
    host, _, port = address.rpartition(":")
    attributes: dict[str, Any] = {"client.address": host.strip("[]")}
    if port.isdigit():
        attributes["client.port"] = int(port)
    return attributes


class CallTelemetry:
    """The SERVER span and duration metric of one RPC."""

    def __init__(
        self, telemetry: Telemetry, method: str, metadata: Sequence[tuple[str, Any]] | None, peer: str | None
    ) -> None:
        self.telemetry = telemetry
        self.instruments = telemetry.instruments
        self.method = method
        self.started = time.perf_counter()
        carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
        if len(carrier.get("tracestate", "")) > MAX_TRACESTATE_CHARS:
            del carrier["tracestate"]
        parent = propagate.extract(carrier)
        attributes: dict[str, Any] = {
            "rpc.system.name": RPC_SYSTEM,
            "rpc.method": method,
            **_parse_peer(peer),
        }
        if telemetry.dup_rpc_names:
            service, _, _ = method.partition("/")
            attributes.update({"rpc.system": RPC_SYSTEM, "rpc.service": service})
        self.span = telemetry.tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        self.span_context = trace.set_span_in_context(self.span, parent)
        # A context for the call's own tasks: the RPC span is current there. It is never
        # attached to the handler's context, so no detach can fail across a yield.
        self.context = contextvars.copy_context()
        self.context.run(otel_context.attach, self.span_context)
        self._ended = False
        self.decode_seconds = 0.0
        # Attributes of the quality metrics: encoding and sample-rate class, bounded identity.
        self.quality_attributes: dict[str, Any] = {}
        self.sample_rate = 16000

    @property
    def trace_id(self) -> str:
        context = self.span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else ""

    @property
    def traceparent(self) -> str:
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=self.span_context)
        return carrier.get("traceparent", "")

    def decode(
        self, kind: str, utterance_index: int, audio_start: float, audio_end: float, parent=None, audio=None
    ) -> DecodeTelemetry:
        """``audio``: the ``quality.AudioQuality`` of the audio it decodes."""
        return DecodeTelemetry(
            self,
            kind,
            utterance_index,
            audio_start,
            audio_end,
            parent or self.span_context,
            [],
            audio=self._audio_attributes(audio),
        )

    def _audio_attributes(self, audio: Any) -> dict[str, Any] | None:
        """``stt.audio.*`` of a ``quality.AudioQuality`` (None for None), for this call's sample rate."""
        return None if audio is None else audio_attributes(audio, self.sample_rate)

    def stream_audio(self, audio: Any) -> None:
        """The ``quality.AudioQuality`` of all the call's utterances, on its span."""
        self.span.set_attributes(self._audio_attributes(audio))

    def configured(self, attributes: dict[str, Any]) -> None:
        """The call's settings, as ``stt.<key>`` attributes of its span."""
        self.span.set_attributes({f"stt.{key}": value for key, value in attributes.items()})
        if "sample_rate" in attributes:
            self.sample_rate = attributes["sample_rate"]
            self.quality_attributes["stt.sample_rate_class"] = sample_rate_class(self.sample_rate)
        if "encoding" in attributes:
            self.quality_attributes["stt.encoding"] = attributes["encoding"]

    def authenticated(self, identity: str, bounded: bool = False) -> None:
        """The caller proved ``identity`` (a token's name or a client certificate's name);
        ``bounded``: identities are a configured set (a tokens file or an allow-list), so the
        quality metrics may carry it."""
        # enduser.id: the semantic conventions' attribute for the authenticated end user.
        self.span.set_attribute("enduser.id", identity)
        if bounded:
            self.quality_attributes["enduser.id"] = identity
        self.instruments.client_calls.add(1, {"enduser.id": identity, "rpc.method": self.method})

    def _status_attributes(self, code: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "rpc.system.name": RPC_SYSTEM,
            "rpc.method": self.method,
            "rpc.response.status_code": code,
        }
        if code != "OK":
            attributes["error.type"] = code
        return attributes

    def finished(self, code: str, reason: str | None = None, message: str | None = None) -> None:
        """Ends the call with its gRPC status code name (``OK``, ``INVALID_ARGUMENT``...)."""
        if self._ended:
            return
        self._ended = True
        self.context.copy().run(self._finish, code, reason, message)

    def _finish(self, code: str, reason: str | None, message: str | None) -> None:
        attributes = self._status_attributes(code)
        self.span.set_attributes(attributes)
        if self.telemetry.dup_rpc_names:
            self.span.set_attribute("rpc.grpc.status_code", GRPC_CODE_NUMBERS.get(code, 2))
        if reason:
            self.span.set_attribute("stt.error.reason", reason)
        if code in SERVER_ERROR_CODES:
            self.span.set_status(Status(StatusCode.ERROR, message or code))
        if code != "OK":
            self.instruments.errors.add(
                1,
                {
                    "rpc.method": self.method,
                    "rpc.response.status_code": code,
                    "stt.error.reason": reason or code,
                },
            )
        self._before_end()
        metric_attributes = {k: v for k, v in attributes.items() if k != "error.type"}
        self.instruments.call_duration.record(time.perf_counter() - self.started, metric_attributes)
        self.span.end()

    def _before_end(self) -> None:
        pass


class StreamTelemetry(CallTelemetry):
    """A streaming RPC: chunk, utterance and decode spans, and the stream metrics."""

    def __init__(
        self, telemetry: Telemetry, method: str, metadata: Sequence[tuple[str, Any]] | None, peer: str | None
    ) -> None:
        super().__init__(telemetry, method, metadata, peer)
        self.options = telemetry.options
        self.instruments.active_streams.add(1)
        self.audio_seconds = 0.0
        self.chunk_count = 0
        self._chunk_spans = 0
        self._chunks_unspanned = 0
        # (audio start, audio end, arrival time, span context or None), newest last
        self._recent: deque[tuple[float, float, float, Any]] = deque(maxlen=RECENT_CHUNKS)
        self._utterances: dict[int, tuple[Any, Any, float]] = {}  # index -> span, ctx, onset time
        # index -> (endpoint decision time, speech seconds, endpoint reason), until its final
        self._endpoints: dict[int, tuple[float, float, str]] = {}
        self._first_result_sent: set[int] = set()
        self._current_utterance: int | None = None
        self._audio: dict[int, dict[str, Any]] = {}  # index -> stt.audio.* attributes, until done

    def chunk(
        self,
        index: int,
        num_bytes: int,
        audio_seconds: float,
        offset: float,
        started_ns: int,
        in_speech: bool,
    ) -> None:
        """One audio chunk, processed between ``started_ns`` and now."""
        now = time.perf_counter()
        self.chunk_count += 1
        self.audio_seconds += audio_seconds
        self.instruments.chunks.add(1)
        self.instruments.audio_received.add(audio_seconds)
        self.instruments.chunk_duration.record((time.time_ns() - started_ns) / 1e9)
        span_context = None
        wanted = self.options.chunk_spans == "all" or (self.options.chunk_spans == "speech" and in_speech)
        if wanted and self._chunk_spans < self.options.max_chunk_spans:
            self._chunk_spans += 1
            parent = self._utterance_context() or self.span_context
            span = self.telemetry.tracer.start_span(
                "stt.chunk",
                context=parent,
                start_time=started_ns,
                attributes={
                    "stt.chunk.index": index,
                    "stt.chunk.bytes": num_bytes,
                    "stt.chunk.audio_duration": audio_seconds,
                    "stt.chunk.offset": offset,
                    "stt.vad.state": "speech" if in_speech else "silence",
                },
            )
            span.end()
            span_context = span.get_span_context()
        else:
            self._chunks_unspanned += 1
        self._recent.append((offset, offset + audio_seconds, now, span_context))

    def _utterance_context(self):
        if self._current_utterance is None:
            return None
        entry = self._utterances.get(self._current_utterance)
        return entry[1] if entry else None

    def _arrival(self, offset: float) -> float | None:
        """Wall time at which the audio at ``offset`` arrived."""
        for start, end, arrived, _ in reversed(self._recent):
            if start <= offset <= end + 1e-6:
                return arrived
            if end < offset:
                return arrived
        return None

    def utterance_started(self, index: int, offset: float) -> None:
        span = self.telemetry.tracer.start_span(
            "stt.utterance",
            context=self.span_context,
            attributes={"stt.utterance.index": index, "stt.utterance.start_offset": offset},
        )
        onset = self._arrival(offset) or time.perf_counter()
        self._utterances[index] = (span, trace.set_span_in_context(span, self.span_context), onset)
        self._current_utterance = index

    def utterance_ended(
        self, index: int, start: float, end: float, speech_end: float, reason: str, audio: Any = None
    ) -> None:
        """The endpoint decision (now): the utterance's audio is complete, ``reason`` says why;
        ``audio``: its ``quality.AudioQuality``."""
        self._endpoints[index] = (time.perf_counter(), speech_end - start, reason)
        entry = self._utterances.get(index)
        attributes = {}
        if audio is not None:
            attributes = self._audio[index] = self._audio_attributes(audio)
            context = entry[1] if entry is not None else self.span_context
            record_audio(self.instruments, audio, self.sample_rate, self.quality_attributes, context)
        if entry is not None:
            entry[0].set_attributes(
                {
                    "stt.utterance.start_offset": start,
                    "stt.utterance.end_offset": end,
                    "stt.utterance.speech_end_offset": speech_end,
                    "stt.utterance.endpoint_reason": reason,
                    **attributes,
                }
            )
        if self._current_utterance == index:
            self._current_utterance = None

    def decode(
        self,
        kind: str,
        utterance_index: int,
        audio_start: float,
        audio_end: float,
        parent=None,
        speculative: bool = False,
        audio: Any = None,
    ) -> DecodeTelemetry:
        """``speculative``: a final decode started before its endpoint was certain; ``audio``:
        the ``quality.AudioQuality`` of the audio it decodes."""
        entry = self._utterances.get(utterance_index)
        links = [
            ctx
            for start, end, _, ctx in self._recent
            if ctx is not None and end > audio_start and start < audio_end
        ]
        if len(links) > MAX_DECODE_LINKS:
            step = len(links) / MAX_DECODE_LINKS
            links = [links[int(i * step)] for i in range(MAX_DECODE_LINKS)]
        return DecodeTelemetry(
            self,
            kind,
            utterance_index,
            audio_start,
            audio_end,
            entry[1] if entry else self.span_context,
            links,
            speculative,
            audio=self._audio_attributes(audio),
        )

    def speculation_resolved(self, used: bool) -> None:
        """A speculative final became the final, or speech resumed and it was discarded."""
        outcome = "used" if used else "discarded"
        self.instruments.speculative_finals.add(1, {"stt.speculation.outcome": outcome})

    def interim_sent(self, utterance_index: int) -> None:
        self.instruments.results.add(1, {"stt.result.kind": "interim"})
        self._first_result(utterance_index, "interim")

    def _first_result(self, utterance_index: int, kind: str) -> None:
        """Speech onset to the utterance's first result. A final counts when it comes first
        (interims off, or a short utterance): that is how long the user waited for any text."""
        if utterance_index in self._first_result_sent:
            return
        self._first_result_sent.add(utterance_index)
        entry = self._utterances.get(utterance_index)
        if entry is not None:
            latency = time.perf_counter() - entry[2]
            self.instruments.first_result_latency.record(latency, {"stt.result.kind": kind}, context=entry[1])

    def final_sent(
        self,
        utterance_index: int,
        speech_end: float,
        decodes: Sequence[DecodeTelemetry] = (),
        recognition: Any = None,
    ) -> None:
        """The utterance's final was delivered; ``decodes``: the decodes whose results made it,
        in the order they ran; ``recognition``: its ``quality.RecognitionQuality``."""
        delivered = time.perf_counter()
        self.instruments.results.add(1, {"stt.result.kind": "final"})
        self._first_result(utterance_index, "final")
        arrived = self._arrival(speech_end)
        if arrived is not None:
            # In the utterance's context, so that the exemplar points at the utterance's trace
            # (the caller may run outside the call's context, where no span is current).
            entry = self._utterances.get(utterance_index)
            context = entry[1] if entry is not None else self.span_context
            self.instruments.final_latency.record(delivered - arrived, context=context)
            endpoint = self._endpoints.get(utterance_index)
            if endpoint is not None:
                decided, speech_seconds, reason = endpoint
                breakdown = latency_breakdown(arrived, decided, delivered, [d.timing for d in decodes])
                self._record_breakdown(breakdown, speech_seconds, reason, entry, context)
        self.utterance_done(utterance_index, recognition)

    def _record_breakdown(
        self, breakdown: LatencyBreakdown, speech_seconds: float, reason: str, entry, context
    ) -> None:
        length = length_class(speech_seconds)
        if entry is not None:
            entry[0].set_attributes(
                {
                    "stt.final.latency": breakdown.latency,
                    "stt.final.endpoint_wait": breakdown.endpoint_wait,
                    "stt.final.queue_wait": breakdown.queue_wait,
                    "stt.final.decode_duration": breakdown.decode,
                    "stt.final.ordering_wait": breakdown.ordering_wait,
                    "stt.final.hidden_decode_duration": breakdown.hidden_decode,
                    "stt.final.decode_count": breakdown.decodes,
                    "stt.final.speculative": breakdown.speculative,
                    "stt.utterance.speech_duration": speech_seconds,
                    "stt.utterance.length_class": length,
                }
            )
        for phase, seconds in breakdown.phases().items():
            self.instruments.final_phase_duration.record(
                seconds,
                {
                    "stt.final.phase": phase,
                    "stt.utterance.length_class": length,
                    "stt.utterance.endpoint_reason": reason,
                },
                context=context,
            )

    def utterance_done(self, utterance_index: int, recognition: Any = None) -> None:
        """The utterance is over: its final (``recognition``: its measures) was delivered, or
        it held no words (None); its quality summary is logged in its span's context."""
        self._first_result_sent.discard(utterance_index)
        self._endpoints.pop(utterance_index, None)
        entry = self._utterances.pop(utterance_index, None)
        audio = self._audio.pop(utterance_index, None)
        context = entry[1] if entry is not None else self.span_context
        recognized = None
        if recognition is not None:
            recognized = recognition_attributes(recognition)
            record_recognition(self.instruments, recognition, self.quality_attributes, context)
            if entry is not None:
                entry[0].set_attributes(recognized)
        if audio is not None:
            token = otel_context.attach(context)
            try:
                log_utterance(utterance_index, audio, recognized)
            finally:
                otel_context.detach(token)
        if entry is not None:
            entry[0].end()

    def _before_end(self) -> None:
        for index in list(self._utterances):
            self.utterance_done(index)
        self.span.set_attributes(
            {
                "stt.audio.duration": self.audio_seconds,
                "stt.chunks": self.chunk_count,
                "stt.chunks.without_span": self._chunks_unspanned,
            }
        )
        self.instruments.active_streams.add(-1)
        if self.audio_seconds > 0:
            self.instruments.realtime_factor.record(self.decode_seconds / self.audio_seconds)


class DecodeTelemetry:
    """One model call: its span (queue wait included), queue metrics, worker-thread context."""

    def __init__(
        self,
        call: CallTelemetry,
        kind: str,
        utterance_index: int,
        audio_start: float,
        audio_end: float,
        parent,
        links: list,
        speculative: bool = False,
        audio: dict[str, Any] | None = None,
    ) -> None:
        self.call = call
        self.kind = kind
        self.instruments = call.instruments
        self.span = call.telemetry.tracer.start_span(
            f"stt.decode.{kind}",
            context=parent,
            links=[Link(c) for c in links],
            attributes={
                "stt.decode.kind": kind,
                "stt.utterance.index": utterance_index,
                "stt.decode.audio_start_offset": audio_start,
                "stt.decode.audio_end_offset": audio_end,
                "stt.decode.linked_chunks": len(links),
                "stt.decode.speculative": speculative,
                **(audio or {}),
            },
        )
        self._context = trace.set_span_in_context(self.span)
        self._queued = False
        self.timing = DecodeTiming(speculative=speculative)

    def queued(self) -> None:
        self._queued = True
        self.instruments.queue_depth.add(1)

    def dequeued(self, waited: float) -> None:
        if self._queued:
            self._queued = False
            self.timing.started_at = time.perf_counter()
            self.timing.queued_at = self.timing.started_at - waited
            self.instruments.queue_depth.add(-1)
            self.instruments.queue_wait.record(waited, {"stt.decode.kind": self.kind})
            self.span.set_attribute("stt.inference.queue_wait", waited)

    def run(self, function: Callable, *args):
        """Runs ``function`` (on a worker thread) with the decode span current."""
        token = otel_context.attach(self._context)
        try:
            return function(*args)
        finally:
            otel_context.detach(token)

    def finished(self, hypothesis) -> None:
        h = hypothesis
        model_seconds = h.encode_seconds + h.decode_seconds
        self.timing.finished_at = time.perf_counter()
        self.timing.model_seconds = model_seconds
        self.call.decode_seconds += model_seconds
        self.instruments.decode_duration.record(model_seconds, {"stt.decode.kind": self.kind})
        self.span.set_attributes(
            {
                "stt.decode.audio_duration": h.audio_seconds,
                "stt.decode.encoder_frames": h.encoder_frames,
                "stt.decode.beam_size": h.beam_size,
                "stt.decode.tokens": h.tokens,
                "stt.decode.temperature": h.temperature,
                "stt.decode.failed_checks": h.failed_checks,
                "stt.decode.fallback_reason": h.fallback_reason,
                "stt.decode.compression_ratio": round(h.compression_ratio, 3),
                "stt.decode.looped": h.looped,
                "stt.decode.avg_logprob": h.avg_logprob,
                "stt.decode.no_speech_prob": h.no_speech_prob,
                "stt.decode.is_speech": h.is_speech,
                "stt.decode.encode_duration": h.encode_seconds,
                "stt.decode.decoder_duration": h.decode_seconds,
                "stt.decode.batch_size": h.batch_size,
            }
        )
        if self.call.telemetry.options.record_transcripts:
            self.span.set_attribute("stt.transcript", h.text)
        self.span.end()

    def skipped(self, reason: str) -> None:
        """Dropped unrun: ``stale`` (waited too long) or ``cancelled`` (its stream gave up)."""
        self.dequeued(0.0)
        self.span.set_attribute("stt.decode.skipped", reason)
        self.span.end()

    def failed(self, error: BaseException) -> None:
        self.span.record_exception(error)
        self.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self.span.set_attribute("error.type", type(error).__name__)
        self.span.end()
