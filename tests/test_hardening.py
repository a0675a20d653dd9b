"""A careless or hostile client cannot stall or exhaust the server (issue 10).

Each attack runs beside a good real-time stream, which must still get its transcript, and
health must answer within 1 s throughout.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from engine.api import stt_pb2
from engine.audio import float_to_linear16
from tests.helpers import JFK_TEXT, REPO, beside_good_stream, serving, wait_until
from tests.test_errors import (
    assert_error,
    audio_request,
    config_request,
    pcm,
    run_stream,
)

LIMITS = (
    "--max-streams",
    "4",
    "--config-timeout-seconds",
    "1.5",
    "--idle-timeout-seconds",
    "2",
    "--max-backlog-seconds",
    "10",
    "--max-recognize-seconds",
    "120",
)


@pytest.fixture(scope="module")
def hardened():
    with serving(*LIMITS) as proc:
        yield proc


@pytest.fixture
def guarded(hardened, jfk):
    """The good stream (JFK's 11 s) and the health watch around one attack."""
    wait_until(lambda: hardened.active_streams() == 0, 30, what="earlier streams to end")
    with beside_good_stream(hardened, jfk, JFK_TEXT):
        yield hardened


def test_a_huge_prompt_is_refused_at_once(guarded, jfk):
    prompt = "hot words " * 200_000  # 2 MB, tokenized on every decode before the limit
    started = time.monotonic()
    _, error = run_stream(guarded.target, [config_request(prompt=prompt), *pcm(jfk[:8000])])
    assert_error(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "STT_PROMPT_TOO_LONG",
        "2000000 characters",
        "at most 1000",
        field="streaming_config.config.prompt",
    )
    with guarded.client() as client, pytest.raises(grpc.RpcError) as raised:
        client.speech.Recognize(
            stt_pb2.RecognizeRequest(
                config=stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, prompt=prompt),
                audio_content=float_to_linear16(jfk[:16000]),
            )
        )
    assert_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT, "STT_PROMPT_TOO_LONG", field="config.prompt")
    assert time.monotonic() - started < 5


def test_client_strings_are_quoted_bounded(guarded):
    language = "x" * 100_000
    _, error = run_stream(guarded.target, [config_request(language_code=language)])
    # INVALID_ARGUMENT, not RESOURCE_EXHAUSTED from a 100 KB status message.
    assert_error(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "STT_LANGUAGE_UNSUPPORTED",
        "(100000 characters)",
        field="streaming_config.config.language_code",
    )
    assert len(error.details()) < 400
    _, error = run_stream(guarded.target, [config_request(model="\0" * 1_000_000)])
    assert_error(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "STT_MODEL_UNAVAILABLE",
        field="streaming_config.config.model",
    )
    assert len(error.details()) < 400
    longest = max(len(line) for line in guarded.log().splitlines())
    assert longest < 2000, f"a log line of {longest} characters"


def server_rss_mb(proc) -> float:
    for line in open(f"/proc/{proc.process.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_refused_large_messages_do_not_pile_up_in_memory(guarded):
    # grpc.aio frees a call's last message only in Python's cyclic garbage collection; 60
    # such 10 MB messages once held 550 MB. After a large request the server collects and trims.
    before = server_rss_mb(guarded)
    request = config_request(model="\0" * 8_000_000)
    for _ in range(40):
        _, error = run_stream(guarded.target, [request])
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(1.5)
    grown = server_rss_mb(guarded) - before
    assert grown < 150, f"RSS grew {grown:.0f} MB after 40 refused 8 MB messages (320 MB sent)"


def test_long_recognize_is_refused_and_shorter_ones_leave_health_alone(guarded):
    # 2000 s of MULAW fits the 16 MiB message limit; the duration limit refuses it undecoded.
    with guarded.client() as client:
        config = stt_pb2.RecognitionConfig(encoding=stt_pb2.MULAW, sample_rate_hertz=8000)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            client.speech.Recognize(
                stt_pb2.RecognizeRequest(config=config, audio_content=b"\xff" * (8000 * 2000)), timeout=60
            )
        assert_error(
            raised.value,
            grpc.StatusCode.OUT_OF_RANGE,
            "STT_AUDIO_TOO_LONG",
            "2000.0 s",
            "120 s",
            field="audio_content",
        )
        assert time.monotonic() - started < 10
        # 115 s of room noise: decoded and segmented off the event loop (the watch checks health).
        rng = np.random.default_rng(3)
        noise = (0.003 * rng.standard_normal(16000 * 115)).astype(np.float32)
        response = client.speech.Recognize(
            stt_pb2.RecognizeRequest(
                config=stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16),
                audio_content=float_to_linear16(noise),
            ),
            timeout=120,
        )
        assert list(response.results) == []


