"""Wire-audio decoding against FFmpeg's own G.711 decoders, resampling, odd chunks."""

import numpy as np
import pytest

from engine.api import stt_pb2
from engine.audio import AudioDecoder, float_to_linear16, quietest_point
from tests.helpers import SAMPLE, ffmpeg


@pytest.mark.parametrize("encoding,fmt", [(stt_pb2.MULAW, "mulaw"), (stt_pb2.ALAW, "alaw")])
def test_g711_matches_ffmpeg(encoding, fmt):
    encoded = ffmpeg("-i", str(SAMPLE), "-ar", "16000", "-f", fmt, "-")
    reference = np.frombuffer(
        ffmpeg("-f", fmt, "-ar", "16000", "-i", "-", "-f", "s16le", "-", data=encoded), "<i2"
    )
    decoded = AudioDecoder(encoding, 16000).decode(encoded)
    assert len(decoded) == len(reference)
    assert np.array_equal(np.round(decoded * 32768).astype(np.int32), reference.astype(np.int32))


def test_linear16_odd_chunks_are_buffered():
    samples = (np.sin(np.arange(16000) / 10) * 0.5).astype(np.float32)
    data = float_to_linear16(samples)
    whole = AudioDecoder(stt_pb2.LINEAR16, 16000).decode(data)
    decoder = AudioDecoder(stt_pb2.LINEAR16, 16000)
    parts = [decoder.decode(data[i : i + 333]) for i in range(0, len(data), 333)]
    parts.append(decoder.decode(b""))
    assert np.array_equal(np.concatenate(parts), whole)
    assert decoder.pending_bytes == 0


def test_stereo_is_downmixed():
    left = np.full(1600, 0.5, dtype=np.float32)
    right = np.full(1600, -0.25, dtype=np.float32)
    interleaved = np.stack([left, right], axis=1).reshape(-1)
    out = AudioDecoder(stt_pb2.LINEAR16, 16000, channels=2).decode(float_to_linear16(interleaved))
    assert len(out) == 1600
    assert np.allclose(out, 0.125, atol=1e-3)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_resampling_keeps_duration_and_pitch(rate):
    seconds = 2.0
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    decoder = AudioDecoder(stt_pb2.LINEAR16, rate)
    data = float_to_linear16(tone)
    chunk = rate // 10 * 2
    out = np.concatenate(
        [decoder.decode(data[i : i + chunk]) for i in range(0, len(data), chunk)] + [decoder.flush()]
    )
    assert abs(len(out) - 16000 * seconds) <= 32
    spectrum = np.abs(np.fft.rfft(out[1000:-1000]))
    peak_hz = np.argmax(spectrum) * 16000 / len(out[1000:-1000])
    assert abs(peak_hz - 440) < 5


def test_the_quietest_point_between_two_sentences_is_the_pause():
    # The continuous set: real clips trimmed of their edge silence, joined with 0.2-0.4 s of
    # room noise, slowed to 0.8x. Searching half a second either side of each join finds the
    # join, not a quiet consonant inside a word. (A second either side reaches the pauses
    # between "one", "two" and "three": pauses too, but not the join.)
    from bench.streaming import continuous_form

    audio, segments = continuous_form()
    for before, after in zip(segments, segments[1:]):
        point = quietest_point(audio, before.end - 0.5, after.start + 0.5)
        assert before.end - 0.05 <= point <= after.start + 0.05, (before.transcript, point)
