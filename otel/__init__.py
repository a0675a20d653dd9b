"""Telemetry for stt-engine: traces, metrics and logs over OTLP, behind a small interface.

The engine calls only what this package exports: ``Telemetry`` (one per process),
the ``StreamTelemetry`` it hands out per RPC, and the ``DecodeTelemetry`` per model
call; clients call ``traced_channel`` and ``ClientTelemetry``. No OpenTelemetry API is used
outside this package.
"""

from .client import ClientTelemetry, traced_channel
from .logs import configure_logging
from .options import TelemetryOptions
from .telemetry import CallTelemetry, DecodeTelemetry, StreamTelemetry, Telemetry

__all__ = [
    "CallTelemetry",
    "ClientTelemetry",
    "DecodeTelemetry",
    "StreamTelemetry",
    "Telemetry",
    "TelemetryOptions",
    "configure_logging",
    "traced_channel",
]
