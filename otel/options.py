"""Telemetry options, read from the standard OTEL_* variables plus a few STT_* ones."""

from __future__ import annotations

import os
from dataclasses import dataclass

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_log_level(text: str) -> str:
    """A log level name in capitals, from any case (``WARN`` too); ValueError for anything else,
    which ``logging`` would silently take as INFO."""
    level = text.strip().upper()
    level = "WARNING" if level == "WARN" else level
    if level not in LOG_LEVELS:
        raise ValueError(f"{text!r} is not a log level: {', '.join(LOG_LEVELS)}")
    return level


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class TelemetryOptions:
    """What telemetry is produced and where it goes.

    Attributes:
        enabled: False when ``OTEL_SDK_DISABLED=true``: no-op providers, console logs only.
        traces_exporter, metrics_exporter, logs_exporter: ``otlp``, ``console`` or ``none``
            (``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER``, ``OTEL_LOGS_EXPORTER``).
        protocol: OTLP transport, ``grpc`` (default) or ``http/protobuf``
            (``OTEL_EXPORTER_OTLP_PROTOCOL``). Endpoint, headers, timeout, sampler, metric
            export interval and resource attributes are read by the SDK from their standard
            ``OTEL_*`` variables.
        metrics_port: when set, a Prometheus scrape endpoint on this port exposes the same
            instruments (for users without a collector).
        metrics_host: address the Prometheus endpoint binds.
        log_format: console log format, ``text`` (human-readable) or ``json`` (one object a line).
        log_level: root log level, one of ``LOG_LEVELS``.
        record_transcripts: put transcript text on decode spans and logs. User data, so off
            unless ``STT_TELEMETRY_RECORD_TRANSCRIPTS=true``.
        chunk_spans: ``all`` (a span per audio chunk), ``speech`` (only chunks inside an
            utterance) or ``none``.
        max_chunk_spans: chunk spans per stream; past it chunks are counted on the stream
            span instead, so an hour-long stream stays a readable trace.
        system_metrics: export process CPU, memory and thread metrics.
    """

    enabled: bool = True
    traces_exporter: str = "otlp"
    metrics_exporter: str = "otlp"
    logs_exporter: str = "otlp"
    protocol: str = "grpc"
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    log_format: str = "text"
    log_level: str = "INFO"
    record_transcripts: bool = False
    chunk_spans: str = "all"
    max_chunk_spans: int = 3000
    system_metrics: bool = True

    def __post_init__(self) -> None:
        parse_log_level(self.log_level)  # a bad level must not pass as INFO

    @classmethod
    def from_env(cls, **overrides) -> TelemetryOptions:
        """The OTEL_* variables and the STT_* ones that no flag has. The flags' own variables
        (``STT_LOG_LEVEL``, ``STT_METRICS_PORT``...) are read and validated with the flags
        (engine/flags.py), which pass their values as ``overrides``."""
        env = os.environ.get
        options = cls(
            enabled=not _env_bool("OTEL_SDK_DISABLED"),
            traces_exporter=env("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip(),
            metrics_exporter=env("OTEL_METRICS_EXPORTER", "otlp").split(",")[0].strip(),
            logs_exporter=env("OTEL_LOGS_EXPORTER", "otlp").split(",")[0].strip(),
            protocol=env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip(),
            record_transcripts=_env_bool("STT_TELEMETRY_RECORD_TRANSCRIPTS"),
            max_chunk_spans=int(env("STT_TRACE_MAX_CHUNK_SPANS", "3000")),
        )
        return options.replace(**{k: v for k, v in overrides.items() if v is not None})

    def replace(self, **changes) -> TelemetryOptions:
        from dataclasses import replace

        return replace(self, **changes)
