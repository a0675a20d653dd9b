"""Where a final's latency goes: the breakdown on the utterance span and in the metrics.

A real server exports OTLP to a real receiver while two clients stream real speech (a short,
a medium and a long clip, in two orders) in real time. Every utterance span that produced a
final carries the breakdown; the arithmetic is checked on its own below.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from otel.instruments import FINAL_PHASES, LENGTH_CLASSES, length_class
from otel.telemetry import DecodeTiming, latency_breakdown
from tests.helpers import ServerProcess, load_clips
from tests.otlp_receiver import OtlpReceiver
from tests.test_telemetry import attributes

# The phases are computed to add up to the latency; exported as doubles, they do to rounding.
SUM_TOLERANCE = 1e-6
ENDPOINT_REASONS = {"silence", "end_of_stream", "max_length", "confident", "sentence"}
# The server's latency starts when the chunk holding the speech end has been processed, the
# client's when it sent that chunk: the server's is the shorter by the trip and the processing.
CLIENT_TOLERANCE = 0.15
BREAKDOWN_KEYS = (
    "stt.final.latency",
    "stt.final.endpoint_wait",
    "stt.final.queue_wait",
    "stt.final.decode_duration",
    "stt.final.ordering_wait",
    "stt.final.hidden_decode_duration",
)
PARTS = (
    "stt.final.endpoint_wait",
    "stt.final.queue_wait",
    "stt.final.decode_duration",
    "stt.final.ordering_wait",
)
CLIPS = ("ldc93s1.wav", "ls_1272-128104-0000.wav", "lj001-0001.wav")  # 2.9 s, 5.9 s, 9.7 s
PAUSE = 1.5


# --- the arithmetic ------------------------------------------------------------------------------


def test_a_final_decoded_after_the_endpoint_splits_into_wait_queue_decode_and_ordering():
    # Speech end arrives at 10.0, endpoint at 10.7, the decode waits 0.1 s for a worker, runs
    # 0.4 s (0.35 s of model time), and the final leaves at 11.5 after the one before it.
    decode = DecodeTiming(queued_at=10.7, started_at=10.8, finished_at=11.2, model_seconds=0.35)
    parts = latency_breakdown(10.0, 10.7, 11.5, [decode])
    assert parts.latency == pytest.approx(1.5)
    assert parts.endpoint_wait == pytest.approx(0.7)
    assert parts.queue_wait == pytest.approx(0.1)
    assert parts.decode == pytest.approx(0.35)
    assert parts.ordering_wait == pytest.approx(0.35)  # 0.3 s after the decode, 0.05 s hand-off
    assert parts.hidden_decode == 0 and parts.decodes == 1 and not parts.speculative
    assert sum(parts.phases().values()) == pytest.approx(parts.latency)


def test_a_speculative_decode_hides_its_model_time_before_the_endpoint():
    # Started in the pause at 10.3; 0.3 s of its 0.5 s run fall before the decision at 10.7.
    decode = DecodeTiming(
        queued_at=10.3, started_at=10.3, finished_at=10.8, model_seconds=0.5, speculative=True
    )
    parts = latency_breakdown(10.0, 10.7, 10.85, [decode])
    assert parts.speculative and parts.decodes == 1
    assert parts.decode == pytest.approx(0.1) and parts.hidden_decode == pytest.approx(0.4)
    assert parts.queue_wait == 0
    assert parts.endpoint_wait + parts.decode + parts.ordering_wait == pytest.approx(0.85)


def test_a_final_decoded_in_parts_counts_every_decode_and_its_queue_waits():
    whole = DecodeTiming(queued_at=1.0, started_at=1.0, finished_at=1.5, model_seconds=0.5)
    head = DecodeTiming(queued_at=1.5, started_at=1.6, finished_at=1.8, model_seconds=0.2)
    tail = DecodeTiming(queued_at=1.8, started_at=1.8, finished_at=2.1, model_seconds=0.3)
    parts = latency_breakdown(0.2, 1.0, 2.1, [whole, head, tail])
    assert parts.decodes == 3
    assert parts.decode == pytest.approx(1.0) and parts.queue_wait == pytest.approx(0.1)
    assert parts.endpoint_wait == pytest.approx(0.8) and parts.ordering_wait == pytest.approx(0.0)


def test_an_endpoint_decided_before_the_audio_was_processed_waits_nothing():
    # A client sending faster than real time: the chunk holding the speech end also held the
    # endpoint's silence, and its processing time is stamped after the decision.
    decode = DecodeTiming(queued_at=5.0, started_at=5.0, finished_at=5.4, model_seconds=0.4)
    parts = latency_breakdown(5.1, 5.0, 5.5, [decode])
    assert parts.endpoint_wait == 0 and parts.latency == pytest.approx(0.4)
    assert parts.decode == pytest.approx(0.3) and parts.hidden_decode == pytest.approx(0.1)
    assert sum(parts.phases().values()) == pytest.approx(parts.latency)


def test_length_classes_have_the_stated_bounds():
    assert [bound for _, bound in LENGTH_CLASSES] == [3.0, 8.0, math.inf]
    assert [length_class(s) for s in (0.5, 2.99, 3.0, 7.99, 8.0, 20.0)] == [
        "short",
        "short",
        "medium",
        "medium",
        "long",
        "long",
    ]


# --- the bench's count of words said twice at piece joins ---------------------------------------

SENTENCES = "She had your dark suit in greasy wash water all year. Ask not what your country can do for you."


def test_words_said_twice_at_a_join_are_counted():
    from bench.streaming import words_said_twice

    clean = [
        "She had your dark suit",
        "in greasy wash water all year.",
        "Ask not what your country can do for you.",
    ]
    assert words_said_twice(clean, SENTENCES) == []
    doubled = [
        "She had your dark suit in",
        "in greasy wash water all year. Ask not what",
        "not what your country",
    ]
    assert words_said_twice([*doubled, "can do for you."], SENTENCES) == ["in", "not what"]


def test_a_repeat_the_speaker_said_is_not_counted():
    from bench.streaming import words_said_twice

    reference = "I said that that is the rule, and that is that."
    assert words_said_twice(["I said that", "that is the rule, and that is that."], reference) == []
    # The same words doubled where the speaker said them once are counted.
    assert words_said_twice(["and that is", "that is that"], "and that is that") == ["that is"]


# --- a real server ----------------------------------------------------------------------------------


def joined(order: list[str]) -> np.ndarray:
    clips = {clip.name: clip.audio for clip in load_clips()}
    gap = np.zeros(int(PAUSE * 16000), np.float32)
    parts = [np.zeros(16000, np.float32)]
    for name in order:
        parts += [clips[name], gap]
    return np.concatenate(parts + [gap])


def stream(server: ServerProcess, audio: np.ndarray, out: dict) -> None:
    """Real-time stream; records its trace id and each final's client-side latency from the
    moment the chunk holding the utterance's speech end was sent."""
    with server.client() as client:
        started = time.monotonic()
        call = client.stream_audio(audio, realtime=True, started=started)
        finals = {}
        for response in call:
            if response.HasField("result") and response.result.is_final:
                finals[response.result.utterance_index] = time.monotonic() - started
        out["trace_id"] = dict(call.initial_metadata())["x-trace-id"]
        out["finals"] = finals


