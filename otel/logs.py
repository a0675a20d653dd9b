"""Logging: console (text or JSON) with trace ids, and the bridge to OTLP logs.

Every record carries the trace and span id current where it was emitted; the
engine runs inference with the decode span current, so records from worker
threads carry the stream's trace id too.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from opentelemetry import trace

from .options import parse_log_level

_EXPORT_LOGGERS = ("opentelemetry.exporter", "opentelemetry.sdk")
# The longest message a log record may carry, whoever logged it. The engine quotes client
# strings cut to 40 characters (engine.errors.shown), but libraries quote them whole: the
# OpenTelemetry API logged an 8 KB tracestate header in one WARNING line.
MAX_MESSAGE_CHARS = 1000


def _cut(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class BoundedMessage(logging.Filter):
    """Cuts every record's rendered message to ``MAX_MESSAGE_CHARS`` (saying how long it was),
    so no client value makes a long log line, whichever library logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: the handler reports it
            return True
        if len(message) > MAX_MESSAGE_CHARS:
            record.msg, record.args = _cut(message), None
        return True


class _BoundedTraceback:
    """A traceback's lines are cut too: an exception's text may quote a client value."""

    def formatException(self, ei) -> str:  # noqa: N802 - logging.Formatter's name
        text = super().formatException(ei)  # type: ignore[misc]
        return "\n".join(_cut(line) for line in text.splitlines())


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, or empty) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            record.trace_id = record.span_id = ""
        return True


class TextFormatter(_BoundedTraceback, logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        return f"{line} trace_id={trace_id}" if trace_id else line


class JsonFormatter(_BoundedTraceback, logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "trace_id", ""):
            entry["trace_id"] = record.trace_id
            entry["span_id"] = record.span_id
        for key in ("stt.error.reason", "rpc.response.status_code"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class ExportErrorThrottle(logging.Filter):
    """One exporter warning per logger a minute: an absent collector must not flood the console."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_EXPORT_LOGGERS):
            return True
        now = time.monotonic()
        if now - self._last.get(record.name, -self.interval) < self.interval:
            return False
        self._last[record.name] = now
        return True


def not_from_telemetry(record: logging.LogRecord) -> bool:
    """Keeps the SDK's own records out of OTLP, which would loop when export fails."""
    return not record.name.startswith("opentelemetry")


def configure_logging(level: str = "INFO", fmt: str = "text", logger_provider=None) -> None:
    """Console handler with trace ids (text or JSON); OTLP handler when a provider is given."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(parse_log_level(level))  # a bad level is an error, never INFO
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(TraceContextFilter())
    console.addFilter(BoundedMessage())
    console.addFilter(ExportErrorThrottle())
    console.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(console)
    if logger_provider is not None:
        from opentelemetry.instrumentation.logging.handler import LoggingHandler

        otlp = LoggingHandler(logger_provider=logger_provider)
        otlp.addFilter(not_from_telemetry)
        otlp.addFilter(BoundedMessage())
        root.addHandler(otlp)
    for noisy in ("faster_whisper", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
