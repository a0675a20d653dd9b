"""The SLO file and the rules generated from it (deploy/slo/).

promtool checks and unit-tests the generated rules in tests/test_deploy.py, and a live Prometheus
records them from a real engine there and through the collector in tests/test_stack.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from otel.instruments import LATENCY_BUCKETS
from tests.helpers import REPO

SLO_DIR = REPO / "deploy" / "slo"
SLO_FILE = SLO_DIR / "stt-engine.yaml"
GENERATOR = SLO_DIR / "generate.py"
SLO_RULES = REPO / "deploy" / "prometheus" / "slo.rules.yml"

# The names the dashboard queries: keep them stable.
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
OBJECTIVES = {"availability": 0.995, "final-latency": 0.99, "first-result": 0.95}


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GENERATOR.relative_to(REPO)), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def generated_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(SLO_RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_committed_rules_are_what_the_generator_writes(tmp_path: Path):
    output = tmp_path / "slo.rules.yml"
    result = generate("--output", str(output))
    assert result.returncode == 0, result.stderr
    assert output.read_text() == SLO_RULES.read_text(), "run: python deploy/slo/generate.py"
    assert generate("--check").returncode == 0


def test_check_fails_on_stale_rules(tmp_path: Path):
    stale = tmp_path / "slo.rules.yml"
    stale.write_text(SLO_RULES.read_text().replace("(14.4 * 0.005)", "(20 * 0.005)"))
    result = generate("--check", "--output", str(stale))
    assert result.returncode == 1 and "stale" in result.stderr


def test_recorded_series_names_and_labels():
    records = [rule for rule in generated_rules() if "record" in rule]
    recorded = {(rule["record"], rule["labels"]["slo"]) for rule in records}
    expected = {(f"stt:slo_errors:ratio_rate{window}", slo) for window in WINDOWS for slo in OBJECTIVES}
    expected |= {("stt:slo_objective:ratio", slo) for slo in OBJECTIVES}
    assert recorded == expected and len(records) == len(expected)
    assert all(rule["labels"] == {"slo": rule["labels"]["slo"]} for rule in records)
    objectives = {
        rule["labels"]["slo"]: rule["expr"] for rule in records if rule["record"].endswith("objective:ratio")
    }
    assert objectives == {slo: f"vector({value})" for slo, value in OBJECTIVES.items()}
    for rule in records:
        # Plain sums, so the rules hold whichever way Prometheus gets the engines' metrics, and
        # no events in a window is no data (a division by a positive rate only).
        assert " by " not in rule["expr"] and "without" not in rule["expr"]
        if "ratio_rate" in rule["record"]:
            window = rule["record"].removeprefix("stt:slo_errors:ratio_rate")
            assert set(re.findall(r"\[(\w+)\]", rule["expr"])) == {window}
            assert rule["expr"].rstrip().endswith(f"[{window}])) > 0)")


def test_latency_thresholds_are_bucket_bounds_of_their_histograms():
    slos = yaml.safe_load(SLO_FILE.read_text())["slos"]
    thresholds = {slo["name"]: slo["latency"]["threshold_seconds"] for slo in slos if "latency" in slo}
    assert thresholds == {"final-latency": 1.5, "first-result": 1.0}
    assert set(thresholds.values()) <= set(LATENCY_BUCKETS)


def test_burn_rate_alerts_follow_the_sre_workbook():
    """Page at 14.4x (1h/5m) and 6x (6h/30m), ticket at 3x (1d/2h) and 1x (3d/6h), for every SLO."""
    alerts = [rule for rule in generated_rules() if "alert" in rule]
    pairs = {("1h", "5m"): (14.4, "critical"), ("6h", "30m"): (6, "critical")}
    pairs |= {("1d", "2h"): (3, "warning"), ("3d", "6h"): (1, "warning")}
    seen = set()
    for rule in alerts:
        labels = rule["labels"]
        slo, long, short = labels["slo"], labels["long_window"], labels["short_window"]
        factor, severity = pairs[(long, short)]
        assert labels["severity"] == severity
        budget = f"{1 - OBJECTIVES[slo]:.10g}"
        threshold = rf"> \({factor:g} \* {re.escape(budget)}\)"
        assert re.fullmatch(
            rf'stt:slo_errors:ratio_rate{long}{{slo="{slo}"}} {threshold}\s+and\s+'
            rf'stt:slo_errors:ratio_rate{short}{{slo="{slo}"}} {threshold}\s*',
            rule["expr"],
        ), rule["expr"]
        assert rule["annotations"]["runbook_url"] == f"docs/runbook.md#{rule['alert'].lower()}"
        seen.add((slo, long))
    assert seen == {(slo, long) for slo in OBJECTIVES for long, _ in pairs}
