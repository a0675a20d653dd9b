"""Helpers shared by the tests: real processes on loopback, real speech, WER, polling."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.audio import read_audio_file
from engine.client import SpeechClient, StreamConfig, final_transcripts
from engine.errors import RETRY_DELAYS

REPO = Path(__file__).resolve().parent.parent
AUDIO_DIR = Path(os.environ.get("STT_TEST_AUDIO", REPO.parent / "shared" / "audio"))
LONG_AUDIO_DIR = Path(os.environ.get("STT_TEST_AUDIO_LONG", REPO.parent / "shared" / "audio-long"))
SAMPLE = REPO / "engine" / "samples" / "jfk.wav"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)
JFK_OPENING = "And so my fellow Americans, ask not"  # its first 5 seconds
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 30, interval: float = 0.05, what: str = "condition"
) -> T:
    """Polls ``predicate`` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def tool(name: str) -> str:
    """A declared test dependency's executable: from this interpreter's scripts directory
    (where pip installs it) or the PATH. Missing is a failure, never a skip."""
    for directory in (sysconfig.get_path("scripts"), Path(sys.executable).parent):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} is a declared test dependency and is not installed (see .ci/run)")


STACK_CACHE = Path(os.environ.get("STT_STACK_CACHE", Path.home() / ".cache" / "stt-engine-stack"))


