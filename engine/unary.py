"""Unary recognition: segment a whole buffer, then decode its utterances one after another.

Minutes of audio take seconds to decode and segment, so that runs on a thread, in slices of
``SEGMENT_SLICE_SECONDS``; between slices it checks whether the call was cancelled. A client
that cancels (or disconnects) therefore stops its work within one slice: before, the whole
buffer was still segmented, holding its memory and a core, after its slot was freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import TYPE_CHECKING

from .api import stt_pb2
from .audio import AudioDecoder, full_scale
from .context import SpokenContext
from .errors import out_of_range
from .finalization import FinalResult, drop_words_before
from .memory import release_free_memory
from .model import DecodeRequest, SpeechModel
from .recognizer import SpeechStarted, StreamingRecognizer, UtteranceEnded
from .scheduler import InferenceScheduler
from .session import duration, final_result
from .settings import RecognitionSettings

if TYPE_CHECKING:
    from otel import CallTelemetry

# About 0.1 s of one core (299 s of speech took 3 s): how long a cancelled call may keep segmenting.
SEGMENT_SLICE_SECONDS = 10.0


class SegmentationCancelled(Exception):
    """The call was cancelled while its audio was being segmented."""


def segment(
    audio_content: bytes,
    decoder: AudioDecoder,
    recognizer: StreamingRecognizer,
    cancelled: threading.Event,
) -> list[tuple[UtteranceEnded, float | None]]:
    """The utterances of ``audio_content``, each with the offset of the cut it continues
    speech from (None: it starts afresh), fed to the recognizer slice by slice (as a stream
    would be), so that only one slice is ever held as float32 and ``cancelled`` is seen
    between slices. Raises SegmentationCancelled."""
    events = []
    for samples in decoder.decode_in_slices(audio_content, SEGMENT_SLICE_SECONDS):
        if cancelled.is_set():
            raise SegmentationCancelled
        events += recognizer.accept(samples)
    events += recognizer.accept(decoder.flush()) + recognizer.finish()
    utterances, continues_at = [], None
    for event in events:
        if isinstance(event, SpeechStarted):
            continues_at = event.offset if event.continued else None
        elif isinstance(event, UtteranceEnded):
            utterances.append((event, continues_at))
    return utterances


async def recognize(
    audio_content: bytes,
    settings: RecognitionSettings,
    model: SpeechModel,
    scheduler: InferenceScheduler,
    telemetry: CallTelemetry,
    max_seconds: float,
) -> stt_pb2.RecognizeResponse:
    """Unary recognition: segment the whole buffer, decode every utterance. Cancelling the
    caller stops the segmentation within one slice and queues no further decode."""
    decoder = AudioDecoder(settings.encoding, settings.sample_rate, settings.channels)
    seconds = decoder.seconds(len(audio_content))
    if seconds > max_seconds:
        raise out_of_range(
            "STT_AUDIO_TOO_LONG",
            f"audio_content holds {seconds:.1f} s of audio; Recognize takes at most {max_seconds:g} s "
            "(stream longer audio with StreamingRecognize)",
            "audio_content",
        )
    # The whole buffer is here: every endpoint is certain, nothing to speculate on.
    recognizer = StreamingRecognizer(
        dataclasses.replace(settings.streaming, speculative_final_ms=0), full_scale(settings.encoding)
    )
    cancelled = threading.Event()
    try:
        # Not on the event loop, which serves every stream and the health checks.
        events = await asyncio.to_thread(segment, audio_content, decoder, recognizer, cancelled)
    except asyncio.CancelledError:
        cancelled.set()  # the thread stops at its next slice (or, still queued, before the first)
        raise
    del audio_content  # the caller's request still holds the bytes; this frame need not
    audio = recognizer.meter.stream_summary()
    if audio is not None:
        telemetry.stream_audio(audio)
    # One after another, each conditioned on the finals before it, as offline Whisper does.
    context = SpokenContext()
    response = stt_pb2.RecognizeResponse(total_billed_time=duration(seconds))
    events.reverse()
    while events:
        event, continues_at = events.pop()  # a decoded utterance's audio is freed at once
        request = DecodeRequest(
            final=True,
            language=settings.language,
            prompt=settings.prompt,
            context=context.text,
            # Aligned to drop the words of the pre-roll before a cut (the utterance before's).
            word_timestamps=settings.word_time_offsets or continues_at is not None,
            alternatives=settings.alternatives,
        )
        observer = telemetry.decode(
            "final", event.utterance_index, event.start, event.end, audio=event.audio_quality
        )
        # Cancelled here, the scheduler takes the queued decode back out (a running one ends
        # on its own), and no later utterance is queued.
        hypothesis = await scheduler.decode(event.audio, request, observer)
        # Back-to-back decodes leave their freed buffers in the worker threads' malloc arenas,
        # where the next ones do not always reuse them: a 299 s call peaked at +112-145 MB,
        # +88-106 MB trimmed after each utterance (6 ms a trim, against 0.46 s a decode).
        await asyncio.to_thread(release_free_memory)
        if continues_at is not None:
            hypothesis = drop_words_before(hypothesis, continues_at - event.start)
        context.add(hypothesis)
        if hypothesis.is_speech:
            final = FinalResult(
                event.utterance_index, hypothesis, event.start, event.end, event.speech_end, event.reason
            )
            response.results.append(final_result(final, settings))
    return response
