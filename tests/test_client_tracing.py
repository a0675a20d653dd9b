"""Client-side tracing with opentelemetry-instrumentation-grpc, as a collector receives it.

The client's channel carries the package's client interceptor (otel/client.py): its CLIENT
span parents the server's ``stt.v1.Speech/StreamingRecognize`` span. The package's aio
*server* interceptor is measured here too, on a bidirectional stream like ours; it is not
used (README, "Telemetry"), and the tests at the end show why.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from engine.api import stt_pb2, stt_pb2_grpc
from engine.audio import float_to_linear16, read_audio_file
from engine.client import SpeechClient, StreamConfig, final_transcripts, wait_finished
from tests.helpers import JFK_TEXT, REPO, SAMPLE, ServerProcess, tool, wer
from tests.otlp_receiver import OtlpReceiver
from tests.test_telemetry import attributes

STREAMING = "stt.v1.Speech/StreamingRecognize"
OTLP_SERVER_KIND, OTLP_CLIENT_KIND = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
OTLP_STATUS_UNSET, OTLP_STATUS_ERROR = 0, 2
JFK_CHUNKS = 110  # 11 s in 100 ms chunks


@pytest.fixture(scope="module")
def receiver():
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def exporting_server(receiver):
    """A server sending its spans to ``receiver`` (metrics and logs off: not under test)."""
    server = ServerProcess(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
    )
    try:
        yield server.wait_ready()
    finally:
        code = server.stop()
    assert code == 0, server.log()[-3000:]


def spans_by_service(receiver) -> list[tuple[str, object]]:
    """(service.name of the exporting process, span) for every span received."""
    return [
        (attributes(resource_spans.resource)["service.name"], span)
        for request in list(receiver.traces)
        for resource_spans in request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    ]


def trace_spans(receiver, trace_id: str) -> list[tuple[str, object]]:
    return [(service, s) for service, s in spans_by_service(receiver) if s.trace_id.hex() == trace_id]


def under(span, ancestor, by_id: dict) -> bool:
    """Whether ``ancestor`` is on ``span``'s chain of parents."""
    while span.parent_span_id:
        if span.parent_span_id == ancestor.span_id:
            return True
        span = by_id[span.parent_span_id]
    return False


def one(spans: list, name: str, kind: int):
    (span,) = [s for s in spans if s.name == name and s.kind == kind]
    return span


def test_one_trace_from_the_client_span_to_the_chunk_and_decode_spans(exporting_server, receiver, jfk):
    provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
    )
    with SpeechClient(exporting_server.target, tracer_provider=provider) as client:
        call = client.stream_audio(jfk, StreamConfig(), realtime=False)
        # The interceptor hands back the real bidirectional grpc.Call (contrib PR #4259), so
        # response metadata and done callbacks work through the instrumented channel.
        trace_id = dict(call.initial_metadata())["x-trace-id"]
        finals = final_transcripts(call)
        assert wait_finished(call) and call.code() == grpc.StatusCode.OK
    provider.shutdown()  # exports the client span
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1

    def complete() -> list:
        spans = [s for _, s in trace_spans(receiver, trace_id)]
        names = {s.name for s in spans}
        server_done = any(s.name == STREAMING for s in spans)
        return spans if server_done and {f"/{STREAMING}", "stt.decode.final"} <= names else []

    receiver.wait_for(complete)
    services = dict((s.span_id, service) for service, s in trace_spans(receiver, trace_id))
    spans = complete()
    by_id = {s.span_id: s for s in spans}
    client_span = one(spans, f"/{STREAMING}", OTLP_CLIENT_KIND)
    server_span = one(spans, STREAMING, OTLP_SERVER_KIND)
    # The client span is the root, exported by the client; the server's span is its child.
    assert services[client_span.span_id] == "test-client" and not client_span.parent_span_id
    assert services[server_span.span_id] == "stt-engine"
    assert server_span.parent_span_id == client_span.span_id
    assert attributes(client_span) == {
        "rpc.system": "grpc",
        "rpc.service": "stt.v1.Speech",
        "rpc.method": "StreamingRecognize",
        "rpc.grpc.status_code": 0,
    }
    assert client_span.status.code == OTLP_STATUS_UNSET
    # The client span covers the whole stream: it ends when the stream does, not when it starts.
    assert client_span.start_time_unix_nano <= server_span.start_time_unix_nano
    assert server_span.end_time_unix_nano <= client_span.end_time_unix_nano
    # Under the server span: a span per chunk, and the decodes.
    chunks = [s for s in spans if s.name == "stt.chunk"]
    assert len(chunks) == JFK_CHUNKS and all(under(s, server_span, by_id) for s in chunks)
    for kind in ("interim", "final"):
        decodes = [s for s in spans if s.name == f"stt.decode.{kind}"]
        assert decodes and all(under(s, server_span, by_id) for s in decodes), kind
    assert {services[s.span_id] for s in spans if s is not client_span} == {"stt-engine"}


