"""The stt-engine command as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import JFK_TEXT, REPO, SAMPLE, beside_good_stream, ffmpeg, wer


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


def test_transcribe_decodes_compressed_files(server, tmp_path):
    mp3 = tmp_path / "jfk.mp3"
    ffmpeg("-i", str(SAMPLE), "-codec:a", "libmp3lame", "-b:a", "64k", str(mp3))
    result = stt_engine("transcribe", str(mp3), "--server", server.target, "--fast")
    assert result.returncode == 0, result.stderr
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


def error_lines(stderr: str) -> list[str]:
    """Lines at ERROR or above, whoever wrote them: our log records, gRPC core's own
    (``E1203 10:32:24.997328 24232 add_port.cc:83] ...``), argparse's and tracebacks."""
    grpc_core = re.compile(r"^[EF]\d{4} ")
    ours = re.compile(r" (ERROR|CRITICAL) ")
    return [
        line
        for line in stderr.splitlines()
        if grpc_core.match(line) or ours.search(line) or "error:" in line or line.startswith("Traceback")
    ]


@pytest.mark.parametrize("listener", ["--address", "--health-address"])
def test_a_port_in_use_is_one_error_line(listener, server, jfk):
    """A second server started on the port of a running one says so in one line, ours, and
    exits 1, while the running server serves on: its good stream and its health undisturbed."""
    with beside_good_stream(server, jfk, JFK_TEXT):
        result = start_beside(server, listener)
    errors = error_lines(result.stderr)
    named = f"{server.target} (--health-address)" if listener == "--health-address" else server.target
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1, result.stderr
    assert errors[0].endswith(f"cannot listen on {named}: address already in use"), result.stderr
    assert "Traceback" not in result.stderr


def start_beside(server, listener: str) -> subprocess.CompletedProcess:
    """A second server on the running one's port (``--address``) or health port."""
    address = ["--address", server.target] if listener == "--address" else ["--address", "127.0.0.1:0"]
    if listener == "--health-address":
        address += ["--health-address", server.target]
    return subprocess.run(
        [sys.executable, "-m", "engine", "serve", *address],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OTEL_SDK_DISABLED": "true"},
    )
