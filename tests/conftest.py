"""Shared fixtures: real server processes on loopback and real speech clips."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from engine.audio import read_audio_file
from tests.helpers import SAMPLE, Clip, ServerProcess, load_clips, serving
from tests.otlp_receiver import OtlpReceiver
from tests.pki import Pki, make_pki


@pytest.fixture(scope="session")
def clips() -> list[Clip]:
    return load_clips()


@pytest.fixture(scope="session")
def jfk() -> np.ndarray:
    return read_audio_file(SAMPLE)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A CA and certificates for the TLS servers of one test module (tests/pki.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One shared server with small limits so the limit tests are quick."""
    with serving(
        "--max-streams",
        "12",
        "--max-stream-seconds",
        "20",
        "--max-chunk-bytes",
        "65536",
        "--workers",
        "2",
        "--threads",
        "1",
    ) as proc:
        yield proc


@pytest.fixture(scope="session")
def api_server() -> Iterator[tuple[ServerProcess, OtlpReceiver]]:
    """A server exporting OTLP to a receiver here, for the Google and Riva API tests."""
    receiver = OtlpReceiver().start()
    server = ServerProcess(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
    )
    try:
        server.wait_ready()
        yield server, receiver
    finally:
        code = server.stop()
        receiver.stop()
    assert code == 0


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProcess]]:
    """Starts servers for one test; each is stopped afterwards and must have exited 0.

    ``server_factory(*args, env=..., ready=True)``; a test that expects another exit code
    sets ``proc.expected_exit``.
    """
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None, ready: bool = True) -> ServerProcess:
        proc = ServerProcess(*args, env=env)
        proc.expected_exit = 0
        started.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    yield start
    failures = []
    for proc in started:
        code = proc.stop()
        if code != proc.expected_exit:
            failures.append(f"server exited {code}, expected {proc.expected_exit}:\n{proc.log()[-3000:]}")
    assert not failures, "\n".join(failures)