def test_a_refused_stream_ends_the_client_span_with_its_status(exporting_server, receiver):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with SpeechClient(exporting_server.target, tracer_provider=provider) as client:
        call = client.stream([StreamConfig(language_code="de").first_request()])
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert wait_finished(call)
        assert client.health() == "SERVING"  # health checks are not traced
    (span,) = exporter.get_finished_spans()
    assert span.kind == SpanKind.CLIENT and span.name == f"/{STREAMING}"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert span.status.status_code == StatusCode.ERROR
    trace_id = format(span.context.trace_id, "032x")
    receiver.wait_for(lambda: [s for _, s in trace_spans(receiver, trace_id) if s.name == STREAMING])
    (server_span,) = [s for _, s in trace_spans(receiver, trace_id) if s.name == STREAMING]
    assert server_span.parent_span_id == span.context.span_id.to_bytes(8, "big")


def transcribe(target: str, env: dict) -> subprocess.CompletedProcess:
    """``stt-engine transcribe`` as a user runs it, with ``env`` over a clean OTEL_* environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-m", "engine", "transcribe", str(SAMPLE), "--server", target, "--fast"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**clean, "OTEL_BSP_SCHEDULE_DELAY": "100", **env},
    )


def printed_trace_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return re.search(r"trace id: ([0-9a-f]{32})", result.stderr).group(1)


def test_cli_exports_its_span_in_the_trace_it_prints(exporting_server, receiver):
    result = transcribe(exporting_server.target, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    trace_id = printed_trace_id(result)

    def cli_and_server_spans() -> bool:
        # The server's span ends last, after its chunk spans may already be exported.
        spans = trace_spans(receiver, trace_id)
        return any(service == "stt-engine-cli" for service, _ in spans) and any(
            s.name == STREAMING and s.kind == OTLP_SERVER_KIND for _, s in spans
        )

    receiver.wait_for(cli_and_server_spans)
    spans = trace_spans(receiver, trace_id)
    assert len(spans) > JFK_CHUNKS
    (cli_span,) = [s for service, s in spans if service == "stt-engine-cli"]
    assert cli_span.kind == OTLP_CLIENT_KIND and cli_span.name == f"/{STREAMING}"
    assert not cli_span.parent_span_id
    server_span = one([s for _, s in spans], STREAMING, OTLP_SERVER_KIND)
    assert server_span.parent_span_id == cli_span.span_id
    cli_resources = [
        attributes(r.resource)
        for request in receiver.traces
        for r in request.resource_spans
        if attributes(r.resource)["service.name"] == "stt-engine-cli"
    ]
    assert cli_resources and all(r["service.version"] for r in cli_resources)


@pytest.mark.parametrize(
    "env",
    [{}, {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "endpoint"}],
    ids=["no-exporter", "sdk-disabled"],
)
def test_cli_without_an_exporter_sends_no_trace_context(exporting_server, receiver, env):
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        env = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    trace_id = printed_trace_id(transcribe(exporting_server.target, env))
    receiver.wait_for(lambda: [s for _, s in trace_spans(receiver, trace_id) if s.name == STREAMING])
    spans = trace_spans(receiver, trace_id)
    # As before the client was instrumented: the server's span roots the trace.
    assert {service for service, _ in spans} == {"stt-engine"}
    assert not one([s for _, s in spans], STREAMING, OTLP_SERVER_KIND).parent_span_id


# -- the package's aio server interceptor, measured on a bidirectional stream ----------------


class BidiSpeech(stt_pb2_grpc.SpeechServicer):
    """StreamingRecognize as the engine shapes it: an async generator over the requests, a
    response per message, work after the client half-closes, ``context.abort`` on errors."""

    WORK_AFTER_HALF_CLOSE = 0.3

    def __init__(self) -> None:
        self.entered_ns = self.exited_ns = 0
        self.traceparent: str | None = None

    async def StreamingRecognize(self, requests, context):  # noqa: N802 - the proto's name
        self.entered_ns = time.time_ns()
        self.traceparent = dict(context.invocation_metadata()).get("traceparent")
        try:
            async for request in requests:
                if request.audio_content == b"invalid":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad audio")
                if request.audio_content == b"internal":
                    await context.abort(grpc.StatusCode.INTERNAL, "the model failed")
                if request.audio_content == b"bug":
                    raise RuntimeError("an unexpected error")
                yield stt_pb2.StreamingRecognizeResponse()
            await asyncio.sleep(self.WORK_AFTER_HALF_CLOSE)
            yield stt_pb2.StreamingRecognizeResponse()
        finally:
            self.exited_ns = time.time_ns()


async def _instrumented_stream(last: bytes | None, cancel_after: int | None = None) -> dict:
    """One bidirectional stream through a grpc.aio server carrying the package's interceptor:
    the client's view (status, start and end) and the server span it produced."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = BidiSpeech()
    server = grpc.aio.server(interceptors=[aio_server_interceptor(tracer_provider=provider)])
    stt_pb2_grpc.add_SpeechServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def requests():
                for _ in range(10):
                    await asyncio.sleep(0.02)
                    yield stt_pb2.StreamingRecognizeRequest(audio_content=b"audio")
                if last:
                    yield stt_pb2.StreamingRecognizeRequest(audio_content=last)

            started = time.time_ns()
            call = stt_pb2_grpc.SpeechStub(channel).StreamingRecognize(requests())
            received = 0
            try:
                async for _response in call:
                    received += 1
                    if received == cancel_after:
                        call.cancel()
                        break
            except grpc.aio.AioRpcError:
                pass
            code = await call.code()
            ended = time.time_ns()
            deadline = time.monotonic() + 10
            while not exporter.get_finished_spans() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the server learns of a cancel on its own time
    finally:
        await server.stop(None)
    (span,) = exporter.get_finished_spans()
    return {"code": code, "started": started, "ended": ended, "span": span, "service": service}


