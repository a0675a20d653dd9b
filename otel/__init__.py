"""Telemetry for stt-engine: traces, metrics and logs over OTLP, behind a small interface.

The engine calls only what this package exports: ``Telemetry`` (one per process),
the ``StreamTelemetry`` it hands out per RPC, and the ``DecodeTelemetry`` per model
call. No OpenTelemetry API is used outside this package.
"""

from .logs import configure_logging
from .options import TelemetryOptions
from .telemetry import CallTelemetry, DecodeTelemetry, StreamTelemetry, Telemetry

__all__ = [
    "CallTelemetry",
    "DecodeTelemetry",
    "StreamTelemetry",
    "Telemetry",
    "TelemetryOptions",
    "configure_logging",
]
