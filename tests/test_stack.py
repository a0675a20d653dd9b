"""The observability stack end to end, every part real and on loopback.

engine --OTLP/gRPC--> OpenTelemetry Collector (the shipped collector-config.yaml, endpoints set by
environment, in a collector of the pinned release built by .ci/setup) --> Jaeger v2 (traces),
its prometheus exporter scraped by Prometheus 2.42 (the shipped prometheus.yml, alert and SLO rules,
targets and windows shortened) which alerts through Alertmanager 0.25 to a webhook here, and a
Loki stand-in (an OTLP/HTTP receiver on Loki's /otlp/v1/logs path) for the logs.

The tests run in file order against one stack; the last one kills the collector mid-stream.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from engine.client import SpeechClient, StreamConfig, audio_requests, final_transcripts
from tests.helpers import (
    JFK_TEXT,
    REPO,
    BackgroundStream,
    PrometheusProcess,
    ServerProcess,
    free_port,
    stack_tool,
    stack_versions,
    tool,
    wait_until,
    wer,
)
from tests.otlp_receiver import OtlpHttpReceiver
from tests.test_deploy import (
    ALERTMANAGER_CONFIG,
    COLLECTOR_CONFIG,
    COLLECTOR_VERSION,
    COMPOSE,
    DASHBOARD_NO_DATA_REASONS,
    PROMETHEUS_DIR,
    RULE_FILES,
    alert_rules,
    dashboard_prometheus_targets,
    finite_values,
    grafana_to_promql,
    load_yaml,
    recording_rules,
    rules_of,
    slo_alert_rules,
    value_expression,
)

STREAMING = "stt.v1.Speech/StreamingRecognize"
VERSIONS = stack_versions()


# --- the stack's processes --------------------------------------------------------------------------


class Daemon:
    """A stack process with its output in a log file, stopped by the fixture."""

    def __init__(self, name: str, command: list[str], directory: Path, env: dict | None = None) -> None:
        self.name, self.command, self.env = name, command, {**os.environ, **(env or {})}
        self.log_path = directory / f"{name}.log"
        self.start()

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


class AlertWebhook:
    """Alertmanager's webhook receiver: keeps every notification with the time it arrived."""

    def __init__(self) -> None:
        self.notifications: list[tuple[float, dict]] = []
        received = self.notifications

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((time.time(), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/alerts"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def alerts(self, name: str, status: str) -> list[tuple[float, dict]]:
        return [
            (at, alert)
            for at, body in list(self.notifications)
            for alert in body["alerts"]
            if alert["labels"]["alertname"] == name and alert["status"] == status
        ]

    def stop(self) -> None:
        self._http.shutdown()


def shortened_rules(directory: Path) -> list[Path]:
    """Test copies of the rule files (threshold alerts, SLO rules) with 20 s windows and 1 s `for`,
    so an alert fires and resolves within the test; the expressions are otherwise the shipped ones."""
    copies = []
    for path in RULE_FILES:
        rules = load_yaml(path)
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["expr"] = re.sub(r"\[\d+[smhdw]\]", "[20s]", rule["expr"])
                if "alert" in rule:
                    rule["for"] = "1s"
        copy = directory / path.name
        copy.write_text(yaml.safe_dump(rules, sort_keys=False))
        copies.append(copy)
    return copies


def shortened_alertmanager_config(url: str) -> dict:
    """The shipped Alertmanager routing with 1 s grouping and every webhook sent to ``url``."""
    config = load_yaml(ALERTMANAGER_CONFIG)
    routes = [config["route"]]
    while routes:
        route = routes.pop()
        route.update({key: "1s" for key in ("group_wait", "group_interval") if key in route})
        routes.extend(route.get("routes", []))
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = url
    return config


def jaeger_config(directory: Path, otlp_port: int, query_port: int, health_port: int) -> Path:
    config = {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch"],
                    "exporters": ["jaeger_storage_exporter"],
                }
            },
            # No self-telemetry: its traces would go to localhost:4317, whoever listens there.
            "telemetry": {"metrics": {"level": "none"}, "traces": {"level": "none"}},
        },
        "extensions": {
            "jaeger_storage": {"backends": {"memory": {"memory": {"max_traces": 10000}}}},
            "jaeger_query": {
                "storage": {"traces": "memory"},
                "http": {"endpoint": f"127.0.0.1:{query_port}"},
                "grpc": {"endpoint": f"127.0.0.1:{free_port()}"},
            },
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"127.0.0.1:{health_port}"}},
        },
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{otlp_port}"}}}},
        "processors": {"batch": {"timeout": "200ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memory"}},
    }
    path = directory / "jaeger.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prometheus_config(rules: list[Path], alertmanager: str, exporter: str, telemetry: str) -> dict:
    """The shipped prometheus.yml with loopback targets, 1 s scrapes and the test's rules."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    assert config["rule_files"] == [path.name for path in RULE_FILES]
    config["rule_files"] = [str(path) for path in rules]
    config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    loopback = {"otel-collector:8889": exporter, "otel-collector:8888": telemetry}
    jobs = []
    for job in config["scrape_configs"]:
        targets = [target for static in job["static_configs"] for target in static["targets"]]
        if all(target in loopback for target in targets):
            job["static_configs"] = [{"targets": [loopback[target] for target in targets]}]
            jobs.append(job)
    assert {job["job_name"] for job in jobs} == {"otel-collector", "otel-collector-internal"}
    config["scrape_configs"] = jobs
    return config


@dataclass
class Stack:
    directory: Path
    collector: Daemon
    collector_env: dict
    jaeger_query: str
    prometheus: PrometheusProcess
    alertmanager: Daemon
    webhook: AlertWebhook
    loki: OtlpHttpReceiver
    engine: ServerProcess
    engine_metrics_port: int
    otlp_endpoint: str
    collector_health: str
    exporter: str
    telemetry: str
    traced: dict = field(default_factory=dict)

    def trace(self, trace_id: str) -> list[dict]:
        """Jaeger's spans of a trace (empty while it has none)."""
        try:
            body = get_json(f"{self.jaeger_query}/api/traces/{trace_id}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return []
            raise
        return [span for trace in body["data"] or [] for span in trace["spans"]]

    def wait_collector_healthy(self) -> None:
        def healthy() -> bool:
            if self.collector.process.poll() is not None:
                raise AssertionError(f"collector exited:\n{self.collector.log()[-3000:]}")
            return http_ok(self.collector_health)

        wait_until(healthy, 60, 0.2, "the collector's health_check")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, jfk) -> Stack:
    directory = tmp_path_factory.mktemp("stack")
    started: list = []
    try:
        # Jaeger v2, in-memory. Its own SDK would export its self-traces to localhost:4317.
        jaeger_otlp, jaeger_query, jaeger_health = free_port(), free_port(), free_port()
        config = jaeger_config(directory, jaeger_otlp, jaeger_query, jaeger_health)
        jaeger = Daemon(
            "jaeger",
            [stack_tool("jaeger"), "--config", f"file:{config}"],
            directory,
            env={"OTEL_TRACES_EXPORTER": "none"},
        )
        started.append(jaeger)
        loki = OtlpHttpReceiver(prefix="/otlp").start()
        started.append(loki)
        webhook = AlertWebhook()
        started.append(webhook)

        alertmanager_port = free_port()
        alertmanager_config = directory / "alertmanager.yml"
        alertmanager_config.write_text(yaml.safe_dump(shortened_alertmanager_config(webhook.url)))
        alertmanager = Daemon(
            "alertmanager",
            [
                tool("prometheus-alertmanager"),
                f"--config.file={alertmanager_config}",
                f"--storage.path={directory / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{alertmanager_port}",
                "--cluster.listen-address=",
            ],
            directory,
        )
        started.append(alertmanager)

        grpc_port, exporter, telemetry, health = free_port(), free_port(), free_port(), free_port()
        collector_env = {
            "OTELCOL_HEALTH_ENDPOINT": f"127.0.0.1:{health}",
            "OTELCOL_ZPAGES_ENDPOINT": f"127.0.0.1:{free_port()}",
            "OTELCOL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}",
            "OTELCOL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
            "JAEGER_OTLP_ENDPOINT": f"127.0.0.1:{jaeger_otlp}",
            "LOKI_OTLP_ENDPOINT": f"{loki.endpoint}/otlp",
            "OTELCOL_PROMETHEUS_ENDPOINT": f"127.0.0.1:{exporter}",
            "OTELCOL_TELEMETRY_HOST": "127.0.0.1",
            "OTELCOL_TELEMETRY_PORT": str(telemetry),
            "DEPLOYMENT_ENVIRONMENT": "ci",
        }
        collector = Daemon(
            "collector",
            [stack_tool("otelcol-stt"), "--config", str(COLLECTOR_CONFIG)],
            directory,
            env=collector_env,
        )
        started.append(collector)

        prometheus = PrometheusProcess(
            prometheus_config(
                shortened_rules(directory),
                f"127.0.0.1:{alertmanager_port}",
                f"127.0.0.1:{exporter}",
                f"127.0.0.1:{telemetry}",
            ),
            directory,
            "--enable-feature=exemplar-storage",
        )
        started.append(prometheus)

        engine_metrics_port = free_port()
        engine = ServerProcess(
            "--max-streams",
            "1",
            "--metrics-port",
            str(engine_metrics_port),
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{grpc_port}",
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
                "OTEL_BLRP_SCHEDULE_DELAY": "200",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci",
            },
        )
        started.append(engine)
        stack = Stack(
            directory=directory,
            collector=collector,
            collector_env=collector_env,
            jaeger_query=f"http://127.0.0.1:{jaeger_query}",
            prometheus=prometheus,
            alertmanager=alertmanager,
            webhook=webhook,
            loki=loki,
            engine=engine,
            engine_metrics_port=engine_metrics_port,
            otlp_endpoint=f"127.0.0.1:{grpc_port}",
            collector_health=f"http://127.0.0.1:{health}/",
            exporter=f"127.0.0.1:{exporter}",
            telemetry=f"127.0.0.1:{telemetry}",
        )
        wait_until(lambda: http_ok(f"http://127.0.0.1:{jaeger_health}/status"), 60, 0.2, "Jaeger's health")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{alertmanager_port}/-/ready"), 60, 0.2, "Alertmanager")
        stack.wait_collector_healthy()
        wait_until(lambda: http_ok(f"http://127.0.0.1:{prometheus.port}/-/ready"), 60, 0.2, "Prometheus")
        engine.wait_ready()
        stack.traced = first_traffic(stack, jfk)
        yield stack
    finally:
        for part in reversed(started):
            part.stop()
        for part in started:
            if isinstance(part, Daemon):
                print(f"--- {part.name} log (tail) ---\n{part.log()[-2000:]}")


