"""Shared fixtures: a real server process on loopback, real speech clips, WER scoring."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.audio import read_audio_file
from engine.client import SpeechClient, StreamConfig, final_transcripts

REPO = Path(__file__).resolve().parent.parent
AUDIO_DIR = Path(os.environ.get("STT_TEST_AUDIO", REPO.parent / "shared" / "audio"))
SAMPLE = REPO / "engine" / "samples" / "jfk.wav"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)
JFK_OPENING = "And so my fellow Americans, ask not"  # its first 5 seconds


@dataclass
class Clip:
    name: str
    audio: np.ndarray
    transcript: str

    @property
    def seconds(self) -> float:
        return len(self.audio) / 16000


def load_clips() -> list[Clip]:
    manifest = AUDIO_DIR / "manifest.tsv"
    if not manifest.exists():
        pytest.skip(f"no speech clips at {AUDIO_DIR}")
    with manifest.open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [Clip(r["file"], read_audio_file(AUDIO_DIR / r["file"]), r["transcript"]) for r in rows]


@pytest.fixture(scope="session")
def clips() -> list[Clip]:
    return load_clips()


@pytest.fixture(scope="session")
def jfk() -> np.ndarray:
    return read_audio_file(SAMPLE)


def normalize(text: str) -> str:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()(text)


def wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    return jiwer.wer([normalize(r) for r in references], [normalize(h) for h in hypotheses])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``stt-engine serve`` in a subprocess, as a user runs it."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"stt-server-{self.port}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--address", self.target, *args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def client(self) -> SpeechClient:
        return SpeechClient(self.target)

    def wait_ready(self, timeout: float = 120) -> None:
        with self.client() as client:
            deadline = time.monotonic() + timeout
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log()}")
                try:
                    client.wait_until_serving(timeout=1)
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def server():
    """One shared server with small limits so the limit tests are quick."""
    proc = ServerProcess(
        "--max-streams",
        "8",
        "--max-stream-seconds",
        "20",
        "--max-chunk-bytes",
        "65536",
        "--workers",
        "2",
        "--threads",
        "1",
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


class BackgroundStream:
    """A good stream running beside a test, to prove other streams are unaffected."""

    def __init__(self, target: str, audio: np.ndarray, expected: str) -> None:
        self.target = target
        self.audio = audio
        self.expected = expected
        self.finals: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with SpeechClient(self.target) as client:
                self.finals = final_transcripts(
                    client.stream_audio(self.audio, StreamConfig(interim_results=True))
                )
        except BaseException as exc:  # re-raised in the test thread
            self.error = exc

    def check(self) -> None:
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "background stream did not finish"
        if self.error is not None:
            raise self.error
        assert wer([self.expected], [" ".join(self.finals)]) < 0.1, self.finals
