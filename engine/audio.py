"""Audio decoding: wire encodings to 16 kHz mono float32, streaming-safe.

A stream's chunks may split samples and frames anywhere (odd-length LINEAR16
chunks, a stereo frame cut in half); the decoder keeps the partial bytes for the
next chunk. Resampling uses libswresample through PyAV and carries its filter
state between chunks, so chunk boundaries leave no clicks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from .api import stt_pb2
from .options import TARGET_SAMPLE_RATE

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
MAX_CHANNELS = 8
SUPPORTED_ENCODINGS = (stt_pb2.LINEAR16, stt_pb2.MULAW, stt_pb2.ALAW)


def _mulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    values = np.where(codes & 0x80, -magnitude, magnitude)
    return (values / 32768.0).astype(np.float32)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    values = np.where(codes & 0x80, magnitude, -magnitude)
    return (values / 32768.0).astype(np.float32)


MULAW_TABLE = _mulaw_table()
ALAW_TABLE = _alaw_table()


def full_scale(encoding: int) -> float:
    """The largest sample magnitude ``encoding`` can carry, as decoded (G.711's is below 1)."""
    if encoding == stt_pb2.MULAW:
        return float(MULAW_TABLE.max())
    if encoding == stt_pb2.ALAW:
        return float(ALAW_TABLE.max())
    return 32767 / 32768


class StreamingResampler:
    """Resamples float32 mono audio to 16 kHz across chunk boundaries."""

    def __init__(self, input_rate: int) -> None:
        self.input_rate = input_rate
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_SAMPLE_RATE)
        self._pts = 0

    def process(self, samples: np.ndarray) -> np.ndarray:
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = self.input_rate
        frame.pts = self._pts
        self._pts += len(samples)
        return _concat(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        return _concat(self._resampler.resample(None))


def _concat(frames: list) -> np.ndarray:
    if not frames:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([f.to_ndarray()[0] for f in frames]).astype(np.float32, copy=False)


class AudioDecoder:
    """Turns wire audio of one encoding, rate and channel count into 16 kHz mono."""

    def __init__(self, encoding: int, sample_rate: int, channels: int = 1) -> None:
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self.bytes_per_sample = 2 if encoding == stt_pb2.LINEAR16 else 1
        self.frame_bytes = self.bytes_per_sample * channels
        self._pending = b""
        self._resampler = StreamingResampler(sample_rate) if sample_rate != TARGET_SAMPLE_RATE else None

    def seconds(self, num_bytes: int) -> float:
        """Duration of ``num_bytes`` of wire audio."""
        return num_bytes / (self.frame_bytes * self.sample_rate)

    def decode(self, data: bytes) -> np.ndarray:
        """Decodes a chunk; a trailing partial frame is kept for the next call."""
        data = self._pending + data
        usable = len(data) - len(data) % self.frame_bytes
        self._pending = data[usable:]
        if usable == 0:
            return np.zeros(0, dtype=np.float32)
        samples = self._to_float(data[:usable])
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        return samples

    def decode_in_slices(self, data: bytes, seconds: float) -> Iterator[np.ndarray]:
        """Decodes ``data`` ``seconds`` of audio at a time (at least one slice, empty for empty
        data), so that a caller can do other work, or stop, between slices of a large message."""
        step = self.frame_bytes * max(1, round(self.sample_rate * seconds))
        for start in range(0, max(len(data), 1), step):
            yield self.decode(data[start : start + step])

    def flush(self) -> np.ndarray:
        """Returns what the resampler still holds; drops an incomplete trailing frame."""
        self._pending = b""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return self._resampler.flush()

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def _to_float(self, data: bytes) -> np.ndarray:
        raw = np.frombuffer(data, dtype=np.uint8)
        if self.encoding == stt_pb2.MULAW:
            return MULAW_TABLE[raw]
        if self.encoding == stt_pb2.ALAW:
            return ALAW_TABLE[raw]
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def read_audio_file(path: str | Path) -> np.ndarray:
    """Reads any file FFmpeg can (WAV, FLAC, MP3, ...) as 16 kHz mono float32."""
    from faster_whisper import decode_audio

    return decode_audio(str(path), sampling_rate=TARGET_SAMPLE_RATE)


def float_to_linear16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1) to LINEAR16 bytes, the inverse of decoding (x / 32768), so a
    16-bit recording read as float goes over the wire bit for bit."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def quietest_point(
    audio: np.ndarray, start: float, end: float, frame: float = 0.1, sample_rate: int = 16000
) -> float:
    """The offset in seconds, between ``start`` and ``end``, of the centre of the quietest
    ``frame`` of ``audio``: where to split speech between two words rather than inside one."""
    size, hop = round(frame * sample_rate), round(frame * sample_rate / 2)
    first = max(0, round(start * sample_rate))
    last = min(len(audio) - size, round(end * sample_rate))
    if last < first:
        return min(max(start, 0.0), len(audio) / sample_rate)
    starts = np.arange(first, last + 1, hop)
    energy = [float(np.mean(np.square(audio[index : index + size]))) for index in starts]
    return (int(starts[int(np.argmin(energy))]) + size / 2) / sample_rate