def latest_points(receiver, name: str) -> list:
    """The last exported point of each attribute set (cumulative temporality)."""
    latest = {}
    for point in receiver.metric_points().get(name, []):
        latest[tuple(sorted(attributes(point).items()))] = point
    return list(latest.values())


@pytest.fixture(scope="module")
def broken_down():
    receiver = OtlpReceiver().start()
    server = ServerProcess(
        "--workers",
        "1",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
    )
    try:
        server.wait_ready()
        streams = [{}, {}]
        orders = [list(CLIPS), [CLIPS[2], CLIPS[0], CLIPS[1]]]
        threads = [
            threading.Thread(target=stream, args=(server, joined(order), out))
            for order, out in zip(orders, streams)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert all(out.get("finals") for out in streams), streams
        finals = sum(len(out["finals"]) for out in streams)

        def settled() -> bool:
            points = latest_points(receiver, "stt.final.phase.duration")
            decode = sum(p.count for p in points if attributes(p)["stt.final.phase"] == "decode")
            return decode == finals

        receiver.wait_for(settled)
        yield {"receiver": receiver, "streams": streams, "finals": finals}
    finally:
        code = server.stop()
        receiver.stop()
    assert code == 0


def utterances(broken_down, out: dict) -> dict[int, tuple]:
    """Utterance index -> (its span's attributes, its final decode spans' attributes)."""
    spans = [s for s in broken_down["receiver"].spans() if s.trace_id.hex() == out["trace_id"]]
    found = {}
    for span in spans:
        if span.name != "stt.utterance":
            continue
        decodes = sorted(
            (s for s in spans if s.name == "stt.decode.final" and s.parent_span_id == span.span_id),
            key=lambda s: s.start_time_unix_nano,
        )
        found[attributes(span)["stt.utterance.index"]] = (attributes(span), [attributes(d) for d in decodes])
    return found


def made_the_final(utterance: dict, decodes: list[dict]) -> list[dict]:
    """The decodes whose results made the final: the last one of the utterance's whole audio,
    and any that decoded it in parts after it. (Speculative decodes before it were discarded
    when speech resumed.)"""
    whole = [
        i
        for i, d in enumerate(decodes)
        if abs(d["stt.decode.audio_start_offset"] - utterance["stt.utterance.start_offset"]) < 1e-6
        and abs(d["stt.decode.audio_end_offset"] - utterance["stt.utterance.end_offset"]) < 1e-6
    ]
    return decodes[whole[-1] :]


def test_every_final_carries_a_breakdown_that_adds_up(broken_down):
    classes = set()
    for out in broken_down["streams"]:
        found = utterances(broken_down, out)
        assert set(out["finals"]) <= set(found)
        for index in out["finals"]:
            utterance, _ = found[index]
            missing = [key for key in BREAKDOWN_KEYS if key not in utterance]
            assert not missing, (index, missing)
            assert all(utterance[key] >= 0 for key in BREAKDOWN_KEYS), utterance
            parts = sum(utterance[key] for key in PARTS)
            assert parts == pytest.approx(utterance["stt.final.latency"], abs=SUM_TOLERANCE)
            speech = utterance["stt.utterance.speech_duration"]
            assert speech == pytest.approx(
                utterance["stt.utterance.speech_end_offset"] - utterance["stt.utterance.start_offset"]
            )
            assert utterance["stt.utterance.length_class"] == length_class(speech)
            classes.add(utterance["stt.utterance.length_class"])
            assert utterance["stt.utterance.endpoint_reason"] in ENDPOINT_REASONS
            if utterance["stt.utterance.endpoint_reason"] == "silence":
                # The endpoint waits for silence, real time: a few hundred ms, not nothing.
                assert 0.1 < utterance["stt.final.endpoint_wait"] < 2.0, utterance
    # lj001-0001's 9.7 s may be cut at a sentence end into medium finals.
    assert "short" in classes and classes & {"medium", "long"}, classes


def test_the_latency_is_what_the_client_waited(broken_down):
    for out in broken_down["streams"]:
        found = utterances(broken_down, out)
        for index, arrived in out["finals"].items():
            utterance, _ = found[index]
            speech_end = utterance["stt.utterance.speech_end_offset"]
            sent = math.ceil(round(speech_end * 10, 6)) / 10  # the 100 ms chunk holding it left then
            client_latency = arrived - sent
            assert -0.02 <= client_latency - utterance["stt.final.latency"] < CLIENT_TOLERANCE, (
                index,
                client_latency,
                utterance,
            )


def test_the_decode_time_is_the_final_decodes_model_time(broken_down):
    speculative = 0
    for out in broken_down["streams"]:
        found = utterances(broken_down, out)
        for index in out["finals"]:
            utterance, decodes = found[index]
            used = made_the_final(utterance, decodes)
            assert utterance["stt.final.decode_count"] == len(used)
            model = sum(d["stt.decode.encode_duration"] + d["stt.decode.decoder_duration"] for d in used)
            shown = utterance["stt.final.decode_duration"] + utterance["stt.final.hidden_decode_duration"]
            assert shown == pytest.approx(model, abs=SUM_TOLERANCE)
            assert utterance["stt.final.speculative"] is used[0]["stt.decode.speculative"]
            if not utterance["stt.final.speculative"]:
                assert utterance["stt.final.hidden_decode_duration"] == pytest.approx(0, abs=SUM_TOLERANCE)
            speculative += utterance["stt.final.speculative"]
    assert speculative, "no final started in the pause before its endpoint"


def test_the_phase_histograms_are_exported_by_length_class(broken_down):
    receiver = broken_down["receiver"]
    points = latest_points(receiver, "stt.final.phase.duration")
    assert points
    keys = {tuple(sorted(attributes(p))) for p in points}
    assert keys == {("stt.final.phase", "stt.utterance.endpoint_reason", "stt.utterance.length_class")}
    assert {attributes(p)["stt.final.phase"] for p in points} == set(FINAL_PHASES)
    spans = {}
    for out in broken_down["streams"]:
        found = utterances(broken_down, out)
        spans.update({(out["trace_id"], i): found[i][0] for i in out["finals"]})
    for phase in FINAL_PHASES:
        mine = [p for p in points if attributes(p)["stt.final.phase"] == phase]
        by_class = {}
        for point in mine:
            length = attributes(point)["stt.utterance.length_class"]
            by_class[length] = by_class.get(length, 0) + point.count
        expected = {}
        for utterance in spans.values():
            length = utterance["stt.utterance.length_class"]
            expected[length] = expected.get(length, 0) + 1
        assert by_class == expected, phase
    # The phases of every final add up to the final latency histogram's sum.
    total = sum(p.sum for p in points)
    (latency,) = latest_points(receiver, "stt.final.latency")
    assert latency.count == broken_down["finals"]
    assert total == pytest.approx(latency.sum, abs=1e-3)
    assert total == pytest.approx(sum(u["stt.final.latency"] for u in spans.values()), abs=1e-3)
