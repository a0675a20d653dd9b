"""Telemetry as a collector receives it: a real OTLP/gRPC receiver, a real Prometheus."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from engine.client import SpeechClient, StreamConfig, audio_requests, final_transcripts
from tests.conftest import JFK_TEXT, ServerProcess, free_port, wer
from tests.otlp_receiver import OtlpReceiver

OTLP_SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
TRANSCRIPT_WORDS = ("fellow", "Americans", "country")


def attributes(item) -> dict:
    values = {}
    for kv in item.attributes:
        value = kv.value
        values[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return values


@pytest.fixture(scope="module")
def traced():
    """A server exporting OTLP to a receiver; one real-time stream with a client span."""
    receiver = OtlpReceiver().start()
    server = ServerProcess(
        "--log-level",
        "DEBUG",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_BLRP_SCHEDULE_DELAY": "200",
            "OTEL_SERVICE_NAME": "stt-engine-test",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci",
        },
    )
    try:
        server.wait_ready()
        from engine.audio import read_audio_file
        from tests.conftest import SAMPLE

        audio = read_audio_file(SAMPLE)
        tracer = TracerProvider().get_tracer("test-client")
        with tracer.start_as_current_span("client stream", kind=SpanKind.CLIENT) as client_span:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            sent = []

            def requests():
                yield StreamConfig().first_request()
                for request in audio_requests(audio, 100, realtime=True):
                    sent.append(request)
                    yield request

            with SpeechClient(server.target) as client:
                call = client.stream(requests(), metadata=list(carrier.items()))
                responses = list(call)
                returned_trace_id = dict(call.initial_metadata())["x-trace-id"]
                # A bad stream, for the error log and error metrics.
                with pytest.raises(grpc.RpcError):
                    list(client.stream([StreamConfig(language_code="de").first_request()]))
        context = client_span.get_span_context()
        trace_id = format(context.trace_id, "032x")
        receiver.wait_for(
            lambda: any(
                s.name == "stt.v1.Speech/StreamingRecognize" and s.trace_id.hex() == trace_id
                for s in receiver.spans()
            )
        )
        time.sleep(2.5)  # two metric export intervals after the stream
        yield {
            "receiver": receiver,
            "trace_id": trace_id,
            "client_span_id": format(context.span_id, "016x"),
            "chunks_sent": len(sent),
            "responses": responses,
            "returned_trace_id": returned_trace_id,
            "server": server,
        }
    finally:
        code = server.stop()
        receiver.stop()
    assert code == 0


def stream_spans(traced) -> list:
    return [s for s in traced["receiver"].spans() if s.trace_id.hex() == traced["trace_id"]]


def test_server_span_is_the_client_span_child(traced):
    spans = stream_spans(traced)
    server = [s for s in spans if s.name == "stt.v1.Speech/StreamingRecognize"]
    assert len(server) == 1
    span = server[0]
    assert span.kind == OTLP_SERVER_KIND
    assert span.parent_span_id.hex() == traced["client_span_id"]
    attrs = attributes(span)
    assert attrs["rpc.system.name"] == "grpc"
    assert attrs["rpc.method"] == "stt.v1.Speech/StreamingRecognize"
    assert attrs["rpc.response.status_code"] == "OK"
    assert "error.type" not in attrs
    assert attrs["stt.chunks"] == traced["chunks_sent"]
    assert traced["returned_trace_id"] == traced["trace_id"]
    assert wer([JFK_TEXT], [" ".join(final_transcripts(traced["responses"]))]) < 0.1


def test_resource_identifies_the_service(traced):
    resource = attributes(traced["receiver"].resources()[0])
    assert resource["service.name"] == "stt-engine-test"  # OTEL_SERVICE_NAME wins
    assert resource["deployment.environment.name"] == "ci"
    assert resource["service.version"] and resource["service.instance.id"] and resource["host.name"]
    assert resource["stt.model.name"] == "tiny.en"


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
            assert attrs["stt.decode.encoder_frames"] >= 600  # never the 3000-frame window
            if kind == "interim":
                assert attrs["stt.decode.beam_size"] == 1
            else:  # beam search, or sampling after Whisper's temperature fallback
                assert attrs["stt.decode.beam_size"] == 5 or attrs["stt.decode.temperature"] > 0
            assert attrs["stt.decode.tokens"] > 0 and "stt.inference.queue_wait" in attrs
            assert -5 < attrs["stt.decode.avg_logprob"] <= 0 and 0 <= attrs["stt.decode.no_speech_prob"] <= 1


def test_metrics_arrive_with_sane_values(traced):
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
    last = {name: values[-1] for name, values in points.items()}
    assert last["stt.audio.received"].as_double == pytest.approx(11.0, abs=0.05)
    assert last["stt.chunks"].as_int == traced["chunks_sent"]
    assert last["stt.streams.active"].as_int == 0
    assert last["stt.model.loaded"].as_int == 1
    assert last["stt.inference.queue.depth"].as_int == 0
    final_latency = last["stt.final.latency"]
    assert final_latency.count >= 2 and 0.1 < final_latency.sum / final_latency.count < 5
    assert 0 < last["stt.realtime_factor"].sum < 1
    by_kind = {attributes(p)["stt.result.kind"]: p.as_int for p in points["stt.results"][-2:]}
    assert by_kind.get("final", 0) >= 2 and by_kind.get("interim", 0) >= 2
    calls = [attributes(p) for p in points["rpc.server.call.duration"]]
    assert {
        "rpc.method": "stt.v1.Speech/StreamingRecognize",
        "rpc.response.status_code": "OK",
        "rpc.system.name": "grpc",
    } in calls
    errors = [attributes(p) for p in points["stt.errors"]]
    assert any(e["stt.error.reason"] == "STT_LANGUAGE_UNSUPPORTED" for e in errors)
    assert all("stream" not in key for e in errors for key in e)  # no per-stream labels
    # Exemplars on the latency histograms carry the stream's trace id.
    exemplar_traces = {e.trace_id.hex() for p in points["stt.final.latency"] for e in p.exemplars}
    assert traced["trace_id"] in exemplar_traces


def test_finals_start_before_the_endpoint_is_certain(traced):
    spans = stream_spans(traced)
    utterances = {s.span_id: attributes(s) for s in spans if s.name == "stt.utterance"}
    silence_ended = {i for i, a in utterances.items() if a["stt.utterance.endpoint_reason"] == "silence"}
    speculated = {
        s.parent_span_id
        for s in spans
        if s.name == "stt.decode.final" and attributes(s)["stt.decode.speculative"]
    }
    assert silence_ended and silence_ended <= speculated
    points = traced["receiver"].metric_points()["stt.speculative_finals"]
    outcomes = {attributes(p)["stt.speculation.outcome"]: p.as_int for p in points}
    assert outcomes.get("used", 0) >= len(silence_ended)


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


def test_no_transcript_text_in_any_export(traced):
    receiver = traced["receiver"]
    exported = b"".join(r.SerializeToString() for r in receiver.traces + receiver.metrics + receiver.logs)
    for word in TRANSCRIPT_WORDS:
        assert word.encode() not in exported and word.lower().encode() not in exported


def test_unreachable_collector_does_not_hurt(jfk):
    # Nothing listens on this port: streams work, the console gets no error flood.
    server = ServerProcess(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    try:
        server.wait_ready()
        with server.client() as client:
            started = time.monotonic()
            finals = final_transcripts(client.stream_audio(jfk, StreamConfig(), realtime=False))
            elapsed = time.monotonic() - started
        assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1
        assert elapsed < 10
        time.sleep(3)
    finally:
        server.stop()
    log = server.log()
    assert "telemetry: traces=otlp" in log
    exporter_lines = [line for line in log.splitlines() if "opentelemetry.exporter" in line]
    assert len(exporter_lines) <= 6, exporter_lines


def test_sdk_disabled_serves_without_telemetry(jfk):
    server = ServerProcess(env={"OTEL_SDK_DISABLED": "true"})
    try:
        server.wait_ready()
        with server.client() as client:
            call = client.stream_audio(jfk, StreamConfig(), realtime=False)
            finals = final_transcripts(call)
            assert "x-trace-id" not in dict(call.initial_metadata())
        assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1
    finally:
        server.stop()
    assert "telemetry disabled" in server.log()


def prometheus_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_real_prometheus_scrapes_the_metrics_endpoint(tmp_path: Path, jfk):
    metrics_port, prometheus_port = free_port(), free_port()
    server = ServerProcess(
        "--metrics-port",
        str(metrics_port),
        env={"OTEL_METRICS_EXPORTER": "none", "OTEL_TRACES_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"},
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: stt-engine\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server.wait_ready()
        with server.client() as client:
            finals = final_transcripts(client.stream_audio(jfk, StreamConfig(), realtime=True))
        assert finals
        deadline = time.monotonic() + 30
        while True:
            try:
                result = prometheus_query(prometheus_port, "sum(stt_audio_received_seconds_total)")
                if result and float(result[0]["value"][1]) >= 10.9:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus never scraped the engine"
            time.sleep(0.5)
        up = prometheus_query(prometheus_port, 'up{job="stt-engine"}')
        assert up and up[0]["value"][1] == "1"
        p95 = prometheus_query(
            prometheus_port,
            "histogram_quantile(0.95, sum by (le) (rate(stt_final_latency_seconds_bucket[1m])))",
        )
        assert p95 and 0 < float(p95[0]["value"][1]) < 5
        finals_total = prometheus_query(prometheus_port, 'sum(stt_results_total{stt_result_kind="final"})')
        assert float(finals_total[0]["value"][1]) >= 2
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        server.stop()


def test_http_protobuf_export_and_chunk_span_cap(jfk):
    from tests.otlp_receiver import OtlpHttpReceiver

    receiver = OtlpHttpReceiver().start()
    server = ServerProcess(
        env={
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "STT_TRACE_MAX_CHUNK_SPANS": "20",
        }
    )
    try:
        server.wait_ready()
        with server.client() as client:
            call = client.stream_audio(jfk, StreamConfig(), realtime=False)
            assert final_transcripts(call)
            trace_id = dict(call.initial_metadata())["x-trace-id"]
    finally:
        server.stop()  # SIGTERM: the last spans and logs are flushed on the way out
        receiver.stop()
    spans = [s for s in receiver.spans() if s.trace_id.hex() == trace_id]
    assert len([s for s in spans if s.name == "stt.chunk"]) == 20
    stream = next(s for s in spans if s.name == "stt.v1.Speech/StreamingRecognize")
    assert attributes(stream)["stt.chunks"] == 110
    assert attributes(stream)["stt.chunks.without_span"] == 90
    assert any(r.trace_id.hex() == trace_id for r in receiver.log_records())
    assert receiver.metric_points().get("stt.audio.received")  # flushed at shutdown


def test_console_exporter_for_local_debugging(jfk):
    server = ServerProcess("--telemetry-console", env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        server.wait_ready()
        with server.client() as client:
            assert final_transcripts(client.stream_audio(jfk[:48000], StreamConfig(), realtime=False))
    finally:
        server.stop()
    log = server.log()
    assert "telemetry: traces=console" in log
    assert '"name": "stt.v1.Speech/StreamingRecognize"' in log
    assert '"name": "stt.decode.final"' in log


def test_json_console_logs_carry_trace_ids(jfk):
    server = ServerProcess(
        "--log-format",
        "json",
        env={"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"},
    )
    try:
        server.wait_ready()
        with server.client() as client:
            call = client.stream_audio(jfk[:48000], StreamConfig(), realtime=False)
            assert final_transcripts(call)
            trace_id = dict(call.initial_metadata())["x-trace-id"]
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    stream_entries = [e for e in entries if e["message"].startswith("stream ")]
    assert len(stream_entries) == 2 and all(e["trace_id"] == trace_id for e in stream_entries)
