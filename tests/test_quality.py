"""Input-audio measures on real speech changed with sox the way real audio goes wrong.

Each recording of ../shared/audio goes through the streaming recognizer (the real VAD, 100 ms
chunks, as a stream) clean and changed: 30 dB quieter, 20 dB louder with clipping, through an
8 kHz G.711 mu-law telephone line and back to 16 kHz, with white noise at 20 and 5 dB SNR, and
with a DC offset. Each measure must move the right way and land within the stated tolerance of
what the change did; clean speech must raise no condition (what the alerts count).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.audio import read_audio_file
from engine.options import StreamingOptions
from engine.quality import FRAME_SAMPLES, AudioQuality
from engine.recognizer import StreamingRecognizer, UtteranceEnded
from tests.helpers import AUDIO_DIR, feed, load_clips

# Recordings with pauses, so that each has a noise floor of its own: a president's speech
# (narrow, noisy archive audio), a command, a LibriSpeech and an LJSpeech reading.
NAMES = ("jfk.wav", "goforward.wav", "ls_1272-128104-0000.wav", "lj001-0001.wav")


@pytest.fixture(scope="module")
def recordings() -> dict[str, Path]:
    load_clips()  # skips (or fails in CI) without the recordings
    return {name: AUDIO_DIR / name for name in NAMES}


def sox(source: Path, target: Path, *effects: str, output: tuple[str, ...] = ()) -> np.ndarray:
    subprocess.run(["sox", str(source), *output, str(target), *effects], check=True, capture_output=True)
    return read_audio_file(target)


def measure(audio: np.ndarray, full_scale: float = 32767 / 32768) -> tuple[AudioQuality, list[AudioQuality]]:
    """The stream's summary and each utterance's measures, fed as a client streams it."""
    recognizer = StreamingRecognizer(StreamingOptions(), full_scale)
    events = feed(recognizer, audio)
    utterances = [e.audio_quality for e in events if isinstance(e, UtteranceEnded)]
    assert utterances and all(q is not None for q in utterances)
    return recognizer.meter.stream_summary(), utterances


def active_level(audio: np.ndarray) -> float:
    """Speech level by a rule independent of the VAD (as ITU-T P.56 measures an active speech
    level): power of the 32 ms frames within 30 dB of the loudest, dBFS."""
    frames = audio[: len(audio) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    power = np.mean(frames.astype(np.float64) ** 2, axis=1)
    return 10 * np.log10(power[power >= power.max() / 1000].mean())


def test_clean_speech_is_flagged_for_nothing(recordings):
    for name, path in recordings.items():
        stream, utterances = measure(read_audio_file(path))
        for quality in [stream, *utterances]:
            assert quality.conditions(16000) == [], (name, quality)
        assert stream.bandwidth >= 5000, name
        assert stream.clipped_share == 0 and abs(stream.dc_offset) < 1e-3, name
        # Recorded speech sits 25-45 dB above its room noise.
        assert stream.snr > 20, name


def test_gain_30_db_down_lowers_every_level_30_db(recordings, tmp_path):
    for name, path in recordings.items():
        clean, _ = measure(read_audio_file(path))
        quiet, utterances = measure(sox(path, tmp_path / name, "gain", "-30"))
        # The VAD marks (nearly) the same frames at a lower level: the level follows the gain.
        assert quiet.speech_level == pytest.approx(clean.speech_level - 30, abs=1.0), name
        assert quiet.peak_level == pytest.approx(clean.peak_level - 30, abs=0.1), name
        assert quiet.bandwidth == clean.bandwidth, name
        if clean.speech_level - 30 < -50:
            assert all("quiet" in q.conditions(16000) for q in utterances), name
        # The noise floor follows too while it stays 20 dB above the 16-bit quantisation floor
        # (-101 dBFS) the gain brings it to; below that the file really holds more noise.
        if clean.noise_level - 30 > -80:
            assert quiet.noise_level == pytest.approx(clean.noise_level - 30, abs=1.5), name
            assert quiet.snr == pytest.approx(clean.snr, abs=1.5), name


def test_gain_20_db_up_with_clipping_is_measured_as_clipped(recordings, tmp_path):
    for name, path in recordings.items():
        clean_audio = read_audio_file(path)
        clean, _ = measure(clean_audio)
        loud_audio = sox(path, tmp_path / name, "gain", "20")
        loud, utterances = measure(loud_audio)
        # Every sample sox clipped lies in speech, inside the utterances: their share of the
        # utterances' samples is what the measure must find.
        clipped = np.count_nonzero(np.abs(clean_audio * 10) >= 1.0)
        expected = clipped / (loud.seconds * 16000)
        assert loud.clipped_share == pytest.approx(expected, rel=0.05), name
        assert loud.peak_level == pytest.approx(0.0, abs=0.01), name
        # Clipping flattens the loudest parts: the level rises by less than the gain.
        assert clean.speech_level + 10 < loud.speech_level < clean.speech_level + 20, name
        assert "clipped" in loud.conditions(16000), name
        assert all("clipped" in q.conditions(16000) for q in utterances if q.clipped_share >= 0.001)


def test_telephone_line_resampled_up_reads_as_narrowband(recordings, tmp_path):
    for name, path in recordings.items():
        clean, _ = measure(read_audio_file(path))
        line = tmp_path / f"{name}.mulaw.wav"
        sox(path, line, output=("-r", "8000", "-e", "mu-law"))
        wire = sox(line, tmp_path / f"{name}.16k.wav", output=("-r", "16000", "-e", "signed", "-b", "16"))
        phone, utterances = measure(wire)
        # G.711 at 8 kHz carries nothing above 4 kHz; resampled up, the band stays empty.
        assert clean.bandwidth >= 5000 and phone.bandwidth <= 4000, name
        assert all("narrowband" in q.conditions(16000) for q in utterances), name
        # The same audio sent as 8 kHz MULAW is narrowband by its sample rate: not flagged.
        assert "narrowband" not in phone.conditions(8000)
        # mu-law keeps the level (its quantisation noise is 38 dB under the signal).
        assert phone.speech_level == pytest.approx(clean.speech_level, abs=1.0), name


@pytest.mark.parametrize("snr", [20, 5])
def test_white_noise_snr_is_estimated_within_3_db(recordings, tmp_path, snr):
    for name, path in recordings.items():
        clean_audio = read_audio_file(path)
        noise_file = tmp_path / f"{name}.noise.wav"
        seconds = len(clean_audio) / 16000
        subprocess.run(
            [
                "sox",
                "-R",
                "-n",
                "-r",
                "16000",
                "-c",
                "1",
                "-b",
                "16",
                str(noise_file),
                "synth",
                f"{seconds}",
                "whitenoise",
            ],
            check=True,
            capture_output=True,
        )
        noise = read_audio_file(noise_file)
        noise_level = 10 * np.log10(np.mean(noise.astype(np.float64) ** 2))
        target = active_level(clean_audio) - snr  # the noise level that gives the set SNR
        gain = 10 ** ((target - noise_level) / 20)
        mixed_file = tmp_path / f"{name}.snr{snr}.wav"
        subprocess.run(
            ["sox", "-R", "-m", "-v", "1", str(path), "-v", f"{gain:.6f}", str(noise_file), str(mixed_file)],
            check=True,
            capture_output=True,
        )
        clean, _ = measure(clean_audio)
        noisy, utterances = measure(read_audio_file(mixed_file))
        # The recording's own noise adds to the white noise: the true SNR is a little lower.
        assert noisy.snr == pytest.approx(snr, abs=3.0), (name, noisy)
        assert noisy.noise_level == pytest.approx(target, abs=2.0), (name, noisy)
        assert noisy.snr < clean.snr
        # White noise fills the whole band; the VAD is less sure of more frames.
        assert noisy.bandwidth == 8000
        if snr == 5:
            assert noisy.vad_uncertain_share > clean.vad_uncertain_share, name
            assert all("noisy" in q.conditions(16000) for q in utterances if q.snr is not None), name
        else:
            assert "noisy" not in noisy.conditions(16000), name


def test_dc_offset_is_measured(recordings, tmp_path):
    for name, path in recordings.items():
        shifted, _ = measure(sox(path, tmp_path / name, "dcshift", "0.05"))
        assert shifted.dc_offset == pytest.approx(0.05, abs=0.002), name


def test_g711_full_scale_counts_as_clipping(recordings):
    """MULAW's largest sample is 0.98 of full scale: clipped MULAW audio must count as clipped."""
    from engine.api import stt_pb2
    from engine.audio import MULAW_TABLE, full_scale

    audio = read_audio_file(recordings["jfk.wav"])
    codes = np.searchsorted(np.sort(MULAW_TABLE), np.clip(audio * 10, -1, 1))  # nearest code above
    decoded = np.sort(MULAW_TABLE)[np.minimum(codes, 255)]
    stream, _ = measure(decoded, full_scale(stt_pb2.MULAW))
    assert "clipped" in stream.conditions(8000)
    assert stream.clipped_share > 0.1
