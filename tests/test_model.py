"""The model and the inference scheduler, with the real tiny.en weights."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.model import DecodeRequest, SpeechModel
from engine.options import DecodeOptions, ModelOptions
from engine.scheduler import InferenceScheduler, StaleInterim
from tests.conftest import JFK_TEXT, wer


@pytest.fixture(scope="module")
def model() -> SpeechModel:
    # "auto" is the GPU code path's entry: CUDA where present, the CPU here.
    return SpeechModel(ModelOptions(device="auto", compute_type="default", workers=2))


def test_auto_device_loads_and_decodes(model, jfk):
    assert model.device in ("cpu", "cuda")
    hypothesis = model.decode(jfk, DecodeRequest(final=True, word_timestamps=True))
    assert wer([JFK_TEXT], [hypothesis.text]) < 0.1
    assert hypothesis.encoder_frames == 1200  # 11 s of audio + 1 s of padding, not 3000
    assert hypothesis.words[0].word == "And" and hypothesis.words[-1].end <= 11.0


def test_encoder_input_is_sized_to_the_audio(model, jfk):
    short = model.decode(jfk[:32000], DecodeRequest(final=False))
    final = model.decode(jfk[:32000], DecodeRequest(final=True))
    assert short.encoder_frames == DecodeOptions().interim_min_encoder_frames
    assert final.encoder_frames == DecodeOptions().min_encoder_frames
    assert short.beam_size == 1


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
