"""The deployment and observability stack around the engine, checked with the real tools.

- Prometheus config and alert rules: ``promtool check config``, ``promtool check rules`` and the
  rule unit tests (``promtool test rules``), each alert firing and not firing.
- Alertmanager config: ``amtool check-config``, its commented receivers included.
- A real Prometheus scrapes a real engine (``--metrics-port``) while real streams run, with the
  alert rules loaded, and evaluates every PromQL expression of the dashboard and the rules, and
  the prometheus-adapter query the HPA scales on.
- Kubernetes manifests against the Kubernetes schemas (``kubernetes-validate`` bundles them); the
  HPA's targets against STT_MAX_STREAMS and the measured CPU cost (BENCHMARKS.md).
- docker-compose.yml against the compose-spec schema (vendored by ``check-jsonschema``).
- Dockerfile with ``hadolint``; its HEALTHCHECK command run against a live engine.
- Grafana provisioning: the trace/metrics/logs correlations, and metric names that exist.
- Collector config: every pipeline component defined, and a component of the pinned release.

Docker itself cannot run here, so images are not built: the files are validated statically.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import re
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from engine.audio import read_audio_file
from engine.client import StreamConfig, final_transcripts
from tests.helpers import (
    REPO,
    SAMPLE,
    PrometheusProcess,
    ServerProcess,
    free_port,
    stack_tool,
    tool,
    wait_until,
)

DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
SLO_RULES = PROMETHEUS_DIR / "slo.rules.yml"  # generated from deploy/slo/stt-engine.yaml
RULE_FILES = (ALERTS, SLO_RULES)
RULE_TESTS = {ALERTS: PROMETHEUS_DIR / "alerts_test.yml", SLO_RULES: PROMETHEUS_DIR / "slo_rules_test.yml"}
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stt-engine.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
K8S = DEPLOY / "k8s"
K8S_TLS = DEPLOY / "k8s-tls"
COMPOSE = REPO / "docker-compose.yml"
COLLECTOR_CONFIG = REPO / "collector-config.yaml"
DOCKERFILE = REPO / "Dockerfile"
RUNBOOK = REPO / "docs" / "runbook.md"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
BENCHMARKS = REPO / "BENCHMARKS.md"
COLLECTOR_VERSION = "0.165.0"  # otel/opentelemetry-collector-contrib image pinned in docker-compose.yml


def load_yaml(path: Path):
    with path.open() as handle:
        return yaml.safe_load(handle)


def load_yaml_all(path: Path) -> list:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def run(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def rules_of(path: Path) -> list[dict]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict]:
    """The threshold alerts (alerts.yml): each compares one value with a threshold."""
    return [rule for rule in rules_of(ALERTS) if "alert" in rule]


def slo_alert_rules() -> list[dict]:
    """The SLO burn-rate alerts (slo.rules.yml): two recorded error ratios against a factor."""
    return [rule for rule in rules_of(SLO_RULES) if "alert" in rule]


def every_alert_rule() -> list[dict]:
    return alert_rules() + slo_alert_rules()


def recording_rules() -> list[dict]:
    return [rule for path in RULE_FILES for rule in rules_of(path) if "record" in rule]


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in load_dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_prometheus_targets() -> list[tuple[str, dict]]:
    """(panel title, target) for every Prometheus query of the dashboard."""
    found = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            datasource = target.get("datasource") or panel.get("datasource") or {}
            if datasource.get("type") == "prometheus":
                found.append((panel["title"], target))
    return found


# --- PromQL helpers -------------------------------------------------------------------------------

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_KEYWORDS |= {"bool", "offset", "inf", "nan"}


def grafana_to_promql(expr: str) -> str:
    """Grafana's template variables replaced the way Grafana would, for a 1 s scrape."""
    for variable in ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}"):
        expr = expr.replace(variable, "1m")
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label lists and functions removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)  # `offset 1w`: not a metric `w`
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() in PROMQL_KEYWORDS or re.fullmatch(r"\d.*", match.group(0)):
            continue
        names.add(match.group(0))
    return names


def value_expression(expr: str) -> str:
    """The quantity an alert compares: ``X > 2`` -> ``X``; ``absent(X)`` -> ``X``."""
    expr = expr.strip()
    absent = re.fullmatch(r"absent\((.*)\)", expr, re.S)
    if absent:
        return absent.group(1).strip()
    compared = re.fullmatch(r"(.*?)\s*(?:>=|<=|==|!=|>|<)\s*[-+]?[0-9.]+(?:e[-+]?\d+)?", expr, re.S)
    assert compared, f"alert expression is not `value <op> threshold` nor absent(): {expr}"
    return compared.group(1).strip()


# --- promtool -------------------------------------------------------------------------------------


def test_promtool_check_config():
    result = run(tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda path: path.name)
