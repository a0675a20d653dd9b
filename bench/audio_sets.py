"""Audio that looks like real users' audio, built from real recordings with exact transcripts.

Every set is a list of long-forms: real speech clips (../shared/audio, and the utterances of
the continuous readings in ../shared/audio-long) joined with pauses and room noise, then
changed the way real audio is (slowed, telephone-band G.711, noisy, quiet, continuous). Each
long-form keeps where every clip lies, so a benchmark or a test can tell which clip a result
belongs to and whether any clip was lost. All randomness is seeded: a set is the same bytes
every time.
"""

from __future__ import annotations

import csv
import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.api import stt_pb2
from engine.audio import AudioDecoder, float_to_linear16, read_audio_file

RATE = 16000
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
SHORT_DIR = Path(os.environ.get("STT_TEST_AUDIO", SHARED / "audio"))
LONG_DIR = Path(os.environ.get("STT_TEST_AUDIO_LONG", SHARED / "audio-long"))
ROOM_NOISE_DBFS = -55.0  # a quiet room's noise floor, as real recordings have between words
PAUSES = (0.3, 0.7, 1.2, 2.0, 3.0)  # seconds between clips
NOISE_GAPS = (5.0, 12.0, 20.0, 30.0)  # long stretches of room noise, after every third clip


@dataclass
class Clip:
    name: str
    audio: np.ndarray  # 16 kHz float32
    transcript: str


@dataclass
class Placed:
    """A clip inside a long-form: its audio lies at [start, end) seconds."""

    name: str
    start: float
    end: float
    transcript: str


@dataclass
class LongForm:
    """One stream's worth of audio. ``audio`` is what the server hears (16 kHz float32);
    ``wire`` is what a client sends, with its ``encoding`` and ``sample_rate``."""

    name: str
    audio: np.ndarray
    clips: list[Placed]
    wire: bytes = b""
    encoding: int = stt_pb2.LINEAR16
    sample_rate: int = RATE
    notes: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE

    @property
    def transcript(self) -> str:
        return " ".join(clip.transcript for clip in self.clips)


def short_clips(directory: Path = SHORT_DIR) -> list[Clip]:
    """The 8 clips of ../shared/audio."""
    with (directory / "manifest.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [Clip(r["file"], read_audio_file(directory / r["file"]), r["transcript"]) for r in rows]


def long_utterances(directory: Path = LONG_DIR) -> dict[str, list[Clip]]:
    """The utterances of each continuous reading of ../shared/audio-long, by file."""
    with (directory / "segments.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    readings: dict[str, list[Clip]] = {}
    cache: dict[str, np.ndarray] = {}
    for row in rows:
        audio = cache.setdefault(row["file"], read_audio_file(directory / row["file"]))
        piece = audio[int(float(row["start"]) * RATE) : int(float(row["end"]) * RATE)]
        readings.setdefault(row["file"], []).append(Clip(row["utterance"], piece, row["transcript"]))
    return readings


def dbfs(level: float) -> float:
    return 10 ** (level / 20)


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0


def pink_noise(seconds: float, level_dbfs: float, seed: int) -> np.ndarray:
    """Pink (1/f) noise with a faint mains hum at ``level_dbfs`` RMS: a room's background."""
    count = max(1, int(seconds * RATE))
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(count))
    frequencies = np.fft.rfftfreq(count, 1 / RATE)
    spectrum[1:] /= np.sqrt(frequencies[1:])
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, count)
    noise += 0.3 * np.std(noise) * np.sin(2 * np.pi * 50 * np.arange(count) / RATE)
    return (noise / (rms(noise) or 1.0) * dbfs(level_dbfs)).astype(np.float32)


def trim(audio: np.ndarray, keep: float = 0.05, floor_dbfs: float = -45.0) -> np.ndarray:
    """The clip without leading and trailing silence (20 ms frames under ``floor_dbfs``)."""
    frame = RATE // 50
    levels = [rms(audio[i : i + frame]) for i in range(0, len(audio), frame)]
    loud = [i for i, level in enumerate(levels) if level > dbfs(floor_dbfs)]
    if not loud:
        return audio
    start = max(0, loud[0] * frame - int(keep * RATE))
    end = min(len(audio), (loud[-1] + 1) * frame + int(keep * RATE))
    return audio[start:end]


