"""The stt-engine command as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import JFK_TEXT, REPO, SAMPLE, wer


def stt_engine(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_transcribe_jsonl(server):
    result = stt_engine("transcribe", str(SAMPLE), "--server", server.target, "--format", "jsonl", "--words")
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    finals = [m for m in messages if m["type"] == "result" and m["is_final"]]
    interims = [m for m in messages if m["type"] == "result" and not m["is_final"]]
    events = [m["event"] for m in messages if m["type"] == "speech_event"]
    assert interims and finals and "SPEECH_STARTED" in events and "SPEECH_ENDED" in events
    assert wer([JFK_TEXT], [" ".join(m["transcript"] for m in finals)]) < 0.1
    assert all(0 <= m["stability"] <= 1 for m in interims)
    assert all("words" in m and m["end"] > m["start"] for m in finals)


def test_transcribe_text_fast(server):
    result = stt_engine("transcribe", str(SAMPLE), "--server", server.target, "--fast")
    assert result.returncode == 0, result.stderr
    assert re.search(r"trace id: [0-9a-f]{32}", result.stderr), result.stderr  # paste into Jaeger
    finals = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if line.startswith("[")]
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1


def test_transcribe_reports_unreachable_server():
    result = stt_engine("transcribe", str(SAMPLE), "--server", "127.0.0.1:1", "--fast")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_info(server):
    result = stt_engine("info", "--server", server.target)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model"] == "tiny.en" and info["ready"] is True


def test_demo_streams_the_bundled_sample():
    result = stt_engine("demo", "--fast")
    assert result.returncode == 0, result.stderr
    finals = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if line.startswith("[")]
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1, result.stdout