def instrumented_stream(last: bytes | None = None, cancel_after: int | None = None) -> dict:
    return asyncio.run(_instrumented_stream(last, cancel_after))


def test_aio_server_instrumentation_times_a_bidi_stream_with_old_names():
    run = instrumented_stream()
    span, service = run["span"], run["service"]
    assert run["code"] == grpc.StatusCode.OK
    # Timing is right: the span starts with the call and ends with the handler, after the
    # work done once the client half-closed, and within the client's view of the call.
    assert run["started"] <= span.start_time <= service.entered_ns
    assert service.exited_ns <= span.end_time <= run["ended"]
    assert span.end_time - span.start_time > BidiSpeech.WORK_AFTER_HALF_CLOSE * 1e9
    # Names are the old conventions' only: a leading slash, the method without its service,
    # no rpc.system.name / rpc.response.status_code (and no rpc.server.call.duration metric).
    assert span.name == f"/{STREAMING}" and span.kind == SpanKind.SERVER
    attrs = dict(span.attributes)
    assert {k: attrs[k] for k in ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code")} == {
        "rpc.system": "grpc",
        "rpc.service": "stt.v1.Speech",
        "rpc.method": "StreamingRecognize",
        "rpc.grpc.status_code": 0,
    }
    assert not {"rpc.system.name", "rpc.response.status_code", "error.type"} & set(attrs)
    assert span.status.status_code == StatusCode.UNSET


