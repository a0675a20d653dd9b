"""Telemetry as a collector receives it: a real OTLP/gRPC receiver, a real Prometheus."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter

import grpc
import numpy as np
import pytest
import yaml
from faster_whisper.feature_extractor import FeatureExtractor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from engine.client import SpeechClient, StreamConfig, audio_requests, final_transcripts
from engine.options import DecodeOptions
from tests.helpers import JFK_TEXT, REPO, ServerProcess, free_port, paused_jfk, tool, wait_until, wer
from tests.otlp_receiver import OtlpHttpReceiver, OtlpReceiver

OTLP_SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
OTLP_STATUS_UNSET, OTLP_STATUS_ERROR = 0, 2
TRANSCRIPT_WORDS = ("fellow", "Americans", "country")
STREAMING = "stt.v1.Speech/StreamingRecognize"


def attributes(item) -> dict:
    values = {}
    for kv in item.attributes:
        value = kv.value
        values[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return values


def last_points(receiver) -> dict:
    return {name: values[-1] for name, values in receiver.metric_points().items()}


@pytest.fixture(scope="module")
def traced(jfk):
    """A server exporting OTLP to a receiver. One real-time stream with a client span, a
    refused stream, a stream whose speculative final is discarded, a Recognize, a
    GetServerInfo, health checks and reflection."""
    receiver = OtlpReceiver().start()
    server = ServerProcess(
        "--log-level",
        "DEBUG",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_BLRP_SCHEDULE_DELAY": "200",
            "OTEL_SERVICE_NAME": "stt-engine-test",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci",
        },
    )
    try:
        server.wait_ready()
        tracer = TracerProvider().get_tracer("test-client")
        sent = []

        def requests():
            yield StreamConfig().first_request()
            for request in audio_requests(jfk, 100, realtime=True):
                sent.append(request)
                yield request

        with SpeechClient(server.target) as client:
            # Only this stream runs under the client span: the instrumented client passes the
            # current span on to every call (otel/client.py), and the others are traces of their own.
            with tracer.start_as_current_span("client stream", kind=SpanKind.CLIENT) as client_span:
                carrier: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(carrier)
                call = client.stream(requests(), metadata=list(carrier.items()))
                responses = list(call)
                response_metadata = dict(call.initial_metadata())
            # A bad stream, for the error span, log and metrics.
            with pytest.raises(grpc.RpcError):
                list(client.stream([StreamConfig(language_code="de").first_request()]))
            paused = client.stream_audio(
                paused_jfk(jfk),
                StreamConfig(silence_duration_ms=3000, interim_results=False),
                realtime=False,
            )
            paused_finals = final_transcripts(paused)
            paused_trace_id = dict(paused.initial_metadata())["x-trace-id"]
            recognized = client.recognize(jfk)
            client.server_info()
            assert client.health() == "SERVING" and client.health("stt.v1.Speech") == "SERVING"
            listed = subprocess.run(
                [tool("grpcurl"), "-plaintext", server.target, "list"], capture_output=True, timeout=30
            )
            assert listed.returncode == 0, listed.stderr
        context = client_span.get_span_context()
        trace_id = format(context.trace_id, "032x")
        server_spans = {STREAMING: 3, "stt.v1.Speech/Recognize": 1, "stt.v1.Speech/GetServerInfo": 1}
        receiver.wait_for(
            lambda: Counter(s.name for s in receiver.spans() if s.kind == OTLP_SERVER_KIND) == server_spans
        )

        def settled() -> bool:
            # An export after everything above: every stream has ended and been counted.
            last = last_points(receiver)
            finals = [p for p in receiver.metric_points().get("stt.results", []) if
                      attributes(p)["stt.result.kind"] == "final"]  # fmt: skip
            methods = {
                attributes(p)["rpc.method"]
                for p in receiver.metric_points().get("rpc.server.call.duration", [])
            }
            return (
                methods >= set(server_spans)
                and "stt.streams.active" in last
                and last["stt.streams.active"].as_int == 0
                and last["stt.chunks"].as_int >= len(sent)
                and bool(finals)
                and finals[-1].as_int >= 2 + len(paused_finals)
            )

        receiver.wait_for(settled)
        yield {
            "receiver": receiver,
            "trace_id": trace_id,
            "client_span_id": format(context.span_id, "016x"),
            "chunks_sent": len(sent),
            "responses": responses,
            "response_metadata": response_metadata,
            "paused_trace_id": paused_trace_id,
            "paused_finals": paused_finals,
            "recognized": recognized,
            "server": server,
        }
    finally:
        code = server.stop()
        receiver.stop()
    assert code == 0


def stream_spans(traced, trace_id: str | None = None) -> list:
    trace_id = trace_id or traced["trace_id"]
    return [s for s in traced["receiver"].spans() if s.trace_id.hex() == trace_id]


def server_span(spans: list, name: str = STREAMING):
    (span,) = [s for s in spans if s.name == name]
    return span


def test_server_span_is_the_client_span_child(traced):
    span = server_span(stream_spans(traced))
    assert span.kind == OTLP_SERVER_KIND
    assert span.parent_span_id.hex() == traced["client_span_id"]
    attrs = attributes(span)
    assert attrs["rpc.system.name"] == "grpc"
    assert attrs["rpc.method"] == STREAMING
    assert attrs["rpc.response.status_code"] == "OK"
    assert "error.type" not in attrs and span.status.code == OTLP_STATUS_UNSET
    assert attrs["stt.chunks"] == traced["chunks_sent"]
    assert wer([JFK_TEXT], [" ".join(final_transcripts(traced["responses"]))]) < 0.1


def test_response_metadata_carries_the_server_span(traced):
    metadata = traced["response_metadata"]
    span = server_span(stream_spans(traced))
    assert metadata["x-trace-id"] == traced["trace_id"]
    version, trace_id, span_id, flags = metadata["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", traced["trace_id"], span.span_id.hex())
    assert int(flags, 16) & 1  # sampled (the SDK also sets W3C level 2's "random" bit)


def test_a_failed_call_span_has_error_type_and_reason(traced):
    (failed,) = [
        s for s in traced["receiver"].spans()
        if s.name == STREAMING and attributes(s)["rpc.response.status_code"] != "OK"
    ]  # fmt: skip
    attrs = attributes(failed)
    assert attrs["rpc.response.status_code"] == "INVALID_ARGUMENT"
    assert attrs["error.type"] == "INVALID_ARGUMENT"
    assert attrs["stt.error.reason"] == "STT_LANGUAGE_UNSUPPORTED"
    # A client's mistake is not a server error: the span status stays unset (semantic conventions).
    assert failed.status.code == OTLP_STATUS_UNSET


def test_recognize_and_server_info_are_traced_health_and_reflection_are_not(traced):
    spans = traced["receiver"].spans()
    servers = Counter(s.name for s in spans if s.kind == OTLP_SERVER_KIND)
    assert servers == {STREAMING: 3, "stt.v1.Speech/Recognize": 1, "stt.v1.Speech/GetServerInfo": 1}
    assert not [s for s in spans if "Health" in s.name or "Reflection" in s.name]
    recognize = server_span(spans, "stt.v1.Speech/Recognize")
    assert attributes(recognize)["rpc.response.status_code"] == "OK"
    decodes = [s for s in spans if s.trace_id == recognize.trace_id and s.name == "stt.decode.final"]
    assert len(decodes) == len(traced["recognized"].results) >= 2
    assert all(d.parent_span_id == recognize.span_id for d in decodes)


def test_resource_identifies_the_service(traced):
    resource = attributes(traced["receiver"].resources()[0])
    assert resource["service.name"] == "stt-engine-test"  # OTEL_SERVICE_NAME wins
    assert resource["deployment.environment.name"] == "ci"
    assert resource["service.version"] and resource["service.instance.id"] and resource["host.name"]
    assert resource["stt.model.name"] == "tiny.en"


def expected_encoder_frames(kind: str, audio_seconds: float) -> int:
    """What the sized encoder input must be for this much audio (never the 3000-frame window)."""
    options = DecodeOptions()
    content = FeatureExtractor()(np.zeros(round(audio_seconds * 16000), np.float32))[..., :-1].shape[-1]
    floor = options.min_encoder_frames if kind == "final" else options.interim_min_encoder_frames
    padding = options.final_padding_frames if kind == "final" else options.tail_padding_frames
    wanted = max(content + padding, floor)
    return min(3000, -(-wanted // options.encoder_frames_bucket) * options.encoder_frames_bucket)


def test_a_span_per_chunk_and_decode_spans_linked_to_chunks(traced):
    spans = stream_spans(traced)
    chunks = [s for s in spans if s.name == "stt.chunk"]
    assert len(chunks) == traced["chunks_sent"]
    indexes = sorted(attributes(s)["stt.chunk.index"] for s in chunks)
    assert indexes == list(range(traced["chunks_sent"]))
    chunk_ids = {s.span_id for s in chunks}
    utterances = {s.span_id: s for s in spans if s.name == "stt.utterance"}
    assert len(utterances) >= 2
    assert {attributes(u)["stt.utterance.endpoint_reason"] for u in utterances.values()} <= {
        "silence",
        "end_of_stream",
        "max_length",
        "confident",
        "sentence",
    }
    assert sum(s.parent_span_id in utterances for s in chunks) > len(chunks) // 2
    for kind in ("interim", "final"):
        decodes = [s for s in spans if s.name == f"stt.decode.{kind}"]
        assert decodes, kind
        for decode in decodes:
            assert decode.parent_span_id in utterances
            assert decode.links and all(link.span_id in chunk_ids for link in decode.links)
            attrs = attributes(decode)
            assert attrs["stt.decode.kind"] == kind
            if "stt.decode.skipped" in attrs:
                continue  # dropped unrun: no model figures
            frames = attrs["stt.decode.encoder_frames"]
            assert frames == expected_encoder_frames(kind, attrs["stt.decode.audio_duration"])
            assert frames < 3000 or attrs["stt.decode.audio_duration"] > 19  # sized, not the 30 s window
            if kind == "interim":
                assert attrs["stt.decode.beam_size"] == 1
            else:  # beam search, or sampling after Whisper's temperature fallback
                assert attrs["stt.decode.beam_size"] == 5 or attrs["stt.decode.temperature"] > 0
            assert attrs["stt.decode.tokens"] > 0 and "stt.inference.queue_wait" in attrs
            assert -5 < attrs["stt.decode.avg_logprob"] <= 0 and 0 <= attrs["stt.decode.no_speech_prob"] <= 1


def test_metrics_arrive_with_sane_values(traced, jfk):
    points = traced["receiver"].metric_points()
    for name in (
        "rpc.server.call.duration",
        "stt.streams.active",
        "stt.audio.received",
        "stt.chunks",
        "stt.chunk.duration",
        "stt.decode.duration",
        "stt.first_interim.latency",
        "stt.final.latency",
        "stt.realtime_factor",
        "stt.results",
        "stt.speculative_finals",
        "stt.errors",
        "stt.inference.queue.depth",
        "stt.inference.queue.wait",
        "stt.model.load.duration",
        "stt.model.loaded",
        "process.cpu.time",
        "process.memory.usage",
    ):
        assert points.get(name), f"no data points for {name}"
    last = last_points(traced["receiver"])
    paused_seconds = len(paused_jfk(jfk)) / 16000
    assert last["stt.audio.received"].as_double == pytest.approx(11.0 + paused_seconds, abs=0.1)
    assert last["stt.streams.active"].as_int == 0
    assert last["stt.model.loaded"].as_int == 1
    assert last["stt.inference.queue.depth"].as_int == 0
    final_latency = last["stt.final.latency"]
    assert final_latency.count >= 2 and 0.1 < final_latency.sum / final_latency.count < 5
    assert 0 < last["stt.realtime_factor"].sum < 2
    by_kind = {attributes(p)["stt.result.kind"]: p.as_int for p in points["stt.results"][-2:]}
    assert by_kind.get("final", 0) >= 2 and by_kind.get("interim", 0) >= 2
    calls = [attributes(p) for p in points["rpc.server.call.duration"]]
    for method in (STREAMING, "stt.v1.Speech/Recognize", "stt.v1.Speech/GetServerInfo"):
        assert {"rpc.method": method, "rpc.response.status_code": "OK", "rpc.system.name": "grpc"} in calls
    errors = [attributes(p) for p in points["stt.errors"]]
    assert any(e["stt.error.reason"] == "STT_LANGUAGE_UNSUPPORTED" for e in errors)
    assert all("stream" not in key for e in errors for key in e)  # no per-stream labels
    # Exemplars on the latency histograms carry the stream's trace id.
    exemplar_traces = {e.trace_id.hex() for p in points["stt.final.latency"] for e in p.exemplars}
    assert traced["trace_id"] in exemplar_traces


def test_finals_start_before_the_endpoint_is_certain(traced):
    spans = stream_spans(traced)
    utterances = {s.span_id: attributes(s) for s in spans if s.name == "stt.utterance"}
    # Ended in a pause: at the endpoint, or earlier by a confident final decoded in it.
    silence_ended = {
        i for i, a in utterances.items() if a["stt.utterance.endpoint_reason"] in ("silence", "confident")
    }
    speculated = {
        s.parent_span_id
        for s in spans
        if s.name == "stt.decode.final" and attributes(s)["stt.decode.speculative"]
    }
    assert silence_ended and silence_ended <= speculated
    points = traced["receiver"].metric_points()["stt.speculative_finals"]
    outcomes = {attributes(p)["stt.speculation.outcome"]: p.as_int for p in points}
    assert outcomes.get("used", 0) >= len(silence_ended)


def test_a_discarded_speculative_final_is_counted_and_leaves_one_final(traced):
    assert len(traced["paused_finals"]) == 1 and wer([JFK_TEXT], traced["paused_finals"]) < 0.1
    spans = stream_spans(traced, traced["paused_trace_id"])
    (utterance,) = [s for s in spans if s.name == "stt.utterance"]
    finals = [attributes(s) for s in spans if s.name == "stt.decode.final"]
    # The one speculated in the pause, then the one of the whole utterance.
    assert len(finals) >= 2 and all(f["stt.utterance.index"] == 0 for f in finals)
    assert finals[0]["stt.decode.speculative"] is True
    points = traced["receiver"].metric_points()["stt.speculative_finals"]
    outcomes = {attributes(p)["stt.speculation.outcome"]: p.as_int for p in points}
    assert outcomes.get("discarded", 0) >= 1


def test_logs_carry_the_stream_trace_id_from_every_thread(traced):
    records = traced["receiver"].log_records()
    mine = [r for r in records if r.trace_id.hex() == traced["trace_id"]]
    bodies = [r.body.string_value for r in mine]
    assert any(b.startswith("stream started") for b in bodies)
    assert any(b.startswith("stream ended") for b in bodies)
    decode_spans = {s.span_id for s in stream_spans(traced) if s.name.startswith("stt.decode")}
    worker_records = [r for r in mine if "stt.decode.kind" in attributes(r)]
    assert worker_records, "no records from the inference threads"
    assert all(r.span_id in decode_spans for r in worker_records)
    errors = [r for r in records if attributes(r).get("stt.error.reason") == "STT_LANGUAGE_UNSUPPORTED"]
    assert len(errors) == 1 and errors[0].trace_id.hex() not in ("", "0" * 32)
    assert attributes(errors[0])["rpc.response.status_code"] == "INVALID_ARGUMENT"


def exported_bytes(receiver) -> bytes:
    return b"".join(r.SerializeToString() for r in receiver.traces + receiver.metrics + receiver.logs)


def test_no_transcript_text_in_any_export(traced):
    exported = exported_bytes(traced["receiver"])
    for word in TRANSCRIPT_WORDS:
        assert word.encode() not in exported and word.lower().encode() not in exported


def test_unreachable_collector_does_not_hurt_and_shutdown_is_bounded(server_factory, jfk):
    # Nothing listens on this port: streams work, the console gets one exporter warning a
    # minute, and shutdown gives up on the last flush after 5 s.
    server = server_factory(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_BLRP_SCHEDULE_DELAY": "100",
        }
    )
    with server.client() as client:
        started = time.monotonic()
        finals = final_transcripts(client.stream_audio(jfk, StreamConfig(), realtime=False))
        elapsed = time.monotonic() - started
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1
    assert elapsed < 10
    exporter_lines = lambda: [line for line in server.log().splitlines() if "opentelemetry." in line]  # noqa: E731
    wait_until(exporter_lines, 20, what="an exporter warning")
    time.sleep(2)  # several more failed exports (every 100-500 ms), all within the minute
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    shutdown = time.monotonic() - signalled
    # 1 s gRPC grace (no RPC open, so it returns at once) + at most 5 s of flushing.
    assert shutdown < 6.5, f"shutdown took {shutdown:.2f} s"
    log = server.log()
    assert "telemetry: traces=otlp" in log
    per_logger = Counter(re.search(r" (opentelemetry[\w.]*): ", line).group(1) for line in exporter_lines())
    assert per_logger and all(count == 1 for count in per_logger.values()), per_logger


def test_sdk_disabled_serves_without_telemetry(server_factory, jfk):
    server = server_factory(env={"OTEL_SDK_DISABLED": "true"})
    with server.client() as client:
        call = client.stream_audio(jfk, StreamConfig(), realtime=False)
        finals = final_transcripts(call)
        assert "x-trace-id" not in dict(call.initial_metadata())
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1
    assert "telemetry disabled" in server.log()


def test_per_signal_endpoints_chunk_policy_and_transcript_opt_in(server_factory, jfk):
    receivers = {signal_: OtlpReceiver().start() for signal_ in ("traces", "metrics", "logs")}
    env = {f"OTEL_EXPORTER_OTLP_{s.upper()}_ENDPOINT": r.endpoint for s, r in receivers.items()}
    server = server_factory(
        env={
            **env,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nobody: must not be used
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "STT_TRACE_CHUNKS": "speech",
            "STT_TELEMETRY_RECORD_TRANSCRIPTS": "true",
        }
    )
    try:
        with server.client() as client:
            call = client.stream_audio(jfk, StreamConfig(), realtime=False)
            finals = final_transcripts(call)
            trace_id = dict(call.initial_metadata())["x-trace-id"]
        assert server.stop() == 0  # flushes everything
    finally:
        for receiver in receivers.values():
            receiver.stop()
    traces, metrics, logs = receivers["traces"], receivers["metrics"], receivers["logs"]
    assert traces.traces and not traces.metrics and not traces.logs
    assert metrics.metrics and not metrics.traces and not metrics.logs
    assert logs.logs and not logs.traces and not logs.metrics
    spans = [s for s in traces.spans() if s.trace_id.hex() == trace_id]
    chunks = [attributes(s) for s in spans if s.name == "stt.chunk"]
    stream = attributes(server_span(spans))
    # Only chunks inside an utterance get a span; the others are counted on the stream span.
    assert chunks and all(c["stt.vad.state"] == "speech" for c in chunks)
    assert len(chunks) + stream["stt.chunks.without_span"] == stream["stt.chunks"] == 110
    assert stream["stt.chunks.without_span"] > 0
    # The opt-in puts each final's text on its decode span; still never in metrics or logs.
    recorded = [attributes(s).get("stt.transcript") for s in spans if s.name == "stt.decode.final"]
    assert set(finals) <= set(recorded)
    assert b"country" not in exported_bytes(metrics) + exported_bytes(logs)


def test_http_protobuf_export_and_chunk_span_cap(server_factory, jfk):
    receiver = OtlpHttpReceiver().start()
    server = server_factory(
        env={
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "STT_TRACE_MAX_CHUNK_SPANS": "20",
        }
    )
    try:
        with server.client() as client:
            call = client.stream_audio(jfk, StreamConfig(), realtime=False)
            assert final_transcripts(call)
            trace_id = dict(call.initial_metadata())["x-trace-id"]
        assert server.stop() == 0  # SIGTERM: the last spans and logs are flushed on the way out
    finally:
        receiver.stop()
    spans = [s for s in receiver.spans() if s.trace_id.hex() == trace_id]
    assert len([s for s in spans if s.name == "stt.chunk"]) == 20
    stream = server_span(spans)
    assert attributes(stream)["stt.chunks"] == 110
    assert attributes(stream)["stt.chunks.without_span"] == 90
    assert any(r.trace_id.hex() == trace_id for r in receiver.log_records())
    assert receiver.metric_points().get("stt.audio.received")  # flushed at shutdown


def test_console_exporter_for_local_debugging(server_factory, jfk):
    server = server_factory("--telemetry-console", env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    with server.client() as client:
        assert final_transcripts(client.stream_audio(jfk[:48000], StreamConfig(), realtime=False))
    assert server.stop() == 0
    log = server.log()
    assert "telemetry: traces=console" in log
    assert f'"name": "{STREAMING}"' in log
    assert '"name": "stt.decode.final"' in log


def test_json_console_logs_carry_trace_ids(server_factory, jfk):
    server = server_factory(
        "--log-format",
        "json",
        env={"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"},
    )
    with server.client() as client:
        call = client.stream_audio(jfk[:48000], StreamConfig(), realtime=False)
        assert final_transcripts(call)
        trace_id = dict(call.initial_metadata())["x-trace-id"]
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    stream_entries = [e for e in entries if e["message"].startswith("stream ")]
    assert len(stream_entries) == 2 and all(e["trace_id"] == trace_id for e in stream_entries)


def test_latency_exemplars_name_the_streams_and_stay_in_later_exports(traced):
    receiver = traced["receiver"]
    streams = {traced["trace_id"], traced["paused_trace_id"]}
    exports_before = len(receiver.metrics)
    # The next exports come after every stream has ended: nothing new is measured in them.
    receiver.wait_for(lambda: len(receiver.metrics) >= exports_before + 2)
    for name in ("stt.final.latency", "stt.first_interim.latency"):
        last = receiver.metric_points()[name][-1]
        # Recorded inside the utterance's span, so the exemplar leads to the stream's trace;
        # kept until a newer measurement replaces it, so a scrape between exports still sees it.
        linked = {exemplar.trace_id.hex() for exemplar in last.exemplars}
        assert linked and linked <= streams, (name, linked)
        assert all(len(exemplar.span_id) == 8 for exemplar in last.exemplars)


# The latency SLOs' histograms (deploy/slo/stt-engine.yaml) under their OTel names.
SLO_HISTOGRAMS = {
    "stt_final_latency_seconds": "stt.final.latency",
    "stt_first_interim_latency_seconds": "stt.first_interim.latency",
}


def test_latency_slo_thresholds_are_exported_bucket_bounds(traced):
    """A latency SLO counts the events of the bucket at its threshold: the exported histogram must
    have that bound (advisory boundaries, kept by the exemplar View of otel/telemetry.py)."""
    slo_file = yaml.safe_load((REPO / "deploy" / "slo" / "stt-engine.yaml").read_text())
    thresholds = {
        slo["latency"]["histogram"]: slo["latency"]["threshold_seconds"]
        for slo in slo_file["slos"]
        if "latency" in slo
    }
    assert thresholds == {"stt_final_latency_seconds": 1.5, "stt_first_interim_latency_seconds": 1.0}
    points = traced["receiver"].metric_points()
    for histogram, threshold in thresholds.items():
        for point in points[SLO_HISTOGRAMS[histogram]]:
            assert {1.0, 1.5, threshold} <= set(point.explicit_bounds), (histogram, point.explicit_bounds)


def test_first_result_latency_times_a_final_that_comes_first(traced):
    """The paused stream has interims off, so each of its utterances' first result is its final:
    stt.first_interim.latency times it (kind final), as the first-result SLO needs."""
    points = traced["receiver"].metric_points()["stt.first_interim.latency"]
    latest = {attributes(point)["stt.result.kind"]: point for point in points}  # cumulative
    assert set(latest) <= {"interim", "final"} and latest["interim"].count >= 1
    assert latest["final"].count >= len(traced["paused_finals"]) >= 1
    # Each utterance that got a final got a first result, once.
    finals = len(final_transcripts(traced["responses"])) + len(traced["paused_finals"])
    assert sum(point.count for point in latest.values()) >= finals
    # Timed from the arrival of the onset's audio (sent faster than real time here).
    assert 0 < latest["final"].sum / latest["final"].count < 10


AUDIO_ATTRIBUTES = (
    "stt.audio.speech_level",
    "stt.audio.noise_level",
    "stt.audio.snr",
    "stt.audio.peak_level",
    "stt.audio.clipped_share",
    "stt.audio.dc_offset",
    "stt.audio.vad_uncertain_share",
    "stt.audio.bandwidth",
    "stt.audio.conditions",
)
RECOGNITION_ATTRIBUTES = (
    "stt.recognition.avg_logprob",
    "stt.recognition.confidence",
    "stt.recognition.no_speech_prob",
    "stt.recognition.compression_ratio",
    "stt.recognition.temperature",
    "stt.recognition.loop_cut",
)


def test_utterance_and_final_decode_spans_carry_the_audio_and_recognition_measures(traced):
    spans = stream_spans(traced)
    utterances = [s for s in spans if s.name == "stt.utterance"]
    assert len(utterances) >= 2  # two sentences, or more where a sentence final cut one
    for span in utterances:
        values = attributes(span)
        assert all(key in values for key in AUDIO_ATTRIBUTES + RECOGNITION_ATTRIBUTES), values
        # JFK's archive recording: speech at about -15 dBFS, 25 dB above its noise, 5 kHz wide.
        assert -20 < values["stt.audio.speech_level"] < -10
        assert 20 < values["stt.audio.snr"] < 30
        assert values["stt.audio.bandwidth"] >= 5000 and values["stt.audio.clipped_share"] == 0
        assert list(values["stt.audio.conditions"].values) == []
        assert 0.5 < values["stt.recognition.confidence"] <= 1 and values["stt.recognition.temperature"] == 0
        assert values["stt.recognition.compression_ratio"] < 2.4 and not values["stt.recognition.loop_cut"]
    finals = [attributes(s) for s in spans if s.name == "stt.decode.final"]
    assert finals and all(
        "stt.audio.speech_level" in f and "stt.decode.compression_ratio" in f for f in finals
    )
    stream = attributes(server_span(spans))
    assert -20 < stream["stt.audio.speech_level"] < -10 and stream["stt.audio.bandwidth"] >= 5000
    (recognize,) = [s for s in traced["receiver"].spans() if s.name == "stt.v1.Speech/Recognize"]
    assert "stt.audio.snr" in attributes(recognize)


def test_one_trace_correlated_quality_record_per_utterance(traced):
    utterance_spans = {s.span_id: s for s in stream_spans(traced) if s.name == "stt.utterance"}
    records = [
        r for r in traced["receiver"].log_records()
        if r.trace_id.hex() == traced["trace_id"] and r.body.string_value.startswith("utterance ")
    ]  # fmt: skip
    assert len(records) == len(utterance_spans) >= 2
    for record in records:
        values = attributes(record)
        span = utterance_spans[record.span_id]  # logged in the utterance span's context
        assert values["stt.utterance.index"] == attributes(span)["stt.utterance.index"]
        assert all(key in values for key in AUDIO_ATTRIBUTES + RECOGNITION_ATTRIBUTES)
        assert " dBFS" in record.body.string_value and "confidence" in record.body.string_value


def test_quality_metrics_arrive_by_encoding_and_rate_class_without_identity(traced):
    points = traced["receiver"].metric_points()
    for name in (
        "stt.audio.speech_rms",
        "stt.audio.noise_rms",
        "stt.audio.snr",
        "stt.audio.clipped_share",
        "stt.audio.bandwidth",
        "stt.audio.vad_uncertain_share",
        "stt.audio.utterances",
        "stt.recognition.confidence",
        "stt.recognition.no_speech_prob",
        "stt.recognition.compression_ratio",
    ):
        assert points.get(name), f"no data points for {name}"
        for point in points[name]:
            # Unauthenticated: no client identity; never a per-stream label.
            assert attributes(point) == {"stt.encoding": "LINEAR16", "stt.sample_rate_class": "wideband"}
    speech = last_points(traced["receiver"])["stt.audio.speech_rms"]
    # Two or more utterances of JFK in each of the two streams of it (Recognize records none).
    assert speech.count >= 4 and 0.05 < speech.sum / speech.count < 0.3  # about -15 dBFS
    assert not points.get("stt.audio.flagged_utterances")  # clean speech is flagged for nothing
    # Exemplars lead from a distribution to an utterance of a stream that recorded it.
    utterance_spans = {s.span_id for s in traced["receiver"].spans() if s.name == "stt.utterance"}
    streams = {traced["trace_id"], traced["paused_trace_id"]}
    for name in ("stt.audio.speech_rms", "stt.recognition.confidence"):
        exemplars = [e for p in points[name] for e in p.exemplars]
        assert exemplars and all(
            e.trace_id.hex() in streams and e.span_id in utterance_spans for e in exemplars
        )