def test_promtool_check_rules(rule_file: Path):
    result = run(tool("promtool"), "check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules_of(rule_file))} rules found" in result.stdout


def fires_in(rule: dict, check: dict) -> bool:
    """Whether a promtool alert check expects this rule's alert: promtool compares the whole set
    of alerts of that name, so a check of the name that does not list it expects it silent."""
    return any(
        rule["labels"].items() <= expected.get("exp_labels", {}).items()
        for expected in check.get("exp_alerts") or []
    )


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda path: path.name)
def test_promtool_rule_unit_tests_fire_and_do_not_fire_every_alert(rule_file: Path):
    tests = RULE_TESTS[rule_file]
    result = run(tool("promtool"), "test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert load_yaml(tests)["rule_files"] == [rule_file.name]

    # Every alert rule is tested both ways: some case expects it, some case expects it silent.
    # An SLO alert is one rule per window pair, told apart by its labels (slo, long_window).
    checks = [check for case in load_yaml(tests)["tests"] for check in case.get("alert_rule_test", [])]
    untested = {"firing": [], "silent": []}
    for rule in [rule for rule in rules_of(rule_file) if "alert" in rule]:
        outcomes = {fires_in(rule, check) for check in checks if check["alertname"] == rule["alert"]}
        name = f"{rule['alert']} {rule['labels']}"
        if True not in outcomes:
            untested["firing"].append(name)
        if False not in outcomes:
            untested["silent"].append(name)
    assert untested == {"firing": [], "silent": []}


def github_anchor(heading: str) -> str:
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return anchor.replace(" ", "-")


def test_every_alert_has_severity_and_a_runbook_section():
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if re.match(r"#{1,6} ", line)
    }
    rules = every_alert_rule()
    assert len(alert_rules()) >= 6 and len(slo_alert_rules()) >= 12
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md", url
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/runbook.md"
    severities = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}
    assert severities["STTModelNotLoaded"] == "critical"
    assert severities["STTMemoryHigh"] == "warning"
    # Each SLO pages (critical) on its fast burns and makes a ticket (warning) of its slow ones.
    by_slo: dict[str, set[tuple[str, str]]] = {}
    for rule in slo_alert_rules():
        by_slo.setdefault(rule["labels"]["slo"], set()).add(
            (rule["labels"]["long_window"], rule["labels"]["severity"])
        )
    expected = {("1h", "critical"), ("6h", "critical"), ("1d", "warning"), ("3d", "warning")}
    assert by_slo == dict.fromkeys(("availability", "final-latency", "first-result"), expected)


# --- Alertmanager ---------------------------------------------------------------------------------


def amtool_check_config(path: Path) -> subprocess.CompletedProcess:
    return run(tool("amtool"), "check-config", str(path))


def test_alertmanager_config_passes_amtool_with_its_example_receivers(tmp_path: Path):
    result = amtool_check_config(ALERTMANAGER_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # The commented Slack and PagerDuty receivers are valid once uncommented.
    examples = re.sub(r"^  # (?=[- ])", "  ", ALERTMANAGER_CONFIG.read_text(), flags=re.M)
    assert {receiver["name"] for receiver in yaml.safe_load(examples)["receivers"]} == {
        "webhook",
        "slack",
        "pagerduty",
    }
    uncommented = tmp_path / "examples.yml"
    uncommented.write_text(examples)
    result = amtool_check_config(uncommented)
    assert result.returncode == 0, result.stdout + result.stderr
    # amtool does reject a route to a receiver that is not defined.
    broken = load_yaml(ALERTMANAGER_CONFIG)
    broken["route"]["routes"][0]["receiver"] = "nobody"
    broken_path = tmp_path / "broken.yml"
    broken_path.write_text(yaml.safe_dump(broken))
    assert amtool_check_config(broken_path).returncode != 0


def test_alertmanager_matchers_name_real_alerts_severities_and_jobs():
    config = load_yaml(ALERTMANAGER_CONFIG)
    known = {
        "alertname": {rule["alert"] for rule in every_alert_rule()},
        "severity": {rule["labels"]["severity"] for rule in every_alert_rule()},
        "job": {job["job_name"] for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]},
    }
    matchers = [matcher for route in config["route"]["routes"] for matcher in route["matchers"]]
    for rule in config["inhibit_rules"]:
        matchers += rule["source_matchers"] + rule["target_matchers"]
    assert matchers
    for matcher in matchers:
        label, value = re.fullmatch(r'(\w+)="([^"]*)"', matcher).groups()
        assert value in known[label], matcher


# --- a real Prometheus against a real engine --------------------------------------------------------


@dataclass
class Live:
    prometheus: PrometheusProcess
    metrics_text: str
    server: ServerProcess
    # Prometheus' scrapes just before and just after the real-time stream (Unix seconds).
    realtime_scrapes: tuple[float, float] = (0.0, 0.0)

    def query(self, expr: str) -> list:
        return self.prometheus.query(expr)

    def api(self, path: str) -> dict:
        return self.prometheus.api(path)


def finite_values(result: list) -> list[float]:
    values = [float(series["value"][1]) for series in result]
    return [value for value in values if math.isfinite(value)]


