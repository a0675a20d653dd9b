"""The stt-engine command as a user runs it."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from engine.cli import build_parser
from tests.helpers import JFK_TEXT, REPO, SAMPLE, ffmpeg, wer


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


def serve_options() -> list[argparse.Action]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return [a for a in commands.choices["serve"]._actions if a.option_strings and a.dest != "help"]


def env_sample(action: argparse.Action) -> tuple[str, object]:
    """A value for the flag's variable, unlike its default, and what the flag should become."""
    if action.choices:
        choice = next(c for c in action.choices if c != action.default)
        return choice, choice
    if action.const is True:  # store_true
        return "true", True
    kind = getattr(action.type, "__name__", None)  # range-checked int and float types
    if kind in ("int", "float"):
        default = action.type(action.default) if isinstance(action.default, str) else action.default or 0
        value = default + (1 if kind == "int" else 0.5)
        return str(value), value
    if action.dest == "address":
        return "127.0.0.1:7", None
    return "DEBUG" if action.dest == "log_level" else "/models/custom", None


@pytest.mark.parametrize("option", [a.option_strings[0] for a in serve_options()])
def test_every_serve_flag_reads_its_env_variable(option, monkeypatch):
    (action,) = [a for a in serve_options() if a.option_strings[0] == option]
    variable = "STT_" + option[2:].upper().replace("-", "_")
    raw, expected = env_sample(action)
    monkeypatch.setenv(variable, raw)
    args = build_parser().parse_args(["serve"])  # defaults are read when the parser is built
    assert getattr(args, action.dest) == (raw if expected is None else expected)
    # ...and the README's server configuration table documents the pair.
    readme = (REPO / "README.md").read_text()
    assert re.search(rf"^\| `{re.escape(option)}` \| `{variable}` \|", readme, re.M), (option, variable)
