"""Streaming voice activity detection with the Silero VAD model faster-whisper ships.

faster-whisper's own wrapper resets the recurrent state on every call, which is
right for whole files and wrong for a stream. ``StreamingVad`` carries the LSTM
state (h, c) and the 64-sample context between calls, so feeding a stream in
chunks of any size yields the same per-frame probabilities as one pass over the
whole recording.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

FRAME_SAMPLES = 512  # 32 ms at 16 kHz, the model's window
CONTEXT_SAMPLES = 64
STATE_SHAPE = (1, 1, 128)


@lru_cache(maxsize=1)
def _session():
    import importlib.util

    import onnxruntime

    options = onnxruntime.SessionOptions()
    # One thread: VAD frames are tiny and the cores belong to the Whisper workers.
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 4
    # Located without importing faster_whisper, which would load CTranslate2 (and its
    # OpenMP settings) before the model applies its thread limits.
    package = Path(importlib.util.find_spec("faster_whisper").origin).parent
    path = package / "assets" / "silero_vad_v6.onnx"
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=options)


def load_vad_model() -> None:
    """Loads the shared ONNX session ahead of the first stream."""
    _session()


class StreamingVad:
    """Per-stream Silero VAD: feed 16 kHz audio, get one speech probability per 32 ms frame."""

    def __init__(self) -> None:
        self._h = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Returns the probabilities of the frames completed by ``samples``."""
        audio = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        count = len(audio) // FRAME_SAMPLES
        self._pending = audio[count * FRAME_SAMPLES :]
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        frames = audio[: count * FRAME_SAMPLES].reshape(count, FRAME_SAMPLES)
        contexts = np.concatenate([self._context[None, :], frames[:-1, -CONTEXT_SAMPLES:]])
        batch = np.concatenate([contexts, frames], axis=1).astype(np.float32, copy=False)
        probs, self._h, self._c = _session().run(None, {"input": batch, "h": self._h, "c": self._c})
        self._context = frames[-1, -CONTEXT_SAMPLES:].copy()
        return np.asarray(probs, dtype=np.float32).reshape(-1)
