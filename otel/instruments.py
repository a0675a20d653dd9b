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
        self.model_loaded = meter.create_up_down_counter(
            "stt.model.loaded", unit="{model}", description="Models loaded and serving (1 when ready)"
        )