def rules_evaluated_since(prometheus: PrometheusProcess, moment: datetime.datetime) -> bool:
    groups = prometheus.api("/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return bool(rules) and all(
        datetime.datetime.fromisoformat(rule["lastEvaluation"][:26].rstrip("Z") + "+00:00") > moment
        for rule in rules
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Engine (--metrics-port, --max-streams 1, the Deployment's resource attributes) scraped every
    second by Prometheus with the alert and SLO rules loaded, after a short fast stream (and a
    clipped and a repeating one), a real-time stream and two refused streams."""
    metrics_port = free_port()
    server = ServerProcess(
        "--metrics-port",
        str(metrics_port),
        "--max-streams",
        "1",
        env={
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            # The pod's identity as deploy/k8s/deployment.yaml gives it (the HPA's metric needs it).
            "OTEL_RESOURCE_ATTRIBUTES": deployment_env()["OTEL_RESOURCE_ATTRIBUTES"],
        },
    )
    prometheus = PrometheusProcess(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [
                {"job_name": "stt-engine", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
            ],
        },
        tmp_path_factory.mktemp("prometheus"),
    )
    live = Live(prometheus, "", server)
    try:
        server.wait_ready()
        jfk = read_audio_file(SAMPLE)
        with server.client() as client:
            # Creates the per-call series (call duration, realtime factor) that the real-time
            # stream below then increments, so their rates are not zero.
            assert final_transcripts(client.stream_audio(jfk[: 4 * 16000], StreamConfig(), realtime=False))
            # Series that clean speech never makes, for the quality panels and alerts. The same
            # 4 s 20 dB too loud: a clipped utterance (stt_audio_flagged_utterances_total).
            loud = np.clip(jfk[: 4 * 16000] * 10, -1, 1)
            assert final_transcripts(client.stream_audio(loud, StreamConfig(), realtime=False))
            # "Ask what you can do for your country." eight times over (22.4 s): a text that
            # repeats itself, so a temperature fallback (compression_ratio) and a loop cut
            # (stt_recognition_fallbacks_total, stt_recognition_repairs_total).
            repeated = np.concatenate([jfk[8 * 16000 : int(10.8 * 16000)]] * 8)
            assert final_transcripts(client.stream_audio(repeated, StreamConfig(), realtime=False))
            client.server_info()
        # All three scraped before the real-time stream, whose end must then raise the count.
        prometheus.wait_for("sum(stt_realtime_factor_count)", 3)
        before = last_scrape(prometheus)
        finals: list[str] = []

        def stream_in_real_time() -> None:
            with server.client() as client:
                finals.extend(final_transcripts(client.stream_audio(jfk, StreamConfig(), realtime=True)))

        realtime = threading.Thread(target=stream_in_real_time, daemon=True)
        realtime.start()
        wait_until(lambda: server.active_streams() == 1, 10, what="the real-time stream to be admitted")
        with server.client() as client:
            for refusals in (1, 2):  # beyond --max-streams 1: RESOURCE_EXHAUSTED, a server-side error
                with pytest.raises(grpc.RpcError) as refused:
                    final_transcripts(client.stream_audio(jfk[:16000], StreamConfig(), realtime=False))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                # Scraped before the next one, so the error counter's rate is not zero.
                prometheus.wait_for("sum(stt_errors_total)", refusals)
        assert realtime.is_alive(), "the real-time stream ended before the refusals"
        realtime.join(timeout=60)
        assert finals, "the real-time stream produced no final"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            live.metrics_text = response.read().decode()
        prometheus.wait_for("sum(stt_realtime_factor_count)", 4)  # the end of the real-time stream
        live.realtime_scrapes = (before, last_scrape(prometheus))
        ended = datetime.datetime.now(datetime.UTC)
        wait_until(lambda: rules_evaluated_since(prometheus, ended), 30, 0.2, "rule evaluations after it")
        yield live
    finally:
        prometheus.stop()
        assert server.stop() == 0


def last_scrape(prometheus: PrometheusProcess) -> float:
    """Unix time of Prometheus' latest scrape of the engine."""
    return float(prometheus.query("max(timestamp(stt_realtime_factor_count))")[0]["value"][1])


def test_prometheus_scrapes_the_engine_and_sees_its_streams(live):
    up = live.query('up{job="stt-engine"}')
    assert up and up[0]["value"][1] == "1"
    # The real-time stream's finals alone: the fast streams before it arrive all at once, and
    # the repeating one's temperature fallbacks keep its finals waiting for seconds.
    before, after = live.realtime_scrapes
    window = f"{round((after - before) * 1000) + 500}ms"  # the scrape before it included
    p95 = live.prometheus.query(
        f"histogram_quantile(0.95, sum by (le) (increase(stt_final_latency_seconds_bucket[{window}])))",
        at=after,
    )
    assert p95 and 0 < float(p95[0]["value"][1]) < 5
    finals_total = live.query('sum(stt_results_total{stt_result_kind="final"})')
    assert float(finals_total[0]["value"][1]) >= 3  # the short stream's and the real-time stream's
    audio = live.query("sum(stt_audio_received_seconds_total)")
    # 4 s clean, 4 s clipped, 22.4 s repeated, 11 s in real time; refusals send none.
    assert float(audio[0]["value"][1]) == pytest.approx(41.4, abs=0.1)


def exported_names(metrics_text: str) -> set[str]:
    names = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names


# `up` is made by Prometheus for each scrape target, never exported by the engine.
SYNTHETIC_METRICS = {"up"}


def recorded_names() -> set[str]:
    """Series the rules record (stt:slo_errors:ratio_rate5m, ...): queries may use them too."""
    return {rule["record"] for rule in recording_rules()}


def test_dashboard_and_alerts_use_only_metrics_the_engine_exports(live):
    exported = exported_names(live.metrics_text)
    expressions = [target["expr"] for _, target in dashboard_prometheus_targets()]
    expressions += [rule["expr"] for rule in every_alert_rule() + recording_rules()]
    used = set().union(*(metric_names(grafana_to_promql(expr)) for expr in expressions))
    assert {
        "stt_final_latency_seconds_bucket",
        "stt_first_interim_latency_seconds_bucket",
        "rpc_server_call_duration_seconds_count",
    } <= used
    unknown = used - exported - SYNTHETIC_METRICS - recorded_names()
    assert not unknown, f"not exported by the engine: {sorted(unknown)}"


# Dashboard queries that may legitimately return no finite value after this short run, and why.
DASHBOARD_NO_DATA_REASONS: dict[str, str] = {
    "sum(rate(stt_recognition_confidence_sum[1m] offset 1w))"
    " / sum(rate(stt_recognition_confidence_count[1m] offset 1w))": (
        "the confidence of a week earlier: a Prometheus started for the test has no week-old data"
    ),
}


def test_every_dashboard_query_returns_data_from_real_prometheus(live):
    targets = dashboard_prometheus_targets()
    assert len(targets) >= 20
    # Every excused query is one of the dashboard's (an excuse outlives no query).
    assert set(DASHBOARD_NO_DATA_REASONS) <= {grafana_to_promql(target["expr"]) for _, target in targets}
    empty = []
    for title, target in targets:
        expr = grafana_to_promql(target["expr"])
        result = live.query(expr)
        if not finite_values(result) and expr not in DASHBOARD_NO_DATA_REASONS:
            empty.append(f"{title}: {expr} -> {result}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_every_alert_expression_evaluates_on_real_data(live):
    for rule in alert_rules():
        live.query(rule["expr"])  # the whole rule evaluates (status success)
        value = value_expression(rule["expr"])
        assert finite_values(live.query(value)), f"{rule['alert']}: {value} returned no data"
    # Prometheus itself loaded both rule files and has evaluated every rule without error
    # (the fixture waited for an evaluation after the traffic).
    groups = live.api("/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == sum(len(rules_of(path)) for path in RULE_FILES)
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    errors = live.query("sum by (stt_error_reason) (stt_errors_total)")
    assert {series["metric"]["stt_error_reason"] for series in errors} == {"STT_TOO_MANY_STREAMS"}


def test_every_slo_ratio_is_recorded_from_real_data(live):
    """Each SLO's error ratio over every window, from the engine's own exposition: the latency
    SLOs' bucket bounds (le) match what it exports, and its refusals count as server errors."""
    for rule in recording_rules():
        slo = rule["labels"]["slo"]
        values = finite_values(live.query(f'{rule["record"]}{{slo="{slo}"}}'))
        assert len(values) == 1 and 0 <= values[0] <= 1, (rule["record"], slo, values)
    # Two refused streams (RESOURCE_EXHAUSTED) among a handful of calls.
    (availability,) = finite_values(live.query('stt:slo_errors:ratio_rate5m{slo="availability"}'))
    assert 0 < availability < 1
    objectives = live.query("stt:slo_objective:ratio")
    assert {series["metric"]["slo"]: float(series["value"][1]) for series in objectives} == {
        "availability": 0.995,
        "final-latency": 0.99,
        "first-result": 0.95,
    }
    # One spelling of the whole bound 1 s (the rules match "1" and "1.0"), and the 1.5 s bound.
    buckets = live.query(r'count by (le) (stt_first_interim_latency_seconds_bucket{le=~"1|1\\.0|1\\.5"})')
    assert {series["metric"]["le"] for series in buckets} in ({"1", "1.5"}, {"1.0", "1.5"}), buckets


def dockerfile_healthcheck() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    assert match, "no exec-form HEALTHCHECK in the Dockerfile"
    return json.loads(match.group(1))


def test_the_image_healthcheck_command_probes_grpc_health(live):
    command = dockerfile_healthcheck()
    # The plaintext health-only port (STT_HEALTH_ADDRESS in the image), so TLS changes nothing.
    assert command[:2] == ["python", "-c"] and "127.0.0.1:50052" in command[2]
    assert re.search(r"STT_HEALTH_ADDRESS=0\.0\.0\.0:50052", DOCKERFILE.read_text())
    serving = subprocess.run(
        [sys.executable, "-c", command[2].replace("127.0.0.1:50052", live.server.target)], timeout=30
    )
    assert serving.returncode == 0
    nobody = subprocess.run(
        [sys.executable, "-c", command[2].replace("127.0.0.1:50052", f"127.0.0.1:{free_port()}")],
        capture_output=True,
        timeout=30,
    )
    assert nobody.returncode != 0


# --- Kubernetes --------------------------------------------------------------------------------------

K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest Kubernetes we claim


def manifest_key(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def k8s_documents() -> dict[str, dict]:
    """The manifests by ``Kind/name``."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_all(path):
            docs[manifest_key(doc)] = doc
    return docs


def test_kubernetes_manifests_validate_against_the_schemas():
    import kubernetes_validate

    docs = k8s_documents()
    assert set(docs) == {
        "Deployment/stt-engine",
        "Service/stt-engine",
        "Service/stt-engine-headless",
        "HorizontalPodAutoscaler/stt-engine",
        "PodDisruptionBudget/stt-engine",
    }
    for version in K8S_VERSIONS:
        for doc in docs.values():
            kubernetes_validate.validate(doc, version, strict=True)
    # The validator does reject a broken manifest (it works offline, with its bundled schemas).
    broken = copy.deepcopy(docs["Deployment/stt-engine"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    typo = copy.deepcopy(docs["Service/stt-engine-headless"])
    typo["spec"]["clusterIp"] = "None"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)


def test_kustomization_renders_valid_manifests():
    import kubernetes_validate

    result = run(stack_tool("kustomize"), "build", str(K8S))
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(manifest_key(doc) for doc in rendered) == sorted(k8s_documents())
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stt-engine"


def test_deployment_probes_drain_and_telemetry():
    docs = k8s_documents()
    deployment = docs["Deployment/stt-engine"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["STT_ADDRESS"] == "0.0.0.0:50051"  # kubelet probes the pod IP
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://") and env[
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ].endswith(":4317")
    # kubelet's gRPC probes cannot speak TLS: they use the plaintext health-only port, which
    # the engine opens at STT_HEALTH_ADDRESS whether TLS is on or off.
    assert env["STT_HEALTH_ADDRESS"] == "0.0.0.0:50052"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 50051, "health": 50052}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50052, probe
    assert container["readinessProbe"]["grpc"]["service"] == "stt.v1.Speech"
    assert container["startupProbe"]["grpc"]["service"] == "stt.v1.Speech"
    assert container["livenessProbe"]["grpc"]["service"] == ""
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    # The grace period covers preStop, the drain, finalising open utterances and the flush.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + float(env["STT_DRAIN_SECONDS"]) + 30
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"] == "2Gi"
    assert pod["securityContext"]["runAsNonRoot"] is True
    # A ClusterIP Service for meshes and proxies (which do not balance headless ones), a
    # headless one for clients balancing each stream over the pods (round_robin over DNS).
    service, headless = docs["Service/stt-engine"]["spec"], docs["Service/stt-engine-headless"]["spec"]
    assert "clusterIP" not in service and headless["clusterIP"] == "None"
    for spec in (service, headless):
        assert spec["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert spec["ports"][0]["port"] == 50051
    assert float(env["STT_MAX_CONNECTION_AGE_SECONDS"]) > 0  # balancing clients re-resolve
    assert docs["PodDisruptionBudget/stt-engine"]["spec"]["selector"] == deployment["spec"]["selector"]


# The downward-API fields of a pod of the Deployment, for tests that run the engine as that pod.
POD_FIELDS = {
    "metadata.name": "stt-engine-5f7d9c8b6d-x2x4q",
    "metadata.namespace": "speech",
    "spec.nodeName": "node-1",
}


def deployment_env() -> dict[str, str]:
    """The engine container's environment as kubelet builds it for a pod with ``POD_FIELDS``:
    downward-API fields filled in, `$(VAR)` references to earlier variables expanded."""
    (container,) = k8s_documents()["Deployment/stt-engine"]["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for item in container["env"]:
        if "valueFrom" in item:
            env[item["name"]] = POD_FIELDS[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda match: env[match.group(1)], item["value"])
    return env


def hpa_metric(kind: str) -> dict:
    (metric,) = [
        metric[kind[0].lower() + kind[1:]]
        for metric in k8s_documents()["HorizontalPodAutoscaler/stt-engine"]["spec"]["metrics"]
        if metric["type"] == kind
    ]
    return metric


def adapter_rule(metric: str) -> dict:
    """The prometheus-adapter rule that serves ``metric``."""
    values = load_yaml(ADAPTER_VALUES)
    assert values["rules"]["default"] is False
    (rule,) = [rule for rule in values["rules"]["custom"] if rule["name"]["as"] == metric]
    return rule


def adapter_labels(rule: dict) -> dict[str, str]:
    """Resource -> the Prometheus label the rule maps to it."""
    return {override["resource"]: label for label, override in rule["resources"]["overrides"].items()}


def adapter_query(rule: dict, namespace: str, pods: list[str]) -> str:
    """The rule's metricsQuery as prometheus-adapter renders it for a pods metric: the series its
    name rule matched, matchers on the labels mapped to the namespace and the pods, grouped by pod."""
    labels = adapter_labels(rule)
    series = re.fullmatch(r"\^(\w+)\$", rule["name"]["matches"]).group(1)
    matchers = f'{labels["namespace"]}="{namespace}",{labels["pod"]}=~"{"|".join(pods)}"'
    query = rule["metricsQuery"].replace("<<.Series>>", series)
    query = query.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", labels["pod"])
    assert "<<" not in query, query
    return query


def benchmark_cpu_per_audio_second(streams: int) -> float:
    """CPU-s per audio-s at ``streams`` independent real-time streams: BENCHMARKS.md's first table."""
    lines = BENCHMARKS.read_text().splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("| streams |") and "CPU-s per audio-s" in line
    )
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == str(streams):
            return float(cells[header.index("CPU-s per audio-s")])
    raise AssertionError(f"no row for {streams} streams in BENCHMARKS.md")


def test_hpa_scales_on_streams_per_pod_with_cpu_as_safety_and_slow_scale_down():
    env = deployment_env()
    max_streams = int(env["STT_MAX_STREAMS"])
    # Open streams per pod, the adapter's metric, at 75% of what a pod admits.
    streams = hpa_metric("Pods")
    adapter_rule(streams["metric"]["name"])  # which prometheus-adapter serves
    assert streams["target"] == {"type": "AverageValue", "averageValue": str(int(0.75 * max_streams))}
    # CPU at the utilisation of a full pod (STT_MAX_STREAMS real-time streams at the measured
    # cost), so it adds pods only for work the stream count does not show.
    pod = k8s_documents()["Deployment/stt-engine"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cores = float(container["resources"]["requests"]["cpu"])
    full_pod = 100 * max_streams * benchmark_cpu_per_audio_second(max_streams) / cores
    cpu = hpa_metric("Resource")
    assert cpu["name"] == "cpu" and cpu["target"]["type"] == "Utilization"
    assert cpu["target"]["averageUtilization"] == pytest.approx(full_pod, abs=5)
    # Streams are long-lived: scale down after a long quiet spell, one pod at a time, each pod
    # gone (drained) before the next is chosen.
    behavior = k8s_documents()["HorizontalPodAutoscaler/stt-engine"]["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    for policy in behavior["scaleDown"]["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1
        assert policy["periodSeconds"] > pod["terminationGracePeriodSeconds"]


def test_adapter_rule_finds_each_pod_and_its_open_streams_in_real_prometheus(live):
    rule = adapter_rule(hpa_metric("Pods")["metric"]["name"])
    namespace, pod = POD_FIELDS["metadata.namespace"], POD_FIELDS["metadata.name"]
    # Discovery: the seriesQuery finds the engine, labelled with its namespace and pod.
    labels = adapter_labels(rule)
    assert set(labels) == {"namespace", "pod"}
    found = live.api("/api/v1/series?" + urllib.parse.urlencode({"match[]": rule["seriesQuery"]}))["data"]
    assert [(series[labels["namespace"]], series[labels["pod"]]) for series in found] == [(namespace, pod)]
    # Every metric the rule reads is one the engine exports.
    query = adapter_query(rule, namespace, [pod, "stt-engine-5f7d9c8b6d-gone1"])
    used = metric_names(rule["seriesQuery"]) | metric_names(query)
    assert "stt_streams_active" in used
    assert used <= exported_names(live.metrics_text)
    # The value per pod: no stream open now, and the real-time stream while it ran (refused
    # streams count for the moment of their refusal, hence at least 1).
    assert [(s["metric"], s["value"][1]) for s in live.query(query)] == [({labels["pod"]: pod}, "0")]
    (peak,) = live.query(f"max_over_time(({query})[10m:1s])")
    assert float(peak["value"][1]) >= 1
    # An engine without an stt_streams_active series yet counts 0 streams, not missing.
    never = query.replace("stt_streams_active", "stt_streams_active_never_exported")
    assert [(s["metric"], s["value"][1]) for s in live.query(never)] == [({labels["pod"]: pod}, "0")]


def test_tls_overlay_renders_tls_tokens_and_unchanged_probes():
    import kubernetes_validate

    result = run(stack_tool("kustomize"), "build", str(K8S_TLS))
    assert result.returncode == 0, result.stderr
    rendered = {manifest_key(doc): doc for doc in yaml.safe_load_all(result.stdout) if doc}
    assert sorted(rendered) == sorted(k8s_documents())
    for doc in rendered.values():
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    pod = rendered["Deployment/stt-engine"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    # Every file the engine is pointed at lies in a mounted Secret (whole directories, no subPath,
    # so kubelet's in-place updates reach the engine, which reloads them).
    for variable in ("STT_TLS_CERT", "STT_TLS_KEY", "STT_TLS_CLIENT_CA", "STT_AUTH_TOKENS_FILE"):
        directory = str(Path(env[variable]).parent)
        assert directory in mounts and mounts[directory] in secrets, variable
    assert not any("subPath" in mount for mount in container["volumeMounts"])
    assert secrets == {"tls": "stt-engine-tls", "auth": "stt-engine-auth"}
    # The base's settings survive the patch, and the probes still use the plaintext health port.
    assert env["STT_ADDRESS"] == "0.0.0.0:50051" and env["STT_HEALTH_ADDRESS"] == "0.0.0.0:50052"
    assert int(env["STT_MAX_STREAMS_PER_IDENTITY"]) <= int(env["STT_MAX_STREAMS"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50052, probe
    assert "appProtocol" not in rendered["Service/stt-engine"]["spec"]["ports"][0]  # not h2c any more


# --- docker compose and the Dockerfile ----------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec(tmp_path: Path):
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = load_yaml(COMPOSE)
    broken["services"]["engine"]["healthcheck"]["intervall"] = "15s"
    broken_path = tmp_path / "docker-compose.yml"
    broken_path.write_text(yaml.safe_dump(broken))
    rejected = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken_path))
    assert rejected.returncode != 0, "the compose schema accepted an unknown key"


def test_compose_stack_is_pinned_and_wired():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {
        "engine",
        "otel-collector",
        "jaeger",
        "prometheus",
        "alertmanager",
        "loki",
        "grafana",
    }
    for name, service in services.items():
        if name == "engine":
            assert service["build"]["dockerfile"] == "Dockerfile"
            continue
        image = service["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), image
    engine = services["engine"]
    assert engine["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert engine["healthcheck"]["test"][1:] == dockerfile_healthcheck()
    assert engine["environment"]["STT_HEALTH_ADDRESS"] == "0.0.0.0:50052"  # what the check asks
    assert "50051:50051" in engine["ports"]
    assert services["otel-collector"]["image"] == f"otel/opentelemetry-collector-contrib:{COLLECTOR_VERSION}"
    prometheus = " ".join(services["prometheus"]["command"])
    assert "--enable-feature=exemplar-storage" in prometheus
    # Every file or folder mounted from the repository exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), volume
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert load_yaml(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"] in mounted


def test_compose_prometheus_sends_alerts_to_the_alertmanager_amtool_checks():
    services = load_yaml(COMPOSE)["services"]
    alertmanager = services["alertmanager"]
    image, _, tag = alertmanager["image"].rpartition(":")
    # The release whose config language amtool (Debian's prometheus-alertmanager) checks.
    checker = run(tool("amtool"), "--version")
    minor = re.search(r"version (\d+\.\d+)\.", checker.stdout + checker.stderr).group(1)
    assert image == "prom/alertmanager" and tag.startswith(f"v{minor}."), alertmanager["image"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    assert (
        "./deploy/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
        in alertmanager["volumes"]
    )
    assert "alertmanager" in services["prometheus"]["depends_on"]
    # Prometheus's alerting section points at that service on Alertmanager's default port.
    alerting = load_yaml(PROMETHEUS_DIR / "prometheus.yml")["alerting"]["alertmanagers"]
    targets = [
        target for manager in alerting for static in manager["static_configs"] for target in static["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    assert not any(arg.startswith("--web.listen-address") for arg in alertmanager["command"])


def test_dockerfile_lints_clean_and_builds_a_non_root_serving_image():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.\d+-slim\S*", text, re.M)
    assert re.search(r"^RUN .*pip install \.", text, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert re.search(r"^EXPOSE 50051$", text, re.M)
    assert re.search(r'^CMD \["serve"\]$', text, re.M) and 'ENTRYPOINT ["stt-engine"]' in text
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignored = [line for line in ignored if line and not line.startswith("#")]
    for needed in ("pyproject.toml", "README.md", "engine", "otel"):
        assert needed not in ignored, needed
    result = run(tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana -------------------------------------------------------------------------------------------


def test_grafana_datasources_correlate_traces_metrics_and_logs():
    lines = [line for line in DATASOURCES.read_text().splitlines() if not line.lstrip().startswith("#")]
    # Grafana expands $VAR / ${VAR} in provisioning files: every literal `$` must be written `$$`.
    assert "$" not in "\n".join(lines).replace("$$", ""), "unescaped $ in datasources.yaml"
    sources = {source["type"]: source for source in load_yaml(DATASOURCES)["datasources"]}
    assert set(sources) == {"prometheus", "jaeger", "loki"}
    uids = {source["uid"] for source in sources.values()}
    prometheus, jaeger, loki = sources["prometheus"], sources["jaeger"], sources["loki"]
    assert prometheus["url"] == "http://prometheus:9090"
    assert jaeger["url"] == "http://jaeger:16686" and loki["url"] == "http://loki:3100"

    (exemplar,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert exemplar["name"] == "trace_id" and exemplar["datasourceUid"] == jaeger["uid"]

    to_logs = jaeger["jsonData"]["tracesToLogsV2"]
    assert to_logs["datasourceUid"] == loki["uid"] and to_logs["customQuery"] is True
    # Provisioned `$$` becomes `$`: the query Grafana runs filters on the trace_id metadata.
    query = to_logs["query"].replace("$$", "$")
    assert query == '{service_name="stt-engine"} | trace_id="${__trace.traceId}"'

    (derived,) = loki["jsonData"]["derivedFields"]
    assert derived["datasourceUid"] == jaeger["uid"] and derived["matcherType"] == "label"
    assert derived["matcherRegex"] == "trace_id" and derived["url"].replace("$$", "$") == "${__value.raw}"
    assert {exemplar["datasourceUid"], to_logs["datasourceUid"], derived["datasourceUid"]} <= uids


def test_grafana_dashboard_covers_the_engine_with_exemplars():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "stt-engine" and dashboard["title"] == "stt-engine"
    uids = {source["uid"] for source in load_yaml(DATASOURCES)["datasources"]}
    panels = [panel for panel in dashboard_panels() if panel["type"] != "row"]
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids, panel["title"]
    text = " ".join(target["expr"] for _, target in dashboard_prometheus_targets())
    for metric in (
        "stt_streams_active",
        "stt_audio_received_seconds_total",
        "stt_realtime_factor_bucket",
        "stt_first_interim_latency_seconds_bucket",
        "stt_final_latency_seconds_bucket",
        "stt_final_phase_duration_seconds_bucket",
        "stt_decode_duration_seconds_bucket",
        "stt_inference_queue_depth",
        "stt_inference_queue_wait_seconds_bucket",
        "stt_errors_total",
        "rpc_server_call_duration_seconds_count",
        "rpc_server_call_duration_seconds_bucket",
        "process_cpu_time_seconds_total",
        "process_memory_usage_bytes",
        "stt_model_loaded",
    ):
        assert metric in text, f"no panel shows {metric}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(stt_final_latency_seconds_bucket" in text
        assert f"histogram_quantile({quantile}, sum by (le) (rate(stt_first_interim_latency" in text
    # Latency panels show exemplars, which link to the stream's trace in Jaeger.
    latency_graphs = 0
    for panel in panels:
        for target in panel["targets"]:
            if panel["type"] == "timeseries" and "histogram_quantile" in target["expr"]:
                assert target["exemplar"] is True, (panel["title"], target["expr"])
                latency_graphs += "stt_final_latency" in target["expr"] or "first_interim" in target["expr"]
    assert latency_graphs == 6  # p50/p95/p99 of final latency and of time to first interim
    # Where final latency goes: each phase's p95, stacked.
    (breakdown,) = [panel for panel in panels if panel["title"] == "Final latency breakdown"]
    assert breakdown["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    (phases,) = breakdown["targets"]
    assert "sum by (le, stt_final_phase) (rate(stt_final_phase_duration_seconds_bucket" in phases["expr"]
    # Queries do not depend on the scrape job: the same dashboard serves collector and engine scrapes.
    assert "job=" not in text
    assert any(panel["type"] == "logs" and panel["datasource"]["type"] == "loki" for panel in panels)


# --- the collector -------------------------------------------------------------------------------------

# Component types of otelcol-contrib 0.165.0, from the distribution's manifest
# (open-telemetry/opentelemetry-collector-releases, distributions/otelcol-contrib/manifest.yaml),
# written as the type names of that release; the deprecated aliases (`otlp` and `otlphttp`
# exporters, `spanmetrics` connector) are left out so that the config uses the current names.
# Receivers: the common subset. Not in this release: the `loki` exporter (removed in v0.131) and
# a `jaeger` exporter. tests/test_stack.py runs the config in a collector of this release.
CONTRIB_COMPONENTS = {
    "extensions": {
        "zpages", "health_check", "pprof", "basicauth", "bearertokenauth", "headers_setter",
        "oauth2client", "oidc", "sigv4auth", "file_storage", "db_storage", "jaegerremotesampling",
        "http_forwarder", "awsproxy", "docker_observer", "host_observer", "k8s_observer", "opamp",
    },
    "receivers": {
        "nop", "otlp", "jaeger", "zipkin", "prometheus", "hostmetrics", "filelog", "journald",
        "kafka", "k8s_cluster", "k8s_events", "k8sobjects", "kubeletstats", "syslog", "statsd",
        "docker_stats", "httpcheck", "prometheus_simple", "receiver_creator", "otelarrow",
    },
    "processors": {
        "batch", "memory_limiter", "attributes", "cumulativetodelta", "deltatocumulative",
        "deltatorate", "filter", "geoip", "groupbyattrs", "groupbytrace", "interval",
        "k8sattributes", "logdedup", "metricsgeneration", "metricstarttime", "metricstransform",
        "probabilistic_sampler", "redaction", "remotetap", "resourcedetection", "resource", "schema",
        "span", "tail_sampling", "transform",
    },
    "exporters": {
        "debug", "nop", "otlp_grpc", "otlp_http", "awss3", "awsxray", "clickhouse", "datadog",
        "elasticsearch", "file", "googlecloud", "influxdb", "kafka", "loadbalancing", "opensearch",
        "otelarrow", "prometheus", "prometheusremotewrite", "sentry", "signalfx", "splunk_hec",
        "syslog", "zipkin",
    },
    "connectors": {
        "forward", "count", "datadog", "exceptions", "failover", "grafanacloud", "otlpjson",
        "roundrobin", "routing", "servicegraph", "span_metrics", "sum", "signaltometrics",
    },
}  # fmt: skip


def component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def env_default(value: str) -> str:
    """The compose default of a ``${env:NAME:-default}`` setting (a plain value is its own)."""
    match = re.fullmatch(r"\$\{env:[A-Z_]+:-(.*)\}", str(value))
    return match.group(1) if match else str(value)


def test_collector_pipelines_use_defined_components_of_the_pinned_release():
    config = load_yaml(COLLECTOR_CONFIG)
    service = config["service"]
    connectors = set(config.get("connectors", {}))
    for kind in ("receivers", "processors", "exporters", "connectors", "extensions"):
        for component_id in config.get(kind, {}):
            assert component_type(component_id) in CONTRIB_COMPONENTS[kind], (
                f"{kind[:-1]} {component_id!r} is not a component of otelcol-contrib {COLLECTOR_VERSION}"
            )
    for extension in service["extensions"]:
        assert extension in config["extensions"], extension
    fed, fed_from = set(), set()
    for name, pipeline in service["pipelines"].items():
        for receiver in pipeline["receivers"]:
            assert receiver in config["receivers"] or receiver in connectors, (name, receiver)
            fed_from.add(receiver)
        for processor in pipeline["processors"]:
            assert processor in config["processors"], (name, processor)
        for exporter in pipeline["exporters"]:
            assert exporter in config["exporters"] or exporter in connectors, (name, exporter)
            fed.add(exporter)
        assert pipeline["processors"][0] == "memory_limiter", f"{name}: memory_limiter must come first"
        assert "batch" in pipeline["processors"] and "resource" in pipeline["processors"]
    # A connector is the exporter of one pipeline and the receiver of another.
    assert connectors <= fed & fed_from
    # Every defined component is used (an unused one is usually a typo).
    for kind in ("receivers", "processors", "exporters"):
        used = {c for pipeline in service["pipelines"].values() for c in pipeline[kind]}
        assert set(config[kind]) <= used, (kind, set(config[kind]) - used)


def test_collector_routes_each_signal_to_its_backend():
    config = load_yaml(COLLECTOR_CONFIG)
    pipelines = config["service"]["pipelines"]
    exporters = config["exporters"]
    protocols = config["receivers"]["otlp"]["protocols"]
    assert env_default(protocols["grpc"]["endpoint"]) == "0.0.0.0:4317"
    assert env_default(protocols["http"]["endpoint"]) == "0.0.0.0:4318"

    def exporter(signal: str, kind: str) -> dict:
        (found,) = [e for e in pipelines[signal]["exporters"] if component_type(e) == kind]
        return exporters[found]

    assert env_default(exporter("traces", "otlp_grpc")["endpoint"]) == "jaeger:4317"
    assert env_default(exporter("logs", "otlp_http")["endpoint"]) == "http://loki:3100/otlp"
    prometheus = exporter("metrics", "prometheus")
    assert env_default(prometheus["endpoint"]) == "0.0.0.0:8889" and prometheus["enable_open_metrics"] is True
    assert env_default(config["extensions"]["health_check"]["endpoint"]) == "0.0.0.0:13133"
    own = config["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    assert env_default(own["port"]) == "8888"
    scraped = {
        target
        for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert {"otel-collector:8889", "otel-collector:8888"} <= scraped


def test_loki_takes_otlp_logs_with_trace_ids_as_structured_metadata():
    loki = load_yaml(DEPLOY / "loki" / "loki.yaml")
    assert loki["server"]["http_listen_port"] == 3100
    assert loki["limits_config"]["allow_structured_metadata"] is True
    # Structured metadata (where OTLP trace_id/span_id land) needs the v13 schema on tsdb.
    latest = max(loki["schema_config"]["configs"], key=lambda config: str(config["from"]))
    assert latest["schema"] == "v13" and latest["store"] == "tsdb"
    compose = load_yaml(COMPOSE)["services"]["loki"]
    assert "-config.file=/etc/loki/loki.yaml" in compose["command"]
    assert "./deploy/loki/loki.yaml:/etc/loki/loki.yaml:ro" in compose["volumes"]
    # The deployment environment the collector stamps on every record is one of Loki's default
    # index labels from 3.4 on, so loki.yaml does not declare it.
    stamped = load_yaml(COLLECTOR_CONFIG)["processors"]["resource"]["attributes"]
    assert "deployment.environment.name" in {attribute["key"] for attribute in stamped}
    release = re.fullmatch(r"grafana/loki:(\d+)\.(\d+)\.\d+", compose["image"]).groups()
    assert tuple(map(int, release)) >= (3, 4), compose["image"]
