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


# --- compressed audio streamed in chunks (engine/compressed.py) ---------------------------------


def _encoded(audio: np.ndarray, *args: str) -> bytes:
    from tests.helpers import ffmpeg

    source = ("-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-")
    return ffmpeg(*source, *args, "-", data=float_to_linear16(audio))


def _decode_in_chunks(encoding: str, data: bytes, sizes: list[int]) -> bytes:
    from engine.compressed import streaming_decoder

    decoder, out, offset, index = streaming_decoder(encoding), b"", 0, 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        out += decoder.decode(data[offset : offset + size])
        offset, index = offset + size, index + 1
    return out + decoder.flush()


@pytest.mark.parametrize("sizes", [[10**9], [4096], [1000, 7, 333], [1]])
def test_flac_decodes_bit_exact_however_it_is_chunked(jfk, sizes):
    pcm = float_to_linear16(jfk)
    flac = _encoded(jfk, "-compression_level", "8", "-f", "flac")
    assert _decode_in_chunks("FLAC", flac, sizes) == pcm


@pytest.mark.parametrize(
    "encoding, options",
    [
        ("OGG_OPUS", ("-c:a", "libopus", "-b:a", "24k", "-f", "ogg")),
        ("OGG_OPUS", ("-ac", "2", "-ar", "48000", "-c:a", "libopus", "-f", "ogg")),  # stereo, 48 kHz
        ("WEBM_OPUS", ("-c:a", "libopus", "-b:a", "24k", "-f", "webm")),
        (
            "WEBM_OPUS",
            ("-c:a", "libopus", "-live", "1", "-cluster_size_limit", "2000", "-f", "webm"),
        ),  # unknown sizes
        ("MP3", ("-c:a", "libmp3lame", "-b:a", "48k", "-f", "mp3")),
        (
            "MP3",
            ("-ar", "44100", "-c:a", "libmp3lame", "-id3v2_version", "3", "-f", "mp3"),
        ),  # with an ID3 tag
    ],
)
def test_lossy_streams_decode_to_the_whole_recording(jfk, encoding, options):
    decoded = _decode_in_chunks(encoding, _encoded(jfk, *options), [700, 13, 4096])
    samples = np.frombuffer(decoded, dtype="<i2").astype(np.float32) / 32768
    # Opus drops its pre-skip; MP3 keeps its encoder delay (a few ms of leading silence).
    assert len(samples) / 16000 == pytest.approx(len(jfk) / 16000, abs=0.15)
    # The same speech: loud where JFK is loud, in 100 ms windows, once the codec's delay
    # (MP3 keeps its encoder's 1105 samples) is taken off.
    probe = jfk[16000:48000]
    delay = max(range(0, 2000), key=lambda lag: float(np.dot(samples[16000 + lag : 48000 + lag], probe)))
    samples = samples[delay:]
    window = 1600
    frames = min(len(samples), len(jfk)) // window
    ours = np.sqrt(np.mean(samples[: frames * window].reshape(frames, window) ** 2, axis=1))
    theirs = np.sqrt(np.mean(jfk[: frames * window].reshape(frames, window) ** 2, axis=1))
    assert np.corrcoef(ours, theirs)[0, 1] > 0.9


@pytest.mark.parametrize("encoding", ["FLAC", "OGG_OPUS", "WEBM_OPUS", "MP3", "AMR", "AMR_WB"])
def test_any_bytes_decode_or_raise_a_described_error(encoding):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from engine.compressed import CompressedAudioError, streaming_decoder

    @settings(max_examples=40, deadline=None)
    @given(chunks=st.lists(st.binary(max_size=3000), max_size=6))
    def check(chunks):
        decoder = streaming_decoder(encoding)
        try:
            for chunk in chunks:
                decoder.decode(chunk)
            decoder.flush()
        except CompressedAudioError as error:
            assert str(error)

    check()


def test_amr_wb_decodes_in_any_chunks(jfk):
    from tests.helpers import amr_wideband

    decoded = _decode_in_chunks("AMR_WB", amr_wideband(jfk), [1, 61, 500])
    assert len(decoded) / 32000 == pytest.approx(len(jfk) / 16000, abs=0.03)
