"""The metric instruments: names, units and buckets in one place.

Names follow OpenTelemetry conventions (``rpc.server.call.duration``) and an
``stt.`` namespace for the engine; units are UCUM. Attributes are low-cardinality
only: method, status code, decode kind, error reason, model name, the authenticated client
identity (as many as the configured tokens and certificates), the phase, length class and
endpoint reason of a final's latency. Never stream ids.
Prometheus sees ``.`` as ``_``, a unit suffix, and ``_total`` on counters.
"""

from __future__ import annotations

from opentelemetry.metrics import Meter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
CALL_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CHUNK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)

# Audio levels as linear RMS (fraction of full scale) at these dBFS: histograms take no negatives.
LEVEL_BUCKETS = tuple(
    10 ** (level / 20)
    for level in (-100, -90, -80, -70, -60, -55, -50, -45, -40, -35, -30, -25, -20, -15, -10, -5, 0)
)
SNR_BUCKETS = (0, 5, 10, 15, 20, 25, 30, 40, 50, 60)
SHARE_BUCKETS = (0.0001, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
BANDWIDTH_BUCKETS = (2000, 3000, 4000, 4500, 5000, 6000, 7000, 8000)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
COMPRESSION_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.4, 3.0, 5.0)

# Utterance length classes of the final latency breakdown: (class, upper bound of the speech in
# seconds). Short: a command or a short sentence, decoded in a few hundred ms; long: a read
# sentence of 8 s or more, whose whole-utterance decode dominates its final's latency.
LENGTH_CLASSES = (("short", 3.0), ("medium", 8.0), ("long", float("inf")))
# The parts of a final's latency (otel.telemetry.LatencyBreakdown), the values of stt.final.phase.
FINAL_PHASES = ("endpoint_wait", "queue_wait", "decode", "ordering_wait")


def length_class(speech_seconds: float) -> str:
    """``short`` below 3 s of speech, ``medium`` below 8 s, ``long`` from 8 s."""
    return next(name for name, bound in LENGTH_CLASSES if speech_seconds < bound)


