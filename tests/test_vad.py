"""Streaming VAD equals the batch model; segmentation finds utterances, not silence."""

import dataclasses

import numpy as np
import pytest

from engine.options import StreamingOptions
from engine.recognizer import (
    AudioBuffer,
    EndpointLikely,
    InterimDue,
    InterimWindow,
    LocalAgreement,
    SpeechResumed,
    SpeechStarted,
    StreamingRecognizer,
    UtteranceEnded,
)
from engine.vad import StreamingVad
from tests.helpers import feed


def test_streaming_vad_matches_whole_file(jfk):
    from faster_whisper.vad import get_vad_model

    audio = jfk[: len(jfk) // 512 * 512]
    whole = np.asarray(get_vad_model()(audio)).reshape(-1)
    vad = StreamingVad()
    chunked = np.concatenate([vad.process(audio[i : i + 1234]) for i in range(0, len(audio), 1234)])
    assert chunked.shape == whole.shape
    assert np.allclose(chunked, whole, atol=1e-5)


def test_utterances_cover_speech_without_overlap(jfk):
    padded = np.concatenate([np.zeros(16000, np.float32), jfk, np.zeros(32000, np.float32)])
    events = feed(StreamingRecognizer(StreamingOptions()), padded)
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    started = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(ended) >= 2 and len(started) == len(ended)
    assert ended[0].start >= 0.5  # the leading second of silence is not speech
    for previous, following in zip(ended, ended[1:]):
        assert following.start >= previous.end  # no audio decoded twice
    assert all(e.reason == "silence" for e in ended)


def test_chunking_never_changes_a_probability_with_state_refreshes(jfk):
    audio = np.concatenate([np.zeros(16000 * 5, np.float32), jfk])
    whole = StreamingVad(refresh_frames=62).process(audio)
    vad = StreamingVad(refresh_frames=62)
    chunked = np.concatenate([vad.process(audio[i : i + 1000]) for i in range(0, len(audio), 1000)])
    assert np.array_equal(chunked, whole) and vad.refreshes >= 2


def room_noise(seconds: float, seed: int) -> np.ndarray:
    """Pink noise with a mains hum at -55 dBFS: a quiet room."""
    from bench.audio_sets import pink_noise

    return pink_noise(seconds, -55.0, seed)


def quiet_sentence_after_room_noise(clips) -> tuple[np.ndarray, float, float]:
    (clip,) = [c for c in clips if c.name == "ldc93s1.wav"]
    speech = clip.audio * 10 ** (-30 / 20) / np.max(np.abs(clip.audio))  # peaks at -30 dBFS
    speech = speech + room_noise(clip.seconds, 2)[: len(speech)]
    audio = np.concatenate([room_noise(30, 1), speech, room_noise(2, 3)]).astype(np.float32)
    return audio, 30.0, 30.0 + clip.seconds


def test_a_quiet_sentence_after_long_room_noise_is_not_lost(clips):
    # Carried through 30 s of room noise, Silero's state drifts: the sentence, detected whole
    # on a fresh state, scored under the threshold in every frame. Refreshing the state
    # during non-speech (vad_refresh_ms) keeps the onset judged as on a fresh state.
    audio, start, end = quiet_sentence_after_room_noise(clips)

    def covered(options: StreamingOptions) -> float:
        ended = [e for e in feed(StreamingRecognizer(options), audio) if isinstance(e, UtteranceEnded)]
        return sum(max(0.0, min(end, e.end) - max(start, e.start)) for e in ended) / (end - start)

    assert covered(StreamingOptions(vad_refresh_ms=0)) == 0.0  # the defect, as it was
    assert covered(StreamingOptions()) > 0.9


def test_a_refresh_never_scores_speech_lower(jfk):
    # JFK's "ask not" starts about 1 s after "Americans": a state reset in that pause alone
    # scored it under the threshold and the words were lost. The carried state still votes.
    opening = jfk[: 16000 * 5]
    carried = StreamingVad().process(opening)
    vad = StreamingVad(refresh_frames=31)
    refreshed = vad.process(opening)
    assert vad.refreshes >= 1
    assert np.all(refreshed >= carried - 1e-6)
    ended = [
        e for e in feed(StreamingRecognizer(StreamingOptions()), opening) if isinstance(e, UtteranceEnded)
    ]
    assert [round(e.start) for e in ended] == [0, 3]  # "And so my fellow Americans", "ask not"


def test_silence_and_noise_make_no_utterances():
    rng = np.random.default_rng(1)
    silence = np.zeros(16000 * 5, np.float32)
    noise = (0.05 * rng.standard_normal(16000 * 5)).astype(np.float32)
    louder_room = room_noise(60, 4) * 10  # -35 dBFS for a minute: the state is refreshed 30 times
    for audio in (silence, noise, louder_room):
        assert feed(StreamingRecognizer(StreamingOptions()), audio) == []


def test_long_speech_is_split_at_max_length(jfk):
    options = StreamingOptions(max_utterance_ms=3000, split_search_ms=1500, silence_duration_ms=3000)
    ended = [e for e in feed(StreamingRecognizer(options), jfk) if isinstance(e, UtteranceEnded)]
    assert any(e.reason == "max_length" for e in ended)
    assert all(e.end - e.start <= 3.0 + 0.3 + 0.05 for e in ended)


def check_speculations(events: list) -> tuple[int, int]:
    """Every EndpointLikely is either withdrawn by SpeechResumed or becomes the utterance's
    exact audio; returns (used, discarded)."""
    used = discarded = 0
    pending = None
    for event in events:
        if isinstance(event, EndpointLikely):
            assert pending is None
            pending = event
        elif isinstance(event, SpeechResumed):
            assert pending is not None and pending.utterance_index == event.utterance_index
            pending, discarded = None, discarded + 1
        elif isinstance(event, UtteranceEnded) and pending is not None:
            assert (pending.utterance_index, pending.start, pending.end) == (
                event.utterance_index,
                event.start,
                event.end,
            )
            assert np.array_equal(pending.audio, event.audio)
            pending, used = None, used + 1
    return used, discarded


def test_speculative_final_audio_is_the_final_audio(jfk):
    padded = np.concatenate([np.zeros(16000, np.float32), jfk, np.zeros(32000, np.float32)])
    events = feed(StreamingRecognizer(StreamingOptions()), padded)
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    used, _ = check_speculations(events)
    assert used == len(ended)  # every endpoint was foreseen 450 ms early


def test_speech_resuming_withdraws_the_speculation(jfk):
    # A 1 s gap inside a 3 s endpoint: speculated on, then withdrawn when speech returns.
    audio = np.concatenate([jfk, np.zeros(16000, np.float32), jfk, np.zeros(16000 * 4, np.float32)])
    options = StreamingOptions(silence_duration_ms=3000, max_utterance_ms=28000)
    events = feed(StreamingRecognizer(options), audio)
    used, discarded = check_speculations(events)
    assert discarded >= 1 and used == 1
    assert len([e for e in events if isinstance(e, UtteranceEnded)]) == 1


def test_end_of_stream_in_a_pause_ends_where_the_endpoint_would(jfk):
    audio = np.concatenate([jfk, np.zeros(8000, np.float32)])  # stops 500 ms into silence
    events = feed(StreamingRecognizer(StreamingOptions(silence_duration_ms=3000)), audio)
    last = events[-1]
    assert isinstance(last, UtteranceEnded) and last.reason == "end_of_stream"
    # The speculation's audio, which ends in the pause, speculative_final_ms after the speech.
    assert last.end == pytest.approx(last.speech_end + 0.25, abs=0.02)
    assert check_speculations(events)[0] == 1


def test_continuous_speech_is_cut_at_short_pauses_once_an_utterance_is_long(jfk):
    # Three JFKs with 0.4 s breaths, and an endpoint silence longer than JFK's own pauses:
    # speech that never pauses for the endpoint.
    breath = np.zeros(int(0.4 * 16000), np.float32)
    audio = np.concatenate([jfk, breath, jfk, breath, jfk, np.zeros(16000, np.float32)])

    def utterances(options: StreamingOptions) -> list[UtteranceEnded]:
        return [e for e in feed(StreamingRecognizer(options), audio) if isinstance(e, UtteranceEnded)]

    ended = utterances(StreamingOptions(silence_duration_ms=1500, long_utterance_ms=8000))
    # Each ends at a pause of 300 ms or more once it is 8 s long: at the latest the breath
    # after its JFK (11 s), never cut mid-phrase at the 20 s limit.
    assert all(e.reason == "silence" and e.end - e.start < 12 for e in ended), ended
    assert len(ended) >= 3
    # Without the rule: one utterance runs to the limit and is cut there.
    unbounded = utterances(StreamingOptions(silence_duration_ms=1500))
    assert any(e.reason == "max_length" for e in unbounded)


def test_interims_come_less_often_once_an_utterance_outgrows_the_window(jfk):
    # JFK as one utterance (its pauses are shorter than this endpoint silence).
    options = StreamingOptions(silence_duration_ms=1500)

    def gaps(options: StreamingOptions) -> list[tuple[float, float]]:
        """(utterance audio so far, new audio since the previous interim) per interim."""
        due = [e for e in feed(StreamingRecognizer(options), jfk) if isinstance(e, InterimDue)]
        return [(b.end - b.start, b.end - a.end) for a, b in zip(due, due[1:])]

    within, beyond = [], []
    for length, gap in gaps(options):
        (within if length <= 4.0 + 1.0 else beyond).append(gap)
    assert within and min(within) == pytest.approx(1.0, abs=0.11)
    assert beyond and min(beyond) >= 1.5 - 0.01
    # A stream that asked for a slower cadence keeps it throughout.
    slow = dataclasses.replace(options, interim_interval_ms=2000)
    assert min(gap for _, gap in gaps(slow)) >= 2.0 - 0.01


def test_speculation_can_be_disabled(jfk):
    events = feed(StreamingRecognizer(StreamingOptions(speculative_final_ms=0)), jfk)
    assert not any(isinstance(e, (EndpointLikely, SpeechResumed)) for e in events)


def test_audio_buffer_matches_a_plain_array():
    rng = np.random.default_rng(7)
    buffer, reference, start = AudioBuffer(), np.zeros(0, np.float32), 0
    for _ in range(400):
        chunk = rng.standard_normal(int(rng.integers(0, 9000))).astype(np.float32)
        buffer.append(chunk)
        reference = np.concatenate([reference, chunk])
        if rng.random() < 0.3:
            keep_from = start + int(rng.integers(0, len(reference) + 1))
            buffer.trim(keep_from)
            reference, start = reference[keep_from - start :], keep_from
        assert (buffer.start, buffer.end) == (start, start + len(reference))
        lo = start + int(rng.integers(0, len(reference) + 1))
        hi = lo + int(rng.integers(0, 20000))
        assert np.array_equal(buffer.slice(lo, hi), reference[lo - start : hi - start])


def test_local_agreement_prefix_only_grows():
    agreement = LocalAgreement()
    assert agreement.update("and so my") == ("and so my", 0.0)
    text, stability = agreement.update("And so, my fellow")
    assert agreement.stable_text == "And so, my" and stability == 0.75
    text, _ = agreement.update("and so my fellow Americans")
    assert agreement.stable_text == "And so, my fellow"
    assert text == "And so, my fellow Americans"
    text, _ = agreement.update("completely different words")
    assert text.startswith("And so, my fellow")


def test_interim_window_moves_past_agreed_words_once_it_is_full():
    from engine.model import Word

    window = InterimWindow(4.0)
    plan = window.plan(2.5)
    assert (plan.start, plan.said_before, plan.prefix, plan.align) == (0.0, "", "", False)
    window.update("And so my fellow")
    window.update("And so my fellow Americans")  # agrees on "And so my fellow"
    plan = window.plan(4.5)
    assert plan.prefix == "And so my fellow" and plan.align and plan.start == 0.0
    said = "And so my fellow Americans ask"
    words = [Word(w, i * 0.5, i * 0.5 + 0.4, 0.9) for i, w in enumerate(said.split())]
    text, _ = window.update(said, words)
    assert window.stable_text == "And so my fellow Americans"
    # The window now starts where the last agreed word ends, and those words become the prompt.
    plan = window.plan(5.5)
    assert plan.start == 2.4 and plan.said_before == "And so my fellow Americans" and plan.prefix == ""
    assert not plan.align  # 3.1 s of window: not full
    text, stability = window.update("ask not what")
    assert text == "And so my fellow Americans ask not what" and stability == 6 / 8
    # Words that do not match the text one to one cannot place the window: it stays.
    window.update("ask not what your", words[:2])
    assert window.start == 2.4 and window.stable_text == "And so my fellow Americans ask not what"


def test_a_zero_window_decodes_the_whole_utterance():
    window = InterimWindow(0)
    window.update("and so my")
    window.update("and so my fellow")
    plan = window.plan(25.0)
    assert plan.start == 0.0 and not plan.align and plan.prefix == "and so my"
