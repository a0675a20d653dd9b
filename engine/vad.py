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
    """Per-stream Silero VAD: feed 16 kHz audio, get one speech probability per 32 ms frame.

    Two recurrent states score every frame and the higher probability wins. The carried
    state sees the whole stream, as Silero is meant to run. Carried through long silence or
    room noise it drifts and scores the next speech lower and lower (a clear sentence after
    30 s of quiet room noise scored under 0.1). The fresh state is reset after every run of
    ``refresh_frames`` consecutive frames below ``quiet_below`` (0: no fresh state), so it
    judges each onset without that history. Neither alone is enough: a state reset just
    before an onset scores the first word of speech lower than a state warmed on the
    speech before it ("ask not" after a 1 s pause in JFK: 0.55 peak fresh, 0.74 carried).
    The resets fall on the same frames however the audio is chunked, so chunking never
    changes a probability.
    """

    def __init__(self, refresh_frames: int = 0, quiet_below: float = 0.5) -> None:
        self.refresh_frames = refresh_frames
        self.quiet_below = quiet_below
        self.refreshes = 0
        self._quiet_run = 0
        self._carried = _zero_state()
        self._fresh = _zero_state()
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
        self._context = frames[-1, -CONTEXT_SAMPLES:].copy()
        if not self.refresh_frames:
            probs, self._carried = _run(batch, self._carried)
            return probs
        # In pieces that end where a reset may fall: the quiet run grows by one a frame.
        out, done = [], 0
        while done < count:
            piece = batch[done : done + self.refresh_frames - self._quiet_run]
            carried, self._carried = _run(piece, self._carried)
            fresh, self._fresh = _run(piece, self._fresh)
            probs = np.maximum(carried, fresh)
            for prob in probs:
                self._quiet_run = self._quiet_run + 1 if prob < self.quiet_below else 0
            if self._quiet_run >= self.refresh_frames:
                self._quiet_run = 0
                self.refreshes += 1
                self._fresh = _zero_state()
            out.append(probs)
            done += len(piece)
        return np.concatenate(out)


def _zero_state() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(STATE_SHAPE, dtype=np.float32), np.zeros(STATE_SHAPE, dtype=np.float32)


def _run(batch: np.ndarray, state: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, tuple]:
    """Probabilities of a batch of frames, and the recurrent (h, c) state after it."""
    probs, h, c = _session().run(None, {"input": batch, "h": state[0], "c": state[1]})
    return np.asarray(probs, dtype=np.float32).reshape(-1), (h, c)
