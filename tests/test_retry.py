"""Retry guidance: refusals a client may repeat carry google.rpc.RetryInfo and the
grpc-retry-pushback-ms trailer, SpeechClient's service config really retries Recognize on
them, and the README says which errors are retryable and shows the service config."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_status import rpc_status

from engine.api import SERVICE_NAME, stt_pb2
from engine.client import RETRY_SERVICE_CONFIG, SpeechClient, StreamConfig
from engine.errors import RETRY_DELAYS, error_reason
from tests.helpers import (
    JFK_TEXT,
    REPO,
    ServerProcess,
    assert_retry_after,
    serving,
    wait_until,
    wer,
)
from tests.test_errors import audio_request

# Pushback timers may fire a little early; a backoff instead of the pushback would be far shorter.
TIMER_SLACK = 0.05


@pytest.fixture(scope="module")
def one_slot() -> Iterator[ServerProcess]:
    """A server that takes one stream or Recognize call at a time."""
    with serving("--max-streams", "1", "--workers", "1", "--threads", "1") as proc:
        yield proc


class HeldStream:
    """A stream that holds a server slot, sending silence so it never idles, until ``end``."""

    def __init__(self, client: SpeechClient) -> None:
        self._release = threading.Event()

        def requests():
            yield StreamConfig().first_request()
            while not self._release.wait(0.5):
                yield audio_request(b"\0" * 3200)

        self._call = client.stream(requests())

    def end(self) -> None:
        self._release.set()
        assert list(self._call) == []


def refusals(server: ServerProcess, method: str, reason: str) -> int:
    """How many calls of ``method`` the server has refused for ``reason`` (its warning log)."""
    return sum(f"/{method} failed:" in line and reason in line for line in server.log().splitlines())


def reason_of(error: grpc.RpcError) -> str | None:
    return error_reason(rpc_status.from_call(error))


def timed(call: Callable[[], stt_pb2.RecognizeResponse]) -> tuple[stt_pb2.RecognizeResponse, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def transcript(response: stt_pb2.RecognizeResponse) -> str:
    return " ".join(result.alternatives[0].transcript for result in response.results)


def test_a_stream_over_capacity_gets_retry_info(one_slot):
    wait_until(lambda: one_slot.active_streams() == 0, 30, what="earlier calls to end")
    with one_slot.client() as client:
        held = HeldStream(client)
        wait_until(lambda: one_slot.active_streams() == 1, 30, what="the held stream to be admitted")
        with pytest.raises(grpc.RpcError) as refused:
            list(client.stream([StreamConfig().first_request()]))
        held.end()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(refused.value) == "STT_TOO_MANY_STREAMS"
    assert_retry_after(refused.value, "STT_TOO_MANY_STREAMS")


def test_recognize_at_capacity_is_retried_until_the_slot_frees(one_slot, jfk):
    wait_until(lambda: one_slot.active_streams() == 0, 30, what="earlier calls to end")
    with one_slot.client() as client, one_slot.client(retries=False) as once:
        held = HeldStream(client)
        wait_until(lambda: one_slot.active_streams() == 1, 30, what="the held stream to be admitted")
        # Without retries the refusal comes straight back, saying when to try again.
        with pytest.raises(grpc.RpcError) as refused:
            once.recognize(jfk)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_retry_after(refused.value, "STT_TOO_MANY_STREAMS")
        before = refusals(one_slot, "Recognize", "STT_TOO_MANY_STREAMS")
        # The whole 11 s of JFK (352 KB) is more than gRPC keeps for a retry by default (256 KiB):
        # this call is retried only because the client raises that buffer.
        with ThreadPoolExecutor(1) as pool:
            retried = pool.submit(timed, lambda: client.recognize(jfk))
            wait_until(
                lambda: refusals(one_slot, "Recognize", "STT_TOO_MANY_STREAMS") > before,
                30,
                what="the retried Recognize call's first refusal",
            )
            held.end()  # frees the slot for the next attempt
            response, elapsed = retried.result(timeout=120)
    refused_attempts = refusals(one_slot, "Recognize", "STT_TOO_MANY_STREAMS") - before
    assert refused_attempts >= 1
    # Each refused attempt waited out the server's pushback, not gRPC's shorter random backoff.
    assert elapsed >= refused_attempts * RETRY_DELAYS["STT_TOO_MANY_STREAMS"] - TIMER_SLACK
    assert wer([JFK_TEXT], [transcript(response)]) < 0.1


def test_recognize_while_the_model_loads_is_retried_until_it_is_served(server_factory, jfk):
    # Extra warm-up rounds make loading last a second or two here: long enough to be caught,
    # well within what four retries 2 s apart wait out.
    server = server_factory(env={"STT_WARMUP_RUNS": "8"}, ready=False)
    with server.client(retries=False) as once, server.client() as client:

        def listening_status() -> str | None:
            try:
                return once.health(timeout=1)
            except grpc.RpcError:
                return None  # the port is not open yet

        assert wait_until(listening_status, 60, what="the port to open") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as streaming:
            list(once.stream_audio(jfk[:16000], StreamConfig(), realtime=False))
        with pytest.raises(grpc.RpcError) as unary:
            once.recognize(jfk)
        for refused in (streaming.value, unary.value):
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(refused) == "STT_MODEL_LOADING"
            assert_retry_after(refused, "STT_MODEL_LOADING")
        before = refusals(server, "Recognize", "STT_MODEL_LOADING")
        response, elapsed = timed(lambda: client.recognize(jfk))
    refused_attempts = refusals(server, "Recognize", "STT_MODEL_LOADING") - before
    assert refused_attempts >= 1, "the retried call was never refused: the model loaded too soon"
    assert elapsed >= refused_attempts * RETRY_DELAYS["STT_MODEL_LOADING"] - TIMER_SLACK
    assert wer([JFK_TEXT], [transcript(response)]) < 0.1


# --- the service config and the README ---------------------------------------------------------------


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_the_service_config_retries_only_the_unary_methods():
    (method_config,) = RETRY_SERVICE_CONFIG["methodConfig"]
    names = {(name["service"], name["method"]) for name in method_config["name"]}
    assert names == {(SERVICE_NAME, "Recognize"), (SERVICE_NAME, "GetServerInfo")}
    methods = stt_pb2.DESCRIPTOR.services_by_name["Speech"].methods_by_name
    assert all(method in methods for _, method in names)
    policy = method_config["retryPolicy"]
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert policy["maxAttempts"] == 5  # gRPC's most: a larger value is cut to 5


def test_the_readme_shows_the_shipped_service_config():
    blocks = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", readme(), re.S)]
    assert RETRY_SERVICE_CONFIG in blocks


def error_table() -> list[tuple[list[str], str]]:
    """The README error table's rows: the reasons and the retry cell of each."""
    section = readme().split("### Errors", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`STT_" in line]
    cells = [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]
    assert all(len(row) == 4 for row in cells), "situation | status | reason | retry"
    return [(re.findall(r"`(STT_[A-Z_]+)`", reason), retry) for _, _, reason, retry in cells]


def test_the_readme_error_table_says_which_errors_are_retryable_and_after_how_long():
    documented: dict[str, float] = {}
    for reasons, retry in error_table():
        assert len(reasons) == 1, reasons
        (reason,) = reasons
        after = re.match(r"after (\d+(?:\.\d+)?) s\b", retry)
        if after:
            documented[reason] = float(after.group(1))
        else:
            assert retry.startswith("no"), (reason, retry)
            assert reason not in RETRY_DELAYS, f"{reason} is retryable in the code"
    assert documented == RETRY_DELAYS