@pytest.mark.parametrize(
    ("last", "code", "status"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, StatusCode.UNSET),
        (b"internal", grpc.StatusCode.INTERNAL, StatusCode.ERROR),
    ],
    ids=["invalid-argument", "internal"],
)
def test_aio_server_instrumentation_reports_an_abort(last, code, status):
    run = instrumented_stream(last)
    span = run["span"]
    assert run["code"] == code
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    assert span.status.status_code == status  # a client error leaves it unset, as semconv says
    # The abort's exception is recorded twice (the interceptor and its span's context manager).
    assert [e.attributes["exception.type"] for e in span.events] == ["grpc._cython.cygrpc.AbortError"] * 2


def test_aio_server_instrumentation_misreports_cancelled_and_failed_streams():
    """The defect that keeps the engine's own RPC span (otel/telemetry.py). When this test
    starts failing, the package was fixed: a cancelled stream gets CANCELLED (1) and a stream
    the handler failed gets UNKNOWN (2) with an ERROR status; then switch the RPC span to it
    (aio_server_interceptor) and keep the engine's chunk and decode spans as its children."""
    cancelled = instrumented_stream(cancel_after=3)
    assert cancelled["code"] == grpc.StatusCode.CANCELLED
    span = cancelled["span"]
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]  # should be 1
    assert span.status.status_code == StatusCode.UNSET and not span.events  # nothing says it was cut
    failed = instrumented_stream(b"bug")
    assert failed["code"] == grpc.StatusCode.UNKNOWN
    span = failed["span"]
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]  # should be 2
    assert span.status.status_code == StatusCode.UNSET  # should be ERROR: UNKNOWN is a server error


# README, "Telemetry": a user's own Python client, instrumented with the package's instrumentor.
README_CLIENT = """
import sys
import time

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.api import stt_pb2, stt_pb2_grpc
from engine.audio import float_to_linear16, read_audio_file

provider = TracerProvider(resource=Resource.create({"service.name": "my-service"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[2], insecure=True)))
ended = InMemorySpanExporter()  # after the OTLP export: a span here has been exported
provider.add_span_processor(SimpleSpanProcessor(ended))
trace.set_tracer_provider(provider)

# The README's three lines:
from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient
GrpcInstrumentorClient().instrument()
channel = grpc.insecure_channel(sys.argv[1])

audio = float_to_linear16(read_audio_file(sys.argv[3]))
config = stt_pb2.StreamingRecognitionConfig(
    config=stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, sample_rate_hertz=16000, language_code="en")
)
requests = [stt_pb2.StreamingRecognizeRequest(streaming_config=config)] + [
    stt_pb2.StreamingRecognizeRequest(audio_content=audio[i : i + 3200]) for i in range(0, len(audio), 3200)
]
with trace.get_tracer("my-service").start_as_current_span("handle upload"):
    call = stt_pb2_grpc.SpeechStub(channel).StreamingRecognize(iter(requests))
    finals = [r.result.alternatives[0].transcript for r in call if r.result.is_final]
    print(dict(call.initial_metadata())["x-trace-id"], " ".join(finals))
# The instrumentor ends the client span in the call's done callback, on a gRPC thread, which may
# run after the responses are read: shutting down first lost the span now and then.
for _ in range(1000):
    if any(span.kind == trace.SpanKind.CLIENT for span in ended.get_finished_spans()):
        break
    time.sleep(0.01)
provider.shutdown()
"""