def first_traffic(stack: Stack, jfk: np.ndarray) -> dict:
    """What the dashboard needs to show data: a short stream that creates the series, then the
    traced real-time stream with two refused calls (--max-streams 1) while it runs, each scraped
    before the next so that every rate is above zero."""
    with stack.engine.client() as client:
        assert final_transcripts(client.stream_audio(jfk[: 4 * 16000], StreamConfig(), realtime=False))
        client.server_info()
    stack.prometheus.wait_for("sum(stt_realtime_factor_count)", 1, timeout=60)
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream_with_client_span, stack, jfk)
        wait_until(lambda: stack.engine.active_streams() == 1, 30, what="the traced stream to be admitted")
        with stack.engine.client(retries=False) as client:  # each refusal counted once
            for refusals in (1, 2):
                with pytest.raises(grpc.RpcError) as refused:
                    client.recognize(jfk[:16000])
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                stack.prometheus.wait_for("sum(stt_errors_total)", refusals, timeout=60)
        traced = streaming.result(timeout=120)
    stack.prometheus.wait_for("sum(stt_realtime_factor_count)", 2, timeout=60)  # the traced stream ended
    return traced


def stream_with_client_span(stack: Stack, audio: np.ndarray) -> dict:
    """Real speech streamed at real time under a client span exported to the same collector."""
    provider = TracerProvider(resource=Resource.create({"service.name": "stt-e2e-client"}))
    exporter = OTLPSpanExporter(endpoint=stack.otlp_endpoint, insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sent: list = []

    def requests():
        yield StreamConfig().first_request()
        for request in audio_requests(audio, 100, realtime=True):
            sent.append(request)
            yield request

    try:
        tracer = provider.get_tracer("stt-e2e-client")
        with tracer.start_as_current_span("transcribe jfk.wav", kind=SpanKind.CLIENT) as client_span:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            with SpeechClient(stack.engine.target) as client:
                responses = list(client.stream(requests(), metadata=list(carrier.items())))
        context = client_span.get_span_context()
    finally:
        provider.shutdown()
    finals = final_transcripts(responses)
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1, finals
    return {
        "trace_id": format(context.trace_id, "032x"),
        "client_span_id": format(context.span_id, "016x"),
        "chunks": len(sent),
        "ended": time.time(),
    }


# --- what ships is what runs ----------------------------------------------------------------------


def test_the_collector_under_test_is_the_release_compose_ships():
    compose = load_yaml(COMPOSE)["services"]
    assert VERSIONS["OTELCOL_STT_VERSION"] == COLLECTOR_VERSION
    assert compose["otel-collector"]["image"] == f"otel/opentelemetry-collector-contrib:{COLLECTOR_VERSION}"
    assert compose["jaeger"]["image"] == f"jaegertracing/jaeger:{VERSIONS['JAEGER_V2_RELEASE'].lstrip('v')}"
    builder = load_yaml(REPO / ".ci" / "otelcol" / "builder-config.yaml")
    assert builder["dist"]["version"] == COLLECTOR_VERSION
    # Exactly the shipped config's component types, no more: a test against a fatter collector
    # could pass with a config that the compose image refuses, or hide an unused module.
    components = subprocess.run(
        [stack_tool("otelcol-stt"), "components"], capture_output=True, text=True, check=True
    )
    listed = yaml.safe_load(components.stdout)
    kinds = ("receivers", "processors", "exporters", "connectors", "extensions")
    built = {kind: {entry["name"] for entry in listed[kind]} for kind in kinds}
    config = load_yaml(COLLECTOR_CONFIG)
    used = {kind: {name.split("/", 1)[0] for name in config.get(kind, {})} for kind in built}
    assert used == built, (used, built)


def test_otelcol_validate_accepts_the_shipped_config_without_any_environment():
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OTELCOL_", "DEPLOYMENT_"))}

    def otelcol(command: str) -> str:
        done = subprocess.run(
            [stack_tool("otelcol-stt"), command, "--config", str(COLLECTOR_CONFIG)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    otelcol("validate")
    resolved = yaml.safe_load(otelcol("print-config"))
    # The compose defaults apply: DEPLOYMENT_ENVIRONMENT unset stamps "production".
    (environment,) = resolved["processors"]["resource"]["attributes"]
    assert environment["value"] == "production"
    assert resolved["exporters"]["otlp_grpc/jaeger"]["endpoint"] == "jaeger:4317"


# --- traces -----------------------------------------------------------------------------------------


def test_jaeger_returns_the_whole_stream_trace_under_the_client_span(stack):
    traced = stack.traced
    chunks = traced["chunks"]

    def complete() -> list[dict]:
        spans = stack.trace(traced["trace_id"])
        names = Counter(span["operationName"] for span in spans)
        whole = names[STREAMING] == 1 and names["stt.chunk"] == chunks and names["transcribe jfk.wav"] == 1
        return spans if whole else []

    spans = wait_until(complete, 30, 0.5, "Jaeger to hold the whole trace")
    by_id = {span["spanID"]: span for span in spans}
    names = Counter(span["operationName"] for span in spans)
    print("trace as Jaeger returned it:", dict(sorted(names.items())))

    def parent(span: dict) -> dict | None:
        for reference in span["references"]:
            if reference["refType"] == "CHILD_OF" and reference["traceID"] == traced["trace_id"]:
                return by_id.get(reference["spanID"])
        return None

    (client,) = [span for span in spans if span["operationName"] == "transcribe jfk.wav"]
    (server,) = [span for span in spans if span["operationName"] == STREAMING]
    assert client["spanID"] == traced["client_span_id"] and parent(client) is None
    assert parent(server) is client
    # Utterances under the server span; one span per chunk sent, under the utterance its audio
    # belongs to (or the server span, for audio between utterances).
    utterances = [span for span in spans if span["operationName"] == "stt.utterance"]
    assert utterances and all(parent(span) is server for span in utterances)
    # Each utterance shows the conditions of its audio and how sure the model was of its final.
    for span in utterances:
        tags = {tag["key"]: tag["value"] for tag in span["tags"]}
        assert -20 < tags["stt.audio.speech_level"] < -10 and 20 < tags["stt.audio.snr"] < 30, tags
        assert tags["stt.audio.bandwidth"] >= 5000 and tags["stt.audio.clipped_share"] == 0, tags
        assert 0.5 < tags["stt.recognition.confidence"] <= 1, tags
    chunk_spans = [span for span in spans if span["operationName"] == "stt.chunk"]
    indexes = sorted(
        tag["value"] for span in chunk_spans for tag in span["tags"] if tag["key"] == "stt.chunk.index"
    )
    assert indexes == list(range(chunks))
    under = Counter(parent(span)["operationName"] for span in chunk_spans)
    assert set(under) == {STREAMING, "stt.utterance"} and under["stt.utterance"] > chunks // 2, under
    # Decode spans linked (FOLLOWS_FROM in Jaeger's model) to the chunks whose audio they decoded.
    for kind in ("interim", "final"):
        decodes = [span for span in spans if span["operationName"] == f"stt.decode.{kind}"]
        assert decodes, f"no stt.decode.{kind} span"
        for decode in decodes:
            links = [ref for ref in decode["references"] if ref["refType"] == "FOLLOWS_FROM"]
            linked = {by_id[ref["spanID"]]["operationName"] for ref in links}
            assert linked == {"stt.chunk"}, decode
    processes = get_json(f"{stack.jaeger_query}/api/traces/{traced['trace_id']}")["data"][0]["processes"]
    services = {process["serviceName"] for process in processes.values()}
    assert services == {"stt-engine", "stt-e2e-client"}


# --- metrics ----------------------------------------------------------------------------------------


def exposed_names(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {line.split("{")[0].split(" ")[0] for line in lines}


def test_prometheus_answers_every_dashboard_and_alert_query_through_the_collector(stack, jfk):
    up = stack.prometheus.query('up{job=~"otel-collector.*"}')
    assert {series["metric"]["job"]: series["value"][1] for series in up} == {
        "otel-collector": "1",
        "otel-collector-internal": "1",
    }
    # A fresh stream, so that the SLO ratios the test's rules record over 20 s windows exist (a
    # window without events records nothing) when the dashboard queries them.
    with stack.engine.client() as client:
        assert final_transcripts(client.stream_audio(jfk[: 4 * 16000], StreamConfig(), realtime=False))
    slo_series = [f'{rule["record"]}{{slo="{rule["labels"]["slo"]}"}}' for rule in recording_rules()]
    wait_until(
        lambda: all(finite_values(stack.prometheus.query(series)) for series in slo_series),
        30,
        0.2,
        "every SLO ratio recorded from the fresh stream",
    )
    empty = []
    for title, target in dashboard_prometheus_targets():
        expr = grafana_to_promql(target["expr"])
        if not finite_values(stack.prometheus.query(expr)) and expr not in DASHBOARD_NO_DATA_REASONS:
            empty.append(f"{title}: {expr}")
    for rule in alert_rules():
        stack.prometheus.query(rule["expr"])
        if not finite_values(stack.prometheus.query(value_expression(rule["expr"]))):
            empty.append(f"{rule['alert']}: {value_expression(rule['expr'])}")
    # The SLO rules as shipped (5m to 3d windows): the buckets they count (le="1.5", le="1" or
    # "1.0") are the ones the collector's exporter serves.
    for rule in recording_rules():
        if not finite_values(stack.prometheus.query(rule["expr"])):
            empty.append(f"{rule['record']}{{slo={rule['labels']['slo']}}}: {rule['expr']}")
    for rule in slo_alert_rules():
        stack.prometheus.query(rule["expr"])  # evaluates; empty while no budget burns
    assert not empty, "no data through the collector:\n" + "\n".join(empty)
    groups = stack.prometheus.api("/api/v1/rules")["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == sum(len(rules_of(path)) for path in RULE_FILES)
    assert all(rule["health"] == "ok" for rule in loaded), [(r["name"], r.get("lastError")) for r in loaded]
    # The collector's exporter and the engine's own --metrics-port serve the same engine names,
    # so the dashboard works on either (collector-config.yaml promises it).
    through_collector = exposed_names(f"http://{stack.exporter}/metrics")
    direct = exposed_names(f"http://127.0.0.1:{stack.engine_metrics_port}/metrics")
    engine_names = {name for name in direct if name.startswith(("stt_", "rpc_"))}
    assert engine_names and engine_names <= through_collector, engine_names - through_collector
    print("engine series through the collector:", sorted(engine_names))
    print("span metrics:", sorted(n for n in through_collector if n.startswith("traces_span_metrics")))


def test_the_dashboard_shows_calls_of_all_three_apis_by_rpc_method(stack, jfk):
    """A Google and a Riva call through their official clients reach Prometheus through the
    collector with their own rpc_method, which the dashboard's calls panels group by."""
    import riva.client
    from google.cloud import speech_v1 as speech
    from google.cloud.speech_v1.services.speech.transports import SpeechGrpcTransport

    from engine.audio import float_to_linear16

    pcm = float_to_linear16(jfk[: 3 * 16000])
    with grpc.insecure_channel(stack.engine.target) as channel:
        google = speech.SpeechClient(transport=SpeechGrpcTransport(channel=channel))
        encoding = speech.RecognitionConfig.AudioEncoding.LINEAR16
        google.recognize(
            config=speech.RecognitionConfig(
                encoding=encoding, sample_rate_hertz=16000, language_code="en-US"
            ),
            audio=speech.RecognitionAudio(content=pcm),
        )
    asr = riva.client.ASRService(riva.client.Auth(uri=stack.engine.target))
    riva_config = riva.client.RecognitionConfig(
        encoding=riva.client.AudioEncoding.LINEAR_PCM, sample_rate_hertz=16000, language_code="en-US"
    )
    asr.offline_recognize(pcm, riva_config)
    called = {"google.cloud.speech.v1.Speech/Recognize", "nvidia.riva.asr.RivaSpeechRecognition/Recognize"}
    methods = f'rpc_server_call_duration_seconds_count{{rpc_method=~"{"|".join(sorted(called))}"}}'
    stack.prometheus.wait_for(f"count(count by (rpc_method) ({methods}))", 2, timeout=60)
    panels = [
        grafana_to_promql(target["expr"])
        for _, target in dashboard_prometheus_targets()
        if "rpc_server_call_duration_seconds" in target["expr"] and "rpc_method" in target["expr"]
    ]
    assert panels
    for expr in panels:  # a rate needs two scrapes of the new series

        def shown(expr: str = expr) -> bool:
            return called <= {series["metric"].get("rpc_method") for series in stack.prometheus.query(expr)}

        wait_until(shown, 60, 0.5, f"{expr} to show the Google and Riva calls")


def test_the_runbook_names_the_collector_self_metrics_as_prometheus_stores_them(stack):
    runbook = (REPO / "docs" / "runbook.md").read_text()
    named = set(re.findall(r"\b(otelcol_[a-z_]+)", runbook))
    assert named, "the runbook names no collector metric"
    names = stack.prometheus.api('/api/v1/label/__name__/values?match[]={job="otel-collector-internal"}')
    stored = set(names["data"])
    print("collector self-metrics:", sorted(name for name in stored if name.startswith("otelcol_")))

    # A failure counter exists only once something failed; its success sibling, from the same
    # component, proves the name (same prefix, same suffix rules).
    def seen(name: str) -> bool:
        return (
            name in stored
            or name.replace("_refused_", "_accepted_").replace("_send_failed_", "_sent_") in stored
        )

    unknown = sorted(name for name in named if not seen(name))
    assert not unknown, f"named in docs/runbook.md, unknown to the collector: {unknown}"


def test_an_exemplar_on_final_latency_leads_to_a_trace_jaeger_has(stack):
    now = time.time()

    def exemplars() -> list[dict]:
        query = urllib.parse.urlencode(
            {"query": "stt_final_latency_seconds_bucket", "start": now - 600, "end": time.time()}
        )
        data = stack.prometheus.api(f"/api/v1/query_exemplars?{query}")["data"]
        return [exemplar for series in data for exemplar in series["exemplars"]]

    found = wait_until(exemplars, 30, 0.5, "an exemplar on stt_final_latency_seconds_bucket")
    trace_ids = {exemplar["labels"]["trace_id"] for exemplar in found}
    assert stack.traced["trace_id"] in trace_ids, trace_ids
    for trace_id in trace_ids:
        assert stack.trace(trace_id), f"exemplar trace {trace_id} is not in Jaeger"


# --- logs -------------------------------------------------------------------------------------------


def test_the_logs_leg_carries_what_loki_indexes(stack):
    trace_id = bytes.fromhex(stack.traced["trace_id"])

    def stream_logs() -> list:
        return [
            (resource, record)
            for request in list(stack.loki.logs)
            for resource in request.resource_logs
            for scope in resource.scope_logs
            for record in scope.log_records
            if record.trace_id == trace_id
        ]

    records = wait_until(stream_logs, 30, 0.2, "log records of the stream at the Loki endpoint")
    for resource, record in records:
        attributes = {kv.key: kv.value.string_value for kv in resource.resource.attributes}
        # Loki's default index labels from resource attributes: service_name, and the
        # deployment environment the collector's resource processor stamps.
        assert attributes["service.name"] == "stt-engine"
        assert attributes["deployment.environment.name"] == "ci"
        # trace_id and span_id become structured metadata.
        assert len(record.span_id) == 8 and record.span_id != bytes(8)
    spans = {span["spanID"] for span in stack.trace(stack.traced["trace_id"])}
    assert {record.span_id.hex() for _, record in records} <= spans


# --- alerts -----------------------------------------------------------------------------------------


AVAILABILITY_PAGE = {"alertname": "STTAvailabilityErrorBudgetBurn", "long_window": "1h"}


def test_refused_streams_page_on_the_availability_budget_through_alertmanager_and_it_resolves(stack, jfk):
    """The fast-burn page of the availability SLO (1h and 5m windows, both 20 s here)."""
    webhook = stack.webhook
    page = ",".join(f'{label}="{value}"' for label, value in AVAILABILITY_PAGE.items())
    # The first traffic's two refusals may have fired it already: start from a quiet state.
    wait_until(
        lambda: not stack.prometheus.query(f"ALERTS{{{page}}}"),
        90,
        0.5,
        "no availability page pending or firing",
    )
    good = BackgroundStream(stack.engine.target, jfk, JFK_TEXT)
    good.wait_started()
    wait_until(lambda: stack.engine.active_streams() == 1, 10, what="the good stream to be admitted")
    burst_at = time.time()
    with stack.engine.client(retries=False) as client:  # ten refusals, not ten retried calls
        for _ in range(10):  # beyond --max-streams 1: RESOURCE_EXHAUSTED, a server-side failure
            with pytest.raises(grpc.RpcError) as refused:
                client.recognize(jfk[:16000])
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    good.check()

    def notified(status: str, since: float) -> list:
        return [
            (at, alert)
            for at, alert in webhook.alerts(AVAILABILITY_PAGE["alertname"], status)
            if at > since and alert["labels"]["long_window"] == AVAILABILITY_PAGE["long_window"]
        ]

    fired = wait_until(lambda: notified("firing", burst_at), 60, 0.2, "the page to fire")
    fired_at, alert = fired[0]
    resolved = wait_until(lambda: notified("resolved", fired_at), 120, 0.2, "it to resolve")
    resolved_at, _ = resolved[0]
    print(
        f"availability page: burst at {time.strftime('%H:%M:%S', time.gmtime(burst_at))}, "
        f"fired {alert['startsAt']} (webhook +{fired_at - burst_at:.1f} s), "
        f"resolved {resolved[0][1]['endsAt']} (webhook +{resolved_at - burst_at:.1f} s)"
    )
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["slo"] == "availability" and alert["labels"]["short_window"] == "5m"
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#sttavailabilityerrorbudgetburn"
    assert resolved_at > fired_at


# --- losing the collector ---------------------------------------------------------------------------


def engine_counter(stack: Stack, name: str) -> float:
    """A counter's total as the engine itself serves it on --metrics-port."""
    url = f"http://127.0.0.1:{stack.engine_metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if re.match(rf"{name}(\{{| )", line))


def test_killing_the_collector_mid_stream_loses_telemetry_not_the_stream(stack, jfk):
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream_with_client_span, stack, jfk)
        wait_until(lambda: stack.engine.active_streams() == 1, 10, what="the stream to be admitted")
        time.sleep(2)  # into the stream: its chunk spans are being exported
        stack.collector.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(3)
        stack.collector.start()
        stack.wait_collector_healthy()
        down = time.monotonic() - killed_at
        traced = streaming.result(timeout=120)  # the right transcript, no error
    assert stack.engine.client().health() == "SERVING"
    # Metrics are cumulative sums: what was counted while the collector was down arrives with the
    # next export. Prometheus ends with exactly the engine's own count.
    chunks_counted = engine_counter(stack, "stt_chunks_total")
    stack.prometheus.wait_for("sum(stt_chunks_total)", chunks_counted, timeout=60)
    # Spans that ended after the restart all arrive: the server span, the client span, decodes.
    wait_until(
        lambda: Counter(s["operationName"] for s in stack.trace(traced["trace_id"]))["transcribe jfk.wav"],
        30,
        0.5,
        "the stream's client span after the restart",
    )
    deadline = time.monotonic() + 10  # retried exports still landing
    while True:
        names = Counter(span["operationName"] for span in stack.trace(traced["trace_id"]))
        if names["stt.chunk"] == traced["chunks"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert names[STREAMING] == 1 and names["stt.decode.final"] >= 1 and names["stt.utterance"] >= 1
    lost = traced["chunks"] - names["stt.chunk"]
    print(f"collector down {down:.1f} s: {lost} of {traced['chunks']} chunk spans lost; kept {dict(names)}")
    # The engine's exporter retries a refused export (backoff up to its 10 s timeout), so an outage
    # this short loses nothing on the engine side. What is lost is what the killed collector had
    # accepted and not yet sent: its batch processor holds up to 2 s of spans (timeout: 2s), fed
    # every 0.2 s by the SDK (OTEL_BSP_SCHEDULE_DELAY), i.e. at most 22 chunks of 100 ms, and a
    # chunk span ends a little after its audio arrives.
    assert lost <= 25