def stack_versions() -> dict[str, str]:
    """The pinned versions of .ci/versions.env."""
    lines = (REPO / ".ci" / "versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def stack_tool(name: str) -> str:
    """A pinned test tool that .ci/setup builds from Go modules (versions in .ci/versions.env)."""
    version = stack_versions()[f"{name.upper().replace('-', '_')}_VERSION"]
    binary = STACK_CACHE / f"{name}-{version}" / name
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: `bash .ci/setup` builds it")
    return str(binary)


class ProbeExit(IntEnum):
    """grpc_health_probe's exit statuses (v0.4.62, main.go)."""

    SERVING = 0
    INVALID_ARGUMENTS = 1  # unreadable TLS files included
    NO_CONNECTION = 2  # none within -connect-timeout: nothing listening, or a failed TLS handshake
    RPC_FAILED = 3  # the Check RPC failed: NOT_FOUND for an unknown service
    UNHEALTHY = 4  # any other status: NOT_SERVING
    SPIFFE_FAILED = 20  # no credentials from the SPIFFE workload API


def health_probe(*args: str, connect_timeout: str = "5s") -> subprocess.CompletedProcess:
    """grpc_health_probe, the standard gRPC health-check CLI (exit status: ProbeExit)."""
    return subprocess.run(
        [stack_tool("grpc_health_probe"), f"-connect-timeout={connect_timeout}", "-rpc-timeout=5s", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def ffmpeg(*args: str, data: bytes | None = None) -> bytes:
    """Runs ffmpeg quietly; returns its stdout."""
    return subprocess.run(
        [tool("ffmpeg"), "-loglevel", "error", *args], input=data, capture_output=True, check=True
    ).stdout


@dataclass
class Clip:
    name: str
    audio: np.ndarray
    transcript: str

    @property
    def seconds(self) -> float:
        return len(self.audio) / 16000


def amr_narrowband(audio: np.ndarray) -> bytes:
    """``audio`` (16 kHz float) as AMR-NB at 12.2 kbit/s in its storage format, from PyAV's
    encoder (the ffmpeg command here has none)."""
    import io

    import av

    from engine.audio import float_to_linear16

    source = ("-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-")
    pcm8 = np.frombuffer(
        ffmpeg(*source, "-ar", "8000", "-f", "s16le", "-", data=float_to_linear16(audio)), "<i2"
    )
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="amr") as container:
        stream = container.add_stream("libopencore_amrnb", rate=8000)
        stream.bit_rate, stream.layout = 12200, "mono"
        for start in range(0, len(pcm8) - 160, 160):
            samples = pcm8[None, start : start + 160].copy()
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def amr_wideband(audio: np.ndarray) -> bytes:
    """``audio`` (16 kHz float) as AMR-WB at 23.85 kbit/s in its storage format, from the
    VisualOn encoder library (Debian's libvo-amrwbenc0, which .ci/setup installs; neither ffmpeg
    nor PyAV here has an AMR-WB encoder)."""
    import ctypes

    from engine.audio import float_to_linear16

    library = ctypes.CDLL("libvo-amrwbenc.so.0")
    library.E_IF_init.restype = ctypes.c_void_p
    short_p, byte_p = ctypes.POINTER(ctypes.c_short), ctypes.POINTER(ctypes.c_ubyte)
    library.E_IF_encode.argtypes = [ctypes.c_void_p, ctypes.c_int, short_p, byte_p, ctypes.c_int]
    library.E_IF_exit.argtypes = [ctypes.c_void_p]
    state = library.E_IF_init()
    pcm = np.frombuffer(float_to_linear16(audio), dtype="<i2")
    out, frame_bytes = bytearray(b"#!AMR-WB\n"), (ctypes.c_ubyte * 64)()
    try:
        for start in range(0, len(pcm) - 319, 320):  # 20 ms frames
            samples = np.ascontiguousarray(pcm[start : start + 320])
            size = library.E_IF_encode(
                state, 8, samples.ctypes.data_as(ctypes.POINTER(ctypes.c_short)), frame_bytes, 0
            )
            out += bytes(frame_bytes[:size])
    finally:
        library.E_IF_exit(state)
    return bytes(out)


def load_clips() -> list[Clip]:
    """The real recordings of ../shared/audio (or $STT_TEST_AUDIO); required in CI."""
    manifest = AUDIO_DIR / "manifest.tsv"
    _require(manifest, "STT_TEST_AUDIO")
    with manifest.open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [Clip(r["file"], read_audio_file(AUDIO_DIR / r["file"]), r["transcript"]) for r in rows]


def _require(manifest: Path, variable: str) -> None:
    if not manifest.exists():
        if IN_CI:
            pytest.fail(f"no speech recordings at {manifest.parent}: CI must have them ({variable})")
        pytest.skip(f"no speech recordings at {manifest.parent}")


def long_segment(utterance: str) -> tuple[np.ndarray, str]:
    """One utterance of the long readings of ../shared/audio-long, and its reference."""
    segments = LONG_AUDIO_DIR / "segments.tsv"
    _require(segments, "STT_TEST_AUDIO_LONG")
    with segments.open() as handle:
        row = next(r for r in csv.DictReader(handle, delimiter="\t") if r["utterance"] == utterance)
    audio = read_audio_file(LONG_AUDIO_DIR / row["file"])
    return audio[int(float(row["start"]) * 16000) : int(float(row["end"]) * 16000)], row["transcript"]


def feed(recognizer, audio: np.ndarray) -> list:
    """A ``StreamingRecognizer``'s events for ``audio`` fed in 100 ms chunks, as a client streams
    it, and the end of the stream."""
    events = []
    for start in range(0, len(audio), 1600):
        events += recognizer.accept(audio[start : start + 1600])
    return events + recognizer.finish()


def paused_jfk(jfk: np.ndarray) -> np.ndarray:
    """JFK with 1 s more silence in its first pause, and 4 s of silence after it. With a 3 s
    endpoint, the final decode started speculatively in that pause is discarded when speech
    resumes, and the whole speech is one utterance."""
    from engine.options import StreamingOptions
    from engine.recognizer import StreamingRecognizer, UtteranceEnded

    events = StreamingRecognizer(StreamingOptions()).accept(jfk)
    cut = int(next(e for e in events if isinstance(e, UtteranceEnded)).end * 16000)
    silence = np.zeros(16000, np.float32)
    return np.concatenate([jfk[:cut], silence, jfk[cut:], silence, silence, silence, silence])


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


def retry_delay(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay (seconds) of a failed call, as a client unpacks it."""
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def retry_pushback_ms(error: grpc.RpcError) -> str | None:
    """The grpc-retry-pushback-ms trailer, which gRPC's own retry policy reads."""
    return dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")


def assert_retry_after(error: grpc.RpcError, reason: str) -> None:
    """The refusal says, both ways, to retry after the delay the engine sets for ``reason``."""
    delay = RETRY_DELAYS[reason]
    assert delay > 0
    assert retry_delay(error) == delay, error.details()
    assert retry_pushback_ms(error) == str(round(delay * 1000))


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

    def client(self, retries: bool = True) -> SpeechClient:
        """A client with the default retry policy; ``retries=False`` for a test that expects a
        unary call's retryable refusal (Recognize at capacity) rather than its retries."""
        return SpeechClient(self.target, retries=retries)

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        with self.client() as client:

            def serving() -> bool:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log()}")
                try:
                    return client.health(timeout=1) == "SERVING"
                except grpc.RpcError:
                    return False  # not listening yet

            wait_until(serving, timeout, what=f"{self.target} to report SERVING")
        return self

    def active_streams(self) -> int:
        with self.client() as client:
            return client.server_info().active_streams

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM (if still running) and the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log.closed:
            self._log.close()
        return self.process.returncode


class BackgroundStream:
    """A good real-time stream running beside a test, to prove other streams are unaffected.

    ``started`` is set when its first response arrives (SPEECH_STARTED), so a test can be
    sure the stream is really being served before it attacks the server.
    """

    def __init__(self, target: str, audio: np.ndarray, expected: str, token: str | None = None) -> None:
        self.target = target
        self.audio = audio
        self.expected = expected
        self.token = token  # a bearer token, for a server that authenticates
        self.finals: list[str] = []
        self.error: BaseException | None = None
        self.last_final_after_audio: float | None = None  # seconds after its audio ended
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        responses = []
        try:
            with SpeechClient(self.target, token=self.token) as client:
                started = time.monotonic()
                for response in client.stream_audio(
                    self.audio, StreamConfig(interim_results=True), started=started
                ):
                    self.started.set()
                    responses.append(response)
                    if response.HasField("result") and response.result.is_final:
                        ended = len(self.audio) / 16000
                        self.last_final_after_audio = time.monotonic() - started - ended
            self.finals = final_transcripts(responses)
        except BaseException as exc:  # re-raised in the test thread
            self.error = exc
        finally:
            self.started.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_started(self, timeout: float = 30) -> None:
        assert self.started.wait(timeout), "the good stream never got a response"
        assert self.error is None and self.running, f"the good stream ended early: {self.error!r}"

    def check(self) -> None:
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "background stream did not finish"
        if self.error is not None:
            raise self.error
        assert wer([self.expected], [" ".join(self.finals)]) < 0.1, self.finals


class HealthWatch:
    """Checks health every 100 ms in the background; records the slowest answer."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with SpeechClient(self.target) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = client.health(timeout=5)
                    if status != "SERVING":
                        self.failures.append(status)
                except grpc.RpcError as error:
                    self.failures.append(error.code().name)
                self.slowest = max(self.slowest, time.monotonic() - started)
                self._stop.wait(0.1)

    def check(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self.failures, self.failures
        assert self.slowest < 1.0, f"health took {self.slowest:.2f} s"


@contextmanager
def beside_good_stream(
    server: ServerProcess, audio: np.ndarray, expected: str, token: str | None = None
) -> Iterator[BackgroundStream]:
    """An attack's surroundings: a good real-time stream (confirmed served before the attack)
    and a health watch. After the attack the good stream has its transcript, its last final
    within 2 s of its audio, health answered within 1 s throughout and still reads SERVING."""
    good = BackgroundStream(server.target, audio, expected, token)
    good.wait_started()
    watch = HealthWatch(server.target)
    yield good
    watch.check()
    good.check()
    # On time: unloaded, JFK's last final arrives 0.3-0.9 s after its audio ends.
    assert good.last_final_after_audio is not None and good.last_final_after_audio < 2.0, (
        good.last_final_after_audio
    )
    with server.client() as client:
        assert client.health() == "SERVING"
        assert client.health("stt.v1.Speech") == "SERVING"


class PrometheusProcess:
    """A real Prometheus (Debian's 2.42) on loopback with a given configuration."""

    def __init__(self, config: dict, directory: Path, *flags: str) -> None:
        import yaml

        self.port = free_port()
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                *flags,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return json.load(response)

    def query(self, expr: str, at: float | None = None) -> list:
        """``expr`` now, or at Unix time ``at``."""
        parameters = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        body = self.api("/api/v1/query?" + urllib.parse.urlencode(parameters))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, minimum: float, timeout: float = 30) -> None:
        """Until Prometheus has a value of ``expr`` of at least ``minimum``."""

        def reached() -> bool:
            try:
                result = self.query(expr)
            except OSError:
                return False  # still starting
            return bool(result) and float(result[0]["value"][1]) >= minimum

        wait_until(reached, timeout, 0.2, f"Prometheus to see {expr} >= {minimum}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@contextmanager
def serving(*args: str) -> Iterator[ServerProcess]:
    """A server started with ``args``, ready; on exit it must stop cleanly (exit code 0)."""
    proc = ServerProcess(*args)
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, proc.log()[-3000:]
