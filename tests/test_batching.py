"""Batched decodes across streams: ``SpeechModel.decode_batch`` and the scheduler's batches,
with the real tiny.en weights and real recordings."""

from __future__ import annotations

import asyncio

import pytest

from engine.model import DecodeRequest, Hypothesis, SpeechModel
from engine.options import ModelOptions
from engine.scheduler import InferenceScheduler

RATE = 16000


@pytest.fixture(scope="module")
def model() -> SpeechModel:
    return SpeechModel(ModelOptions(workers=1, batch_size=8))


@pytest.fixture(scope="module")
def audio(clips) -> dict:
    return {clip.name: clip.audio for clip in clips}


class Recorder:
    """A DecodeObserver that keeps what the scheduler reported about one decode."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.hypothesis: Hypothesis | None = None

    def queued(self) -> None:
        self.events.append("queued")

    def dequeued(self, waited: float) -> None:
        self.events.append("dequeued")

    def run(self, function, *args):
        self.events.append("run")
        return function(*args)

    def finished(self, hypothesis: Hypothesis) -> None:
        self.events.append("finished")
        self.hypothesis = hypothesis

    def skipped(self, reason: str) -> None:
        self.events.append(f"skipped:{reason}")

    def failed(self, error: BaseException) -> None:
        self.events.append("failed")


def same_decode(batched: Hypothesis, alone: Hypothesis) -> None:
    assert batched.text == alone.text
    assert batched.alternatives == alone.alternatives
    assert batched.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4)
    assert batched.no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-4)
    assert batched.temperature == alone.temperature and batched.tokens == alone.tokens
    assert [w.word for w in batched.words] == [w.word for w in alone.words]
    assert [w.start for w in batched.words] == pytest.approx([w.start for w in alone.words], abs=0.02)


def test_a_batch_of_mixed_windows_decodes_as_one_by_one(model, audio):
    # Interims of 1-4 s windows of four recordings (the encoder input of each is the 600-frame
    # minimum), prompted and prefixed differently; finals of 10.6 and 11 s (both 2100 frames),
    # with word timings and alternatives. Every item's text, scores and words are those of its
    # decode alone. (An item padded to a longer batch mate is another matter: the encoder
    # attends over the padding, and 50 more frames changed 4 of 12 finals in
    # bench/batching.py, so the scheduler batches equal encoder lengths only.)
    jfk = audio["jfk.wav"]
    items = [
        (jfk[:RATE], DecodeRequest(final=False)),
        (jfk[: 2 * RATE], DecodeRequest(final=False, prompt="Kennedy inaugural")),
        (audio["ldc93s1.wav"][: 3 * RATE], DecodeRequest(final=False, prefix="She had")),
        (audio["lj001-0004.wav"][: 4 * RATE], DecodeRequest(final=False, said_before="history")),
        (audio["harvard_spk1_snt1.wav"], DecodeRequest(final=False)),
        (jfk, DecodeRequest(final=True, word_timestamps=True, alternatives=3)),
        (jfk[: int(10.6 * RATE)], DecodeRequest(final=True, word_timestamps=True, alternatives=3)),
    ]
    alone = [model.decode(samples, request) for samples, request in items]
    interims = model.decode_batch(items[:5])
    finals = model.decode_batch(items[5:])
    for batched, single in zip(interims + finals, alone):
        same_decode(batched, single)
    assert {h.batch_size for h in interims} == {5} and {h.batch_size for h in finals} == {2}
    assert {h.encoder_frames for h in interims} == {600} and {h.encoder_frames for h in finals} == {2100}
    assert len({h.text for h in interims}) == 5 and finals[0].words and finals[0].alternatives


def test_one_call_mixes_kinds_and_lengths_padding_to_the_longest(model, audio):
    # One encoder pass for an interim and a final: the interim is padded to the final's length
    # and decoded greedily, the final by beam search with word timings.
    interim, final = model.decode_batch(
        [
            (audio["ldc93s1.wav"], DecodeRequest(final=False)),
            (audio["jfk.wav"], DecodeRequest(final=True, word_timestamps=True)),
        ]
    )
    assert interim.batch_size == final.batch_size == 2
    assert interim.encoder_frames == final.encoder_frames == 2100
    assert interim.beam_size == 1 and final.beam_size == 5 and not interim.words and final.words
    same_decode(final, model.decode(audio["jfk.wav"], DecodeRequest(final=True, word_timestamps=True)))
    assert "greasy" in interim.text.lower()


def schedule(model: SpeechModel, jobs: list, max_batch: int = 8, cancel: int | None = None) -> list:
    """Queues every job at once on a one-worker scheduler (the worker finds them all queued);
    the job at index ``cancel`` is cancelled while queued. Returns (result, recorder) pairs."""

    async def scenario():
        scheduler = InferenceScheduler(model, workers=1, max_interim_wait=60.0, max_batch=max_batch)
        scheduler.start()
        recorders = [Recorder() for _ in jobs]
        tasks = [
            asyncio.create_task(scheduler.decode(samples, request, recorder))
            for (samples, request), recorder in zip(jobs, recorders)
        ]
        await asyncio.sleep(0)  # every decode is queued; the worker has not run yet
        if cancel is not None:
            tasks[cancel].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await scheduler.stop()
        return list(zip(results, recorders))

    return asyncio.run(scenario())


def test_the_scheduler_decodes_queued_jobs_in_one_batch(model, audio):
    names = ["jfk.wav", "ldc93s1.wav", "goforward.wav", "harvard_spk1_snt1.wav"]
    jobs = [(audio[name][: 3 * RATE], DecodeRequest(final=False)) for name in names]
    outcome = schedule(model, jobs)
    for (samples, request), (hypothesis, recorder) in zip(jobs, outcome):
        assert hypothesis.batch_size == 4
        assert hypothesis.text == model.decode(samples, request).text  # each caller its own
        assert recorder.events[0] == "queued" and recorder.events[-1] == "finished"
        assert recorder.hypothesis is hypothesis
    assert [r.events.count("run") for _, r in outcome] == [1, 0, 0, 0]  # one model call
    assert len({h.text for h, _ in outcome}) == 4


def test_batching_off_decodes_one_by_one(model, audio):
    jobs = [(audio[name][: 2 * RATE], DecodeRequest(final=False)) for name in ("jfk.wav", "ldc93s1.wav")]
    assert [h.batch_size for h, _ in schedule(model, jobs, max_batch=1)] == [1, 1]


def test_finals_and_interims_never_share_a_batch(model, audio):
    jfk = audio["jfk.wav"]
    jobs = [
        (jfk[: 2 * RATE], DecodeRequest(final=False)),
        (jfk[: int(10.6 * RATE)], DecodeRequest(final=True)),
        (audio["ldc93s1.wav"], DecodeRequest(final=False)),
        (jfk, DecodeRequest(final=True)),
        (audio["ldc93s1.wav"], DecodeRequest(final=True)),  # 1300 frames: no equal final
    ]
    outcome = [hypothesis for hypothesis, _ in schedule(model, jobs)]
    assert [h.batch_size for h in outcome] == [2, 2, 2, 2, 1]
    assert [h.beam_size for h in outcome] == [1, 5, 1, 5, 5]
    assert [h.encoder_frames for h in outcome] == [600, 2100, 600, 2100, 1300]


def test_a_cancelled_queued_job_is_not_decoded(model, audio):
    jobs = [(audio[name][: 3 * RATE], DecodeRequest(final=False)) for name in ("jfk.wav", "ldc93s1.wav")]
    jobs.insert(1, (audio["goforward.wav"][: 3 * RATE], DecodeRequest(final=False)))
    outcome = schedule(model, jobs, cancel=1)
    (first, _), (cancelled, recorder), (last, _) = outcome
    assert isinstance(cancelled, asyncio.CancelledError)
    assert recorder.events == ["queued", "skipped:cancelled"]
    assert first.batch_size == last.batch_size == 2