def test_readme_instrumented_python_client(exporting_server, receiver, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(README_CLIENT)
    result = subprocess.run(
        [sys.executable, str(script), exporting_server.target, receiver.endpoint, str(SAMPLE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    trace_id, text = result.stdout.strip().split(" ", 1)
    assert wer([JFK_TEXT], [text]) < 0.1
    receiver.wait_for(lambda: [s for _, s in trace_spans(receiver, trace_id) if s.name == STREAMING])
    spans = trace_spans(receiver, trace_id)
    (root,) = [s for service, s in spans if service == "my-service" and s.name == "handle upload"]
    client_span = one([s for _, s in spans], f"/{STREAMING}", OTLP_CLIENT_KIND)
    server_span = one([s for _, s in spans], STREAMING, OTLP_SERVER_KIND)
    assert client_span.parent_span_id == root.span_id
    assert server_span.parent_span_id == client_span.span_id


def test_traceparent_metadata_from_a_client_in_another_language(exporting_server, receiver, tmp_path):
    """README's grpcurl line (grpcurl is a Go client): the server span joins the sender's trace."""
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    audio = float_to_linear16(read_audio_file(SAMPLE))
    lines = [{"streaming_config": {"config": {"encoding": "LINEAR16", "sample_rate_hertz": 16000}}}]
    lines += [
        {"audio_content": base64.b64encode(audio[i : i + 32000]).decode()}
        for i in range(0, len(audio), 32000)
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(line) for line in lines))
    with requests.open() as stdin:
        result = subprocess.run(
            [tool("grpcurl"), "-plaintext", "-H", f"traceparent: 00-{trace_id}-{parent_id}-01", "-d", "@",
             exporting_server.target, STREAMING],
            stdin=stdin, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fellow" in result.stdout
    receiver.wait_for(lambda: [s for _, s in trace_spans(receiver, trace_id) if s.name == STREAMING])
    server_span = one([s for _, s in trace_spans(receiver, trace_id)], STREAMING, OTLP_SERVER_KIND)
    assert server_span.parent_span_id.hex() == parent_id


def test_aio_client_instrumentation_traces_a_bidi_stream():
    """README names GrpcAioInstrumentorClient for grpc.aio clients: its interceptors (here on one
    channel) send the trace context and end the span with the stream."""

    async def stream() -> tuple:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        service = BidiSpeech()
        server = grpc.aio.server()
        stt_pb2_grpc.add_SpeechServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        interceptors = aio_client_interceptors(tracer_provider=provider)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as channel:

                async def requests():
                    for _ in range(5):
                        yield stt_pb2.StreamingRecognizeRequest(audio_content=b"audio")

                call = stt_pb2_grpc.SpeechStub(channel).StreamingRecognize(requests())
                responses = [response async for response in call]
                assert len(responses) == 6 and await call.code() == grpc.StatusCode.OK
        finally:
            await server.stop(None)
        return exporter.get_finished_spans(), service

    (span,), service = asyncio.run(stream())
    assert span.kind == SpanKind.CLIENT and span.name == f"/{STREAMING}"
    context = span.get_span_context()
    assert service.traceparent.split("-")[1:3] == [
        format(context.trace_id, "032x"),
        format(context.span_id, "016x"),
    ]
    assert span.end_time >= service.exited_ns  # after the server's last response
    assert span.attributes["rpc.grpc.status_code"] == 0


def test_cli_console_exporter_prints_its_span_on_stderr(exporting_server):
    result = transcribe(exporting_server.target, {"OTEL_TRACES_EXPORTER": "console"})
    trace_id = printed_trace_id(result)
    span = json.loads(result.stderr[result.stderr.index("{") :])
    assert span["name"] == f"/{STREAMING}" and span["kind"] == "SpanKind.CLIENT"
    assert span["context"]["trace_id"] == f"0x{trace_id}"
    assert span["resource"]["attributes"]["service.name"] == "stt-engine-cli"
    assert all(line.startswith("[") for line in result.stdout.splitlines())  # only the transcript