def test_recognize_counts_against_the_stream_limit(hardened, jfk):
    wait_until(lambda: hardened.active_streams() == 0, 30, what="earlier streams to end")
    release = threading.Event()

    def stalled():
        yield config_request()
        while not release.wait(0.5):
            yield audio_request(b"\0" * 3200)  # silence: alive, never idle

    with hardened.client(retries=False) as client:
        calls = [client.stream(stalled()) for _ in range(4)]
        wait_until(lambda: hardened.active_streams() == 4, 30, what="4 streams")
        with pytest.raises(grpc.RpcError) as raised:
            client.speech.Recognize(
                stt_pb2.RecognizeRequest(
                    config=stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16),
                    audio_content=float_to_linear16(jfk[:16000]),
                )
            )
        release.set()
        for call in calls:
            assert list(call) == []
    assert_error(raised.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "STT_TOO_MANY_STREAMS", "Recognize")


def test_silent_connections_time_out_and_free_their_slots(guarded, jfk):
    # Three connections that never send a byte, and one that sends 3 s of speech and stops:
    # together they would hold every free slot for as long as they liked.
    release = threading.Event()

    def nothing():
        release.wait(30)
        yield from ()

    def speech_then_nothing():
        yield config_request()
        yield from pcm(jfk[: 16000 * 3])
        release.wait(30)

    with guarded.client() as client:
        started = time.monotonic()
        idle = [client.stream(nothing()) for _ in range(2)]
        talker = client.stream(speech_then_nothing())
        for call in idle:
            with pytest.raises(grpc.RpcError) as raised:
                list(call)
            assert_error(raised.value, grpc.StatusCode.OUT_OF_RANGE, "STT_CONFIG_TIMEOUT", "1.5 s",
                         field="streaming_config")  # fmt: skip
        assert time.monotonic() - started < 5
        responses = []
        with pytest.raises(grpc.RpcError) as raised:
            for response in talker:
                responses.append(response)
        assert_error(
            raised.value, grpc.StatusCode.OUT_OF_RANGE, "STT_AUDIO_TIMEOUT", "2 s", field="audio_content"
        )
        # Its audio was still transcribed before the status.
        finals = [
            r.result.alternatives[0].transcript
            for r in responses
            if r.HasField("result") and r.result.is_final
        ]
        assert "fellow Americans" in " ".join(finals), finals
        release.set()
    wait_until(lambda: guarded.active_streams() <= 1, 10, what="the slots to be free again")


def test_a_flooding_stream_is_held_back_and_others_keep_real_time(guarded, jfk):
    # Ten minutes of speech sent as fast as the server reads it, beside the good stream.
    data = float_to_linear16(np.tile(jfk, 55))
    lags: list[float] = []  # audio received minus audio covered by finals, at each response

    def flood():
        yield config_request()
        for i in range(0, len(data), 3200):
            yield audio_request(data[i : i + 3200])

    with guarded.client() as client:
        call = client.stream(flood())

        def read_responses():
            decoded = 0.0
            try:
                for response in call:
                    if response.HasField("result") and response.result.is_final:
                        decoded = response.result.result_end_offset.ToTimedelta().total_seconds()
                    lags.append(response.total_billed_time.ToTimedelta().total_seconds() - decoded)
            except grpc.RpcError:
                pass  # cancelled below

        reader = threading.Thread(target=read_responses, daemon=True)
        reader.start()
        time.sleep(10)
        call.cancel()
        reader.join(10)
    # Without backpressure the server reads all 605 s within a second or two and the lag
    # grows to hundreds of seconds. With it, reading waits while more than the 10 s backlog
    # of ended utterances is undecoded: the lag stays under that plus one open utterance
    # (at most 20 s) and the chunk in hand.
    assert lags and max(lags) < 10 + 20 + 2, f"received audio ran {max(lags):.0f} s ahead of finals"
    assert lags[-1] > 30 or len(lags) > 20, "the flood never got going"


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["--workers", "0"], {}, "--workers: 0 is out of range"),
        (["--max-streams", "-3"], {}, "--max-streams: -3 is out of range"),
        (["--drain-seconds", "soon"], {}, "--drain-seconds: 'soon' is not a number"),
        ([], {"STT_THREADS": "many"}, "--threads: 'many' is not an integer"),
        (["--log-level", "BOGUS"], {}, "--log-level: 'BOGUS' is not a log level"),
        ([], {"STT_LOG_LEVEL": "verbose"}, "--log-level: 'verbose' is not a log level"),
        ([], {"STT_LOG_FORMAT": "xml"}, "--log-format: 'xml' is not one of text, json (from STT_LOG_FORMAT)"),
        (["--address", "50051"], {}, "--address: '50051' is not HOST:PORT"),
        (["--model", "./no/such/model"], {}, "--model ./no/such/model: no such directory"),
        (["--model", str(REPO)], {}, "not a CTranslate2 model directory"),
        (["--model", "tiny.fr"], {}, "--model tiny.fr: unknown model name"),
    ],
)
def test_bad_startup_is_one_line_and_exit_code_2(args, env, words):
    import os

    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--address", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and words in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