def join(name: str, clips: list[Clip], gaps: list[float], seed: int, lead: float = 1.0) -> LongForm:
    """Clips with ``gaps[i]`` seconds of room noise after clip i, under a room-noise floor."""
    parts = [pink_noise(lead, ROOM_NOISE_DBFS, seed)]
    placed, cursor = [], lead
    for index, clip in enumerate(clips):
        placed.append(Placed(clip.name, cursor, cursor + len(clip.audio) / RATE, clip.transcript))
        gap = pink_noise(gaps[index], ROOM_NOISE_DBFS, seed + index + 1)
        # The room is there under the speech too, not only between clips.
        parts += [clip.audio + pink_noise(len(clip.audio) / RATE, ROOM_NOISE_DBFS, seed + 1000 + index), gap]
        cursor += len(clip.audio) / RATE + gaps[index]
    audio = np.concatenate(parts).astype(np.float32)
    return LongForm(name, audio, placed)


def gap_schedule(count: int, offset: int) -> list[float]:
    """Pauses from 0.3 to 3 s, and 5-30 s of room noise after every third clip."""
    gaps = []
    for index in range(count):
        k = index + offset
        gaps.append(NOISE_GAPS[k // 3 % len(NOISE_GAPS)] if index % 3 == 2 else PAUSES[k % len(PAUSES)])
    return gaps


def pair_orders(count: int) -> list[list[int]]:
    """``count`` (even) orders of all clips, each clip once per order, in which every ordered
    pair (a, b) is adjacent exactly once: the zigzag paths i, i+1, i-1, i+2, i-2, ... mod
    ``count`` step by +1, -2, +3, ..., every difference once, so together they cover every
    pair (a decomposition of the complete digraph into Hamiltonian paths)."""
    steps = [(k + 1) // 2 * (1 if k % 2 else -1) for k in range(count)]
    return [[(start + step) % count for step in steps] for start in range(count)]


def pair_forms(clips: list[Clip]) -> list[list[Clip]]:
    """Long-forms in which every clip is heard right after every other clip."""
    return [[clips[i] for i in order] for order in pair_orders(len(clips))]


def joined_set(clips: list[Clip]) -> list[LongForm]:
    """Every clip heard right after every other clip, after pauses from 0.3 to 3 s and,
    every third clip, after 5-30 s of room noise."""
    return [
        join(f"joined-{number}", order, gap_schedule(len(order), number), seed=100 + number)
        for number, order in enumerate(pair_forms(clips))
    ]


def readings_set(readings: dict[str, list[Clip]]) -> list[LongForm]:
    """Each continuous reading's utterances with the same pauses and room-noise gaps."""
    return [
        join(f"reading-{index}", clips, gap_schedule(len(clips), index), seed=200 + index)
        for index, clips in enumerate(readings.values())
    ]


def sox(audio: np.ndarray, *effect: str) -> np.ndarray:
    raw = subprocess.run(
        ["sox", "-t", "f32", "-r", str(RATE), "-c", "1", "-", "-t", "f32", "-", *effect],
        input=audio.astype(np.float32).tobytes(),
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, np.float32).copy()


def slowed_set(clips: list[Clip], tempo: float = 0.75) -> list[LongForm]:
    """Slow speakers: every clip at ``tempo`` (sox, pitch kept), every pause stretched."""
    slow = [replace(c, audio=sox(c.audio, "tempo", "-s", str(tempo))) for c in clips]
    return [
        join(
            f"slow-{number}", order, [g / tempo for g in gap_schedule(len(order), number)], seed=300 + number
        )
        for number, order in enumerate(pair_forms(slow))
    ]


def g711_set(forms: list[LongForm], encoding: int) -> list[LongForm]:
    """Telephone band: 8 kHz G.711 bytes (FFmpeg's encoder), as a phone gateway sends them.
    The server hears them decoded and resampled back to 16 kHz, as the offline reference does."""
    fmt = {stt_pb2.MULAW: "mulaw", stt_pb2.ALAW: "alaw"}[encoding]
    out = []
    for form in forms:
        wire = subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-f", "f32le", "-ar", str(RATE), "-ac", "1", "-i", "-",
             "-ar", "8000", "-f", fmt, "-"],
            input=form.audio.tobytes(),
            capture_output=True,
            check=True,
        ).stdout  # fmt: skip
        decoder = AudioDecoder(encoding, 8000)
        heard = np.concatenate([decoder.decode(wire), decoder.flush()])
        out.append(replace(form, name=f"{fmt}-{form.name}", audio=heard, wire=wire, encoding=encoding,
                           sample_rate=8000))  # fmt: skip
    return out


def noisy_set(forms: list[LongForm], snr_db: float) -> list[LongForm]:
    """Pink noise over the whole long-form, ``snr_db`` below the speech's level."""
    out = []
    for index, form in enumerate(forms):
        speech = np.concatenate([form.audio[int(c.start * RATE) : int(c.end * RATE)] for c in form.clips])
        noise = pink_noise(form.seconds, 0.0, seed=400 + index)[: len(form.audio)]
        noisy = form.audio + noise * (rms(speech) / dbfs(snr_db))
        out.append(
            replace(form, name=f"snr{snr_db:g}-{form.name}", audio=np.clip(noisy, -1, 1).astype(np.float32))
        )
    return out


def quiet_set(forms: list[LongForm], peak_dbfs: float = -25.0) -> list[LongForm]:
    """A distant or quiet talker: the whole long-form scaled so speech peaks at ``peak_dbfs``."""
    out = []
    for form in forms:
        peak = float(np.max(np.abs(form.audio))) or 1.0
        out.append(replace(form, name=f"quiet-{form.name}", audio=(form.audio * dbfs(peak_dbfs) / peak)))
    return out


def continuous_set(clips: list[Clip], minimum: float = 60.0, forms: int = 2) -> list[LongForm]:
    """Over ``minimum`` seconds of speech with no pause longer than 0.4 s: clips trimmed of
    their edge silence and joined with 0.2-0.4 s of room noise, as a fluent talker."""
    trimmed = [replace(c, audio=trim(c.audio)) for c in clips]
    out = []
    for number in range(forms):
        order, total, k = [], 0.0, number
        while total < minimum:
            clip = trimmed[k % len(trimmed)]
            order.append(clip)
            total += len(clip.audio) / RATE + 0.3
            k += 3  # a different order per form
        gaps = [(0.2, 0.3, 0.4)[i % 3] for i in range(len(order))]
        out.append(join(f"continuous-{number}", order, gaps, seed=500 + number, lead=0.5))
    return out


def with_wire(forms: list[LongForm]) -> list[LongForm]:
    """LINEAR16 wire bytes for forms that have none; what the server hears is exactly them."""
    out = []
    for form in forms:
        if form.wire:
            out.append(form)
            continue
        wire = float_to_linear16(form.audio)
        heard = AudioDecoder(stt_pb2.LINEAR16, RATE).decode(wire)
        out.append(replace(form, wire=wire, audio=heard))
    return out


CONDITIONS = (
    "joined",
    "readings",
    "slow",
    "mulaw",
    "alaw",
    "snr20",
    "snr10",
    "quiet",
    "continuous",
)


def build(condition: str) -> list[LongForm]:
    """The long-forms of one condition (see CONDITIONS)."""
    if condition == "readings":
        return with_wire(readings_set(long_utterances()))
    clips = short_clips()
    if condition == "joined":
        return with_wire(joined_set(clips))
    if condition == "slow":
        return with_wire(slowed_set(clips))
    if condition in ("mulaw", "alaw"):
        encoding = stt_pb2.MULAW if condition == "mulaw" else stt_pb2.ALAW
        return g711_set(joined_set(clips), encoding)
    if condition in ("snr20", "snr10"):
        return with_wire(noisy_set(joined_set(clips), float(condition[3:])))
    if condition == "quiet":
        return with_wire(quiet_set(joined_set(clips)))
    if condition == "continuous":
        return with_wire(continuous_set(clips))
    raise ValueError(f"unknown condition {condition!r}; one of {', '.join(CONDITIONS)}")