class Instruments:
    """Every instrument the engine records."""

    def __init__(self, meter: Meter) -> None:
        histogram = meter.create_histogram
        self.call_duration = histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of RPCs handled by the server",
            explicit_bucket_boundaries_advisory=CALL_BUCKETS,
        )
        self.active_streams = meter.create_up_down_counter(
            "stt.streams.active", unit="{stream}", description="Streams being served"
        )
        self.audio_received = meter.create_counter(
            "stt.audio.received", unit="s", description="Seconds of audio received"
        )
        self.chunks = meter.create_counter("stt.chunks", unit="{chunk}", description="Audio chunks received")
        self.chunk_duration = histogram(
            "stt.chunk.duration",
            unit="s",
            description="Time to process one audio chunk (decode, resample, VAD)",
            explicit_bucket_boundaries_advisory=CHUNK_BUCKETS,
        )
        self.decode_duration = histogram(
            "stt.decode.duration",
            unit="s",
            description="Model time of one decode (encoder and decoder), by kind",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        # Named for interims, which usually come first; it times whichever result comes first
        # (the first-result SLO, deploy/slo/stt-engine.yaml), and dashboards query the name.
        self.first_result_latency = histogram(
            "stt.first_interim.latency",
            unit="s",
            description=(
                "Time from speech onset to the utterance's first result: an interim, or the final "
                "when none came before it, by kind"
            ),
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.final_latency = histogram(
            "stt.final.latency",
            unit="s",
            description="Time from the end of speech to its final result (endpoint silence included)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        # One histogram split by phase rather than one per phase: the phases add up to
        # stt.final.latency, as cpu.mode splits system.cpu.time, and one query stacks them.
        self.final_phase_duration = histogram(
            "stt.final.phase.duration",
            unit="s",
            description=(
                "Part of a final's latency spent in one phase (endpoint_wait, queue_wait, decode, "
                "ordering_wait), by utterance length class and endpoint reason"
            ),
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.realtime_factor = histogram(
            "stt.realtime_factor",
            unit="1",
            description="Model time per second of audio, per stream (above 1: falling behind)",
            explicit_bucket_boundaries_advisory=RATIO_BUCKETS,
        )
        self.speculative_finals = meter.create_counter(
            "stt.speculative_finals",
            unit="{decode}",
            description="Final decodes started before the endpoint, by outcome (used, discarded)",
        )
        self.results = meter.create_counter(
            "stt.results", unit="{result}", description="Results sent, by kind"
        )
        # enduser.id is bounded by the configured tokens and certificates, not by traffic.
        self.client_calls = meter.create_counter(
            "stt.client.calls",
            unit="{call}",
            description="Authenticated calls (streams included), by client identity and method",
        )
        self.errors = meter.create_counter(
            "stt.errors", unit="{error}", description="Failed calls, by reason and status code"
        )
        self.queue_depth = meter.create_up_down_counter(
            "stt.inference.queue.depth",
            unit="{request}",
            description="Decodes waiting for an inference worker",
        )
        self.queue_wait = histogram(
            "stt.inference.queue.wait",
            unit="s",
            description="Time a decode waited for an inference worker, by kind",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.model_load_duration = histogram(
            "stt.model.load.duration",
            unit="s",
            description="Time to load and warm the model",
            explicit_bucket_boundaries_advisory=CALL_BUCKETS,
        )
        self._quality(meter)
        self.model_loaded = meter.create_up_down_counter(
            "stt.model.loaded", unit="{model}", description="Models loaded and serving (1 when ready)"
        )

    def _quality(self, meter: Meter) -> None:
        """Input-audio and recognition quality (otel/quality.py), by encoding, sample-rate class
        and, where identities are bounded, client."""
        histogram = meter.create_histogram
        self.audio_speech_rms = histogram(
            "stt.audio.speech_rms",
            unit="1",
            description="RMS of an utterance's speech frames, fraction of full scale (20 log10: dBFS)",
            explicit_bucket_boundaries_advisory=LEVEL_BUCKETS,
        )
        self.audio_noise_rms = histogram(
            "stt.audio.noise_rms",
            unit="1",
            description="Noise floor (median non-speech frame) of an utterance, fraction of full scale",
            explicit_bucket_boundaries_advisory=LEVEL_BUCKETS,
        )
        self.audio_snr = histogram(
            "stt.audio.snr",
            unit="dB",
            description="Estimated signal-to-noise ratio of an utterance (0 at or below 0 dB)",
            explicit_bucket_boundaries_advisory=SNR_BUCKETS,
        )
        self.audio_clipped_share = histogram(
            "stt.audio.clipped_share",
            unit="1",
            description="Share of an utterance's samples at 99% of full scale or beyond",
            explicit_bucket_boundaries_advisory=SHARE_BUCKETS,
        )
        self.audio_bandwidth = histogram(
            "stt.audio.bandwidth",
            unit="Hz",
            description="Effective bandwidth of an utterance's speech (4.5 kHz or less: telephone audio)",
            explicit_bucket_boundaries_advisory=BANDWIDTH_BUCKETS,
        )
        self.audio_vad_uncertain_share = histogram(
            "stt.audio.vad_uncertain_share",
            unit="1",
            description="Share of an utterance's frames whose speech probability was near the threshold",
            explicit_bucket_boundaries_advisory=SHARE_BUCKETS,
        )
        self.audio_utterances = meter.create_counter(
            "stt.audio.utterances", unit="{utterance}", description="Utterances whose audio was measured"
        )
        self.audio_flagged_utterances = meter.create_counter(
            "stt.audio.flagged_utterances",
            unit="{utterance}",
            description="Utterances whose audio was clipped, quiet, noisy or narrowband, by condition",
        )
        self.recognition_confidence = histogram(
            "stt.recognition.confidence",
            unit="1",
            description="Confidence of a final (exp of its average token log-probability)",
            explicit_bucket_boundaries_advisory=CONFIDENCE_BUCKETS,
        )
        self.recognition_no_speech_prob = histogram(
            "stt.recognition.no_speech_prob",
            unit="1",
            description="The model's probability that a final's audio held no speech",
            explicit_bucket_boundaries_advisory=SHARE_BUCKETS,
        )
        self.recognition_compression_ratio = histogram(
            "stt.recognition.compression_ratio",
            unit="1",
            description="zlib compression ratio of a final's text (above 2.4: it repeats itself)",
            explicit_bucket_boundaries_advisory=COMPRESSION_BUCKETS,
        )
        self.recognition_low_probability_words = histogram(
            "stt.recognition.low_probability_word_share",
            unit="1",
            description="Share of a final's words under 0.5 probability (finals whose words were aligned)",
            explicit_bucket_boundaries_advisory=SHARE_BUCKETS,
        )
        self.recognition_fallbacks = meter.create_counter(
            "stt.recognition.fallbacks",
            unit="{final}",
            description="Finals whose temperature-0 decode was rejected, by reason",
        )
        self.recognition_repairs = meter.create_counter(
            "stt.recognition.repairs",
            unit="{final}",
            description="Finals the engine repaired (loop_cut, dropped_head, decoded_rest), by repair",
        )
