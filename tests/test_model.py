"""The model and the inference scheduler, with the real tiny.en weights."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import ctranslate2
import numpy as np
import pytest

from engine.model import DecodeRequest, SpeechModel
from engine.options import DecodeOptions, ModelOptions
from engine.quality import recognition_quality
from engine.recognizer import InterimWindow
from engine.scheduler import InferenceScheduler, StaleInterim
from engine.text import has_words, is_repetition_loop
from tests.helpers import JFK_TEXT, wer

CUDA_DEVICES = ctranslate2.get_cuda_device_count()


@pytest.fixture(scope="module")
def model() -> SpeechModel:
    # "auto" picks CUDA where CTranslate2 sees a GPU, the CPU otherwise.
    return SpeechModel(ModelOptions(device="auto", compute_type="default", workers=2))


def test_auto_device_loads_and_decodes(model, jfk):
    assert model.device == ("cuda" if CUDA_DEVICES else "cpu")
    hypothesis = model.decode(jfk, DecodeRequest(final=True, word_timestamps=True))
    assert wer([JFK_TEXT], [hypothesis.text]) < 0.1
    assert hypothesis.encoder_frames == 2100  # 11 s of audio + 10 s of padding, not 3000
    assert hypothesis.words[0].word == "And" and hypothesis.words[-1].end <= 11.0


@pytest.mark.skipif(CUDA_DEVICES == 0, reason="needs an NVIDIA GPU (CTranslate2 sees none)")
def test_cuda_float16_decodes(jfk):
    gpu = SpeechModel(ModelOptions(device="cuda", compute_type="float16", workers=1))
    assert gpu.device == "cuda"
    hypothesis = gpu.decode(jfk, DecodeRequest(final=True, word_timestamps=True))
    assert wer([JFK_TEXT], [hypothesis.text]) < 0.1 and hypothesis.encoder_frames == 2100


def test_encoder_input_is_sized_to_the_audio(model, jfk):
    short = model.decode(jfk[:32000], DecodeRequest(final=False))
    final = model.decode(jfk[:32000], DecodeRequest(final=True))
    assert short.encoder_frames == DecodeOptions().interim_min_encoder_frames
    assert final.encoder_frames == 200 + DecodeOptions().final_padding_frames  # 2 s + 10 s
    assert short.beam_size == 1


def test_interims_decode_a_bounded_window_of_a_long_utterance(model, jfk):
    # JFK's 11 s as one utterance, an interim every second: past 4 s of window, the agreed
    # words move from audio to prompt, and the transcript stays whole.
    window, decoded, transcript = InterimWindow(4.0), [], ""
    for end in range(8000, len(jfk) + 1, 16000):
        plan = window.plan(end / 16000)
        request = DecodeRequest(
            final=False, said_before=plan.said_before, prefix=plan.prefix, word_timestamps=plan.align
        )
        hypothesis = model.decode(jfk[round(plan.start * 16000) : end], request)
        decoded.append(hypothesis.audio_seconds)
        if hypothesis.text and not hypothesis.looped:
            transcript, _ = window.update(hypothesis.text, hypothesis.words)
    assert window.start > 4.0, "the window never moved"
    assert max(decoded) < 4.0 + 1.0 + 0.5, decoded  # the window, one interval and the edge
    assert wer([JFK_TEXT], [transcript]) < 0.1, transcript


def test_a_prompt_is_tokenized_once_and_cut_to_its_budget(model, jfk):
    model._prompt_cache.clear()
    prompt = "Kennedy, inaugural address, " * 35  # 980 characters, more tokens than Whisper reads
    first = model.decode(jfk[: 16000 * 3], DecodeRequest(final=False, prompt=prompt))
    again = model.decode(jfk[: 16000 * 3], DecodeRequest(final=False, prompt=prompt))
    assert len(model._prompt_cache) == 1 and first.text == again.text
    (tokens,) = model._prompt_cache.values()
    budget = model._whisper.max_length // 2 - 1
    assert len(tokens) > budget // 2  # the cut happens per decode, after the cache


def test_silence_is_not_speech(model):
    hypothesis = model.decode(np.zeros(32000, np.float32), DecodeRequest(final=True))
    assert hypothesis.text == "" and not hypothesis.is_speech


def test_finals_run_before_queued_interims_and_stale_interims_are_dropped(model, jfk):
    async def scenario():
        scheduler = InferenceScheduler(model, workers=1, max_interim_wait=0.05)
        scheduler.start()
        order: list[str] = []

        async def decode(name: str, final: bool):
            try:
                await scheduler.decode(jfk[:48000], DecodeRequest(final=final))
                order.append(name)
            except StaleInterim:
                order.append(name + " dropped")

        blocker = asyncio.create_task(decode("first", True))
        await asyncio.sleep(0.01)  # the single worker is busy with it
        interims = [asyncio.create_task(decode(f"interim{i}", False)) for i in range(3)]
        final = asyncio.create_task(decode("final", True))
        await asyncio.sleep(0.01)
        finals_were_waiting = scheduler.finals_waiting  # sessions hold new interims back now
        await asyncio.gather(blocker, *interims, final)
        assert finals_were_waiting and not scheduler.finals_waiting
        await scheduler.stop()
        return order, scheduler.stale_interims

    order, stale = asyncio.run(scenario())
    assert order[:2] == ["first", "final"]  # the final overtook the queued interims
    assert stale >= 1 and any(name.endswith("dropped") for name in order)


def borderline_ask_not(jfk: np.ndarray) -> np.ndarray:
    """ "Ask not" with its onset clipped, 10 dB quieter: without the stream's context its beam
    decode scores just under Whisper's log-prob threshold (about -1.08), the kind of decode
    the live server once turned into garbage."""
    return (jfk[int(3.3 * 16000) : int(4.62 * 16000)] * 0.3).astype(np.float32)


def decode_200_times(model: SpeechModel, audio: np.ndarray) -> list:
    request = DecodeRequest(final=True)
    with ThreadPoolExecutor(4) as pool:  # four callers on two model workers: always a queue
        return list(pool.map(lambda _: model.decode(audio, request), range(200)))


def test_a_borderline_utterance_is_sent_as_its_beam_result_flagged(jfk):
    model = SpeechModel(ModelOptions())  # as the server runs it: int8, two workers, loops-only fallback
    hypotheses = decode_200_times(model, borderline_ask_not(jfk))
    ceiling = np.exp(DecodeOptions().log_prob_threshold)
    assert len({h.text for h in hypotheses}) == 1  # the beam result, every time
    for hypothesis in hypotheses:
        assert wer(["ask not"], [hypothesis.text]) == 0 and hypothesis.temperature == 0.0, hypothesis.text
        assert hypothesis.failed_checks and hypothesis.confidence <= ceiling + 1e-9
        assert hypothesis.fallback_reason == ""  # the server's policy: no fallback on low log-prob


def test_whispers_fallback_never_sends_a_loop_or_a_text_without_words(jfk):
    # With Whisper's policy every one of these finals is sampled again at higher temperatures.
    # That produced ". . . . . . .", "S X X X X X X X X X X X", "S 0 s 0 s 0 s 0 s 0 s s" and
    # "I''''''''''" about once in a hundred decodes, scored well enough to pass its checks.
    model = SpeechModel(ModelOptions(), DecodeOptions(fallback_on_low_logprob=True))
    hypotheses = decode_200_times(model, borderline_ask_not(jfk))
    assert sum(h.temperature > 0 or h.failed_checks for h in hypotheses) >= 150  # the fallback ran
    for hypothesis in hypotheses:
        assert has_words(hypothesis.text) and not is_repetition_loop(hypothesis.text), hypothesis.text
        # Why the greedy decode was not kept, for the telemetry: improbable, or a loop.
        if hypothesis.temperature > 0:
            assert hypothesis.fallback_reason in ("avg_logprob", "compression_ratio", "repetition")
        quality = recognition_quality(hypothesis)
        assert (
            quality.fallback_reason == hypothesis.fallback_reason
            and quality.temperature == hypothesis.temperature
        )
        assert 0 < quality.compression_ratio == hypothesis.compression_ratio
        if hypothesis.failed_checks:  # flagged: no more confident than Whisper's threshold
            assert hypothesis.confidence <= np.exp(DecodeOptions().log_prob_threshold) + 1e-9
