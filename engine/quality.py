"""Why a transcript was bad: measures of the input audio and of the recognition.

Input audio (``AudioMeter``, ``AudioQuality``): level, noise floor, SNR, clipping, DC offset,
VAD certainty and effective bandwidth, per utterance and per stream. They answer the question
from the audio side: a microphone gain so low the
VAD misses words, clipping, a telephone line upsampled to 16 kHz, a noisy room. Everything is
computed from the 16 kHz audio the recognizer already holds and the VAD's per-frame speech
probabilities, over the same 32 ms frames: numpy over each frame once as it arrives, no second
pass over the audio and no model. ``AudioMeter`` keeps a few figures per frame (a bounded
ring), from which an utterance's summary is taken when it ends.

Levels are dBFS as ``20 * log10(rms)`` of samples in [-1, 1] (sox's "RMS lev dB"; a full-scale
sine reads -3 dBFS).

Recognition (``RecognitionQuality``): how sure the model was of a final, and what the engine did
to get it (temperature fallback, a loop cut, a repair).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .options import TARGET_SAMPLE_RATE
from .vad import FRAME_SAMPLES

FLOOR_DB = -120.0  # digital silence reads as this instead of -inf
BAND_HZ = 500
BANDS = TARGET_SAMPLE_RATE // 2 // BAND_HZ  # 16 bands of 500 Hz up to 8 kHz
_BINS_PER_BAND = FRAME_SAMPLES // 2 // BANDS
# A band counts towards the bandwidth while the long-term speech spectrum there is within this
# of its strongest band: speech recorded at 16 kHz keeps energy up to 6-8 kHz within 50 dB;
# G.711 resampled up has nothing above 4 kHz but the resampler's stop band, 60-90 dB down.
BANDWIDTH_RANGE_DB = 50.0
UNCERTAIN_MARGIN = 0.15  # a frame within this of the speech threshold: the VAD was unsure
NOISE_GUARD_FRAMES = 3  # non-speech frames this close to speech may hold its onset or tail
MIN_NOISE_FRAMES = 8  # 256 ms of non-speech: fewer gives no noise floor of the utterance's own
CLIP_FRACTION = 0.99  # a sample at 99% of the encoding's full scale or beyond is clipped

# What makes an utterance's audio "bad" for the dashboard's and alerts' counts.
CLIPPED_SHARE = 0.001  # 0.1% of samples clipped: audible distortion, and Whisper hears it
QUIET_DBFS = -50.0  # speech below this: a gain problem; the VAD starts missing words
NOISY_SNR_DB = 10.0  # below this the robustness bench's WER rises by 5-10 points
# Telephone audio resampled up: nothing above 4 kHz but the resampler's transition band (the
# engine's own, for 8 kHz streams, reads 4.5 kHz); recorded speech reads 5 kHz or more.
NARROWBAND_HZ = 4500.0

_HANN = np.hanning(FRAME_SAMPLES).astype(np.float32)
# Frames measured together: numpy's cost per call, not per sample, dominates the three frames
# of a 100 ms chunk (0.7 ms per audio second measured one chunk at a time).
BATCH_FRAMES = 16
# Frame ring capacity beyond the longest utterance: the pause before it, for its noise floor.
LOOKBACK_SECONDS = 10.0


def db(power: float) -> float:
    """A power (mean square) in dB, with ``FLOOR_DB`` for silence."""
    return max(FLOOR_DB, 10.0 * float(np.log10(power))) if power > 0 else FLOOR_DB


@dataclass
class AudioQuality:
    """Measures of a stretch of audio (an utterance, or a whole stream).

    Attributes:
        speech_level: RMS level of the frames the VAD called speech, dBFS; None without any.
        noise_level: the noise floor, dBFS: the median power of the frames clearly not speech
            (below the threshold by ``UNCERTAIN_MARGIN`` and ``NOISE_GUARD_FRAMES`` away from
            speech), from the end of the utterance before; the stream's latest floor when the
            utterance had fewer than ``MIN_NOISE_FRAMES`` of them. None when never seen.
        snr: estimated signal-to-noise ratio, dB: the speech power less the noise power, over
            the noise power (speech frames hold both). None without a noise floor.
        peak_level: the largest sample magnitude, dBFS.
        clipped_share: share of samples at 99% of the encoding's full scale or beyond.
        dc_offset: mean sample value, in full scale (0.01 is 1% of full scale).
        vad_uncertain_share: share of frames whose speech probability was within
            ``UNCERTAIN_MARGIN`` of the threshold.
        bandwidth: the upper edge (Hz) of the highest 500 Hz band whose long-term speech
            power is within ``BANDWIDTH_RANGE_DB`` of the strongest band; None without speech.
        speech_seconds: seconds of speech frames measured.
        seconds: seconds of audio measured.
    """

    speech_level: float | None
    noise_level: float | None
    snr: float | None
    peak_level: float
    clipped_share: float
    dc_offset: float
    vad_uncertain_share: float
    bandwidth: float | None
    speech_seconds: float
    seconds: float

    def conditions(self, sample_rate: int) -> list[str]:
        """The ways this audio is bad, for a stream sent at ``sample_rate`` Hz: ``clipped``,
        ``quiet``, ``noisy``, ``narrowband`` (at most 4.5 kHz of bandwidth in audio sent at
        16 kHz or more: telephone audio resampled up)."""
        found = []
        if self.clipped_share >= CLIPPED_SHARE:
            found.append("clipped")
        if self.speech_level is not None and self.speech_level < QUIET_DBFS:
            found.append("quiet")
        if self.snr is not None and self.snr < NOISY_SNR_DB:
            found.append("noisy")
        if self.bandwidth is not None and self.bandwidth <= NARROWBAND_HZ and sample_rate >= 16000:
            found.append("narrowband")
        return found


@dataclass
class _Sums:
    """Sums over frames that summaries are made of; they add up over a stream's utterances."""

    frames: int = 0
    speech_frames: int = 0
    speech_power: float = 0.0  # summed over speech frames
    noise_frames: int = 0
    noise_power: float = 0.0  # the noise floor's power, weighted by its frames
    peak: float = 0.0
    clipped: int = 0
    dc: float = 0.0
    uncertain: int = 0
    bands: np.ndarray = field(default_factory=lambda: np.zeros(BANDS))

    def add(self, other: _Sums) -> None:
        for name in (
            "frames", "speech_frames", "speech_power", "noise_frames", "noise_power", "clipped", "dc",
            "uncertain", "bands",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.peak = max(self.peak, other.peak)

    def quality(self) -> AudioQuality:
        samples = max(1, self.frames * FRAME_SAMPLES)
        speech_power = self.speech_power / self.speech_frames if self.speech_frames else None
        noise_power = self.noise_power / self.noise_frames if self.noise_frames else None
        snr = None
        if speech_power is not None and noise_power is not None:
            # Speech frames hold speech and noise: take the noise out (never below -20 dB).
            noise = max(noise_power, 1e-12)
            snr = db(max(speech_power - noise, noise / 100) / noise)
        return AudioQuality(
            speech_level=db(speech_power) if speech_power is not None else None,
            noise_level=db(noise_power) if noise_power is not None else None,
            snr=snr,
            peak_level=db(self.peak * self.peak),
            clipped_share=self.clipped / samples,
            dc_offset=self.dc / samples,
            vad_uncertain_share=self.uncertain / max(1, self.frames),
            bandwidth=bandwidth(self.bands) if self.speech_frames else None,
            speech_seconds=self.speech_frames * FRAME_SAMPLES / TARGET_SAMPLE_RATE,
            seconds=self.frames * FRAME_SAMPLES / TARGET_SAMPLE_RATE,
        )


def frame_features(frames: np.ndarray, speech: np.ndarray, clip_level: float) -> tuple[np.ndarray, ...]:
    """Per-frame power, peak, clipped samples, sample sum and band powers of ``frames``
    (n x 512); the spectrum of speech frames only (``speech``), as only they make the bandwidth."""
    magnitude = np.abs(frames)
    power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / FRAME_SAMPLES
    peak = magnitude.max(axis=1)
    clipped = np.count_nonzero(magnitude >= clip_level, axis=1)
    total = frames.sum(axis=1, dtype=np.float64)
    bands = np.zeros((len(frames), BANDS), dtype=np.float32)
    if speech.any():
        spectrum = np.fft.rfft(frames[speech] * _HANN, axis=1)[:, : BANDS * _BINS_PER_BAND]
        power_bins = spectrum.real**2 + spectrum.imag**2
        bands[speech] = power_bins.reshape(-1, BANDS, _BINS_PER_BAND).sum(axis=2)
    return power, peak, clipped, total, bands


class AudioMeter:
    """Per-frame figures of one stream's 16 kHz audio, and summaries of frame ranges.

    Fed the same audio as the VAD with the probabilities it returned; frame ``k`` is samples
    ``[512 k, 512 (k + 1))`` of the stream for both. The ring holds ``capacity_frames``
    frames: the longest utterance and the pause before it.
    """

    def __init__(self, speech_threshold: float, full_scale: float, capacity_frames: int) -> None:
        self.speech_threshold = speech_threshold
        self.clip_level = CLIP_FRACTION * full_scale
        self.capacity = capacity_frames
        self.frames = 0  # frames measured so far
        self._pending = np.zeros(0, dtype=np.float32)
        self._prob = np.zeros(capacity_frames, dtype=np.float32)
        self._power = np.zeros(capacity_frames)
        self._peak = np.zeros(capacity_frames, dtype=np.float32)
        self._clipped = np.zeros(capacity_frames, dtype=np.int32)
        self._total = np.zeros(capacity_frames)
        self._bands = np.zeros((capacity_frames, BANDS), dtype=np.float32)
        self._queued: list[np.ndarray] = []  # audio not measured yet, and its VAD probabilities
        self._queued_probs: list[np.ndarray] = []
        self._queued_frames = 0
        self._latest_noise: float | None = None  # power of the latest noise floor seen
        self._totals = _Sums()

    def process(self, samples: np.ndarray, probs: np.ndarray) -> None:
        """Takes the audio the VAD was given and the probabilities it returned for the frames
        it completed. Frames are measured ``BATCH_FRAMES`` at a time, and before a summary."""
        self._queued.append(samples)
        self._queued_probs.append(probs)
        self._queued_frames += len(probs)
        if self._queued_frames >= BATCH_FRAMES:
            self._measure()

    def _measure(self) -> None:
        if not self._queued:
            return
        audio = np.concatenate([self._pending, *self._queued])
        probs = np.concatenate(self._queued_probs)
        self._queued, self._queued_probs, self._queued_frames = [], [], 0
        count = len(audio) // FRAME_SAMPLES
        self._pending = audio[count * FRAME_SAMPLES :]
        if count != len(probs):
            raise ValueError(f"{count} frames but {len(probs)} VAD probabilities")
        if count == 0:
            return
        frames = audio[: count * FRAME_SAMPLES].reshape(count, FRAME_SAMPLES)
        speech = probs >= self.speech_threshold
        features = frame_features(frames, speech, self.clip_level)
        # Only the last ``capacity`` frames of a large message are kept.
        keep = min(count, self.capacity)
        slots = np.arange(self.frames + count - keep, self.frames + count) % self.capacity
        for ring, values in zip(
            (self._prob, self._power, self._peak, self._clipped, self._total, self._bands),
            (probs, *features),
        ):
            ring[slots] = values[count - keep :]
        self.frames += count

    def summary(self, start_sample: int, end_sample: int, noise_from: int, record: bool) -> AudioQuality:
        """Measures of samples ``[start_sample, end_sample)``, with the noise floor from sample
        ``noise_from`` on; ``record``: count them into the stream's summary (an ended
        utterance, not a speculative look at one)."""
        self._measure()
        end = min(self.frames, -(-end_sample // FRAME_SAMPLES))
        oldest = max(0, self.frames - self.capacity)
        start = min(end, max(oldest, start_sample // FRAME_SAMPLES))
        noise_start = min(start, max(oldest, noise_from // FRAME_SAMPLES))
        slots = np.arange(noise_start, end) % self.capacity
        prob = self._prob[slots]
        power = self._power[slots]
        speech_all = prob >= self.speech_threshold
        near_speech = np.zeros(len(prob), dtype=bool)
        if len(prob):  # numpy refuses to convolve an empty range
            near_speech = np.convolve(speech_all, np.ones(2 * NOISE_GUARD_FRAMES + 1), "same") > 0
        noise = (prob < self.speech_threshold - UNCERTAIN_MARGIN) & ~near_speech
        own = slots[start - noise_start :]  # the utterance's frames
        speech = speech_all[start - noise_start :]
        sums = _Sums(
            frames=len(own),
            speech_frames=int(np.count_nonzero(speech)),
            speech_power=float(self._power[own][speech].sum()),
            peak=float(self._peak[own].max()) if len(own) else 0.0,
            clipped=int(self._clipped[own].sum()),
            dc=float(self._total[own].sum()),
            uncertain=int(
                np.count_nonzero(
                    np.abs(prob[start - noise_start :] - self.speech_threshold) < UNCERTAIN_MARGIN
                )
            ),
            bands=self._bands[own][speech].sum(axis=0, dtype=np.float64),
        )
        noise_frames = int(np.count_nonzero(noise))
        if noise_frames >= MIN_NOISE_FRAMES:
            self._latest_noise = float(np.median(power[noise]))
            sums.noise_frames = noise_frames
        elif self._latest_noise is not None:
            sums.noise_frames = 1  # the stream's latest floor, with the weight of one frame
        sums.noise_power = (self._latest_noise or 0.0) * sums.noise_frames
        if record:
            self._totals.add(sums)
        return sums.quality()

    def stream_summary(self) -> AudioQuality | None:
        """Measures over every ended utterance of the stream; None before the first."""
        return self._totals.quality() if self._totals.frames else None


def bandwidth(bands: np.ndarray) -> float | None:
    """The upper edge of the highest band within ``BANDWIDTH_RANGE_DB`` of the strongest."""
    strongest = float(bands.max())
    if strongest <= 0:
        return None
    within = np.nonzero(bands >= strongest * 10 ** (-BANDWIDTH_RANGE_DB / 10))[0]
    return float((within[-1] + 1) * BAND_HZ)


LOW_PROBABILITY = 0.5  # a word below this probability is more likely wrong than right


@dataclass
class RecognitionQuality:
    """How sure the model was of a final, and what it took to get it.

    Attributes:
        avg_logprob: Whisper's average token log-probability of the final's decode(s).
        confidence: ``exp(avg_logprob)``, capped for a final that failed Whisper's checks: what
            the client receives.
        no_speech_prob: the model's probability that the audio holds no speech.
        compression_ratio: the text's zlib compression ratio (Whisper's loop measure; above
            2.4 it repeats itself).
        temperature: the sampling temperature of the decode that was kept (0: greedy/beam).
        fallback_reason: why the temperature-0 decode was not kept (``compression_ratio``,
            ``repetition``, ``avg_logprob``), empty when it was.
        loop_cut: the text repeated itself and was cut where it did.
        repair: ``dropped_head`` (the final left out words its interims heard: decoded in two),
            ``decoded_rest`` (the decoder stopped before the speech did: the rest decoded and
            joined), empty for none.
        low_probability_word_share: share of the final's words under 0.5 probability; None
            when its words were not aligned (finals under 6 s whose client asked for no word
            offsets: aligning them all would cost 9% more final decode time).
    """

    avg_logprob: float
    confidence: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    fallback_reason: str
    loop_cut: bool
    repair: str
    low_probability_word_share: float | None


def recognition_quality(hypothesis, repair: str = "") -> RecognitionQuality:
    """The measures of a final's ``model.Hypothesis``."""
    words = hypothesis.words
    low = sum(word.probability < LOW_PROBABILITY for word in words) / len(words) if words else None
    return RecognitionQuality(
        avg_logprob=hypothesis.avg_logprob,
        confidence=hypothesis.confidence,
        no_speech_prob=hypothesis.no_speech_prob,
        compression_ratio=hypothesis.compression_ratio,
        temperature=hypothesis.temperature,
        fallback_reason=hypothesis.fallback_reason,
        loop_cut=hypothesis.looped,
        repair=repair,
        low_probability_word_share=low,
    )
