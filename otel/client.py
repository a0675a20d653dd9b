"""Client-side tracing: opentelemetry-instrumentation-grpc on one client's own channel.

``traced_channel`` wraps a channel with the package's client interceptor (what its
``GrpcInstrumentorClient`` installs on every channel, here on this one only, nothing patched
globally). Each call gets a CLIENT span, named ``/stt.v1.Speech/StreamingRecognize``, and its
W3C ``traceparent`` goes out in the request metadata, so the server's RPC span becomes its
child. Since contrib PR #4259 (in 0.66b2) a bidirectional stream goes through the
interceptor's future path: the caller gets the real ``grpc.Call`` back, and the span ends in a
done callback when the stream ends (its status code on the span), not when the call starts.

``ClientTelemetry`` is the command line's own tracer provider: it exports, under
``service.name=stt-engine-cli``, only when the ``OTEL_*`` variables configure an exporter.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import grpc

from .options import TelemetryOptions
from .telemetry import resource_from_env, span_exporter

logger = logging.getLogger(__name__)

CLI_SERVICE_NAME = "stt-engine-cli"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def traced_channel(channel: grpc.Channel, tracer_provider=None) -> grpc.Channel:
    """``channel`` with a CLIENT span per call (health checks excepted) and the trace context
    sent in the metadata. ``tracer_provider``: None for the process's global one (an
    application's own SDK; without one the API's no-op tracer records nothing and passes on
    only the current span's context, if any)."""
    from opentelemetry.instrumentation.grpc import client_interceptor, filters
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    interceptor = client_interceptor(
        tracer_provider=tracer_provider, filter_=filters.negate(filters.health_check())
    )
    return intercept_channel(channel, interceptor)


def exporter_configured(options: TelemetryOptions) -> bool:
    """Whether ``OTEL_*`` asks for spans to go somewhere: an OTLP endpoint, or an explicit
    ``OTEL_TRACES_EXPORTER`` other than ``none``, and the SDK not disabled."""
    if not options.enabled or options.traces_exporter == "none":
        return False
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES) or "OTEL_TRACES_EXPORTER" in os.environ


class ClientTelemetry:
    """The tracer provider of a command-line client; ``tracer_provider`` is None (no spans,
    no ``traceparent``) unless an exporter is configured."""

    def __init__(self, options: TelemetryOptions, service_version: str) -> None:
        self.options = options
        self.tracer_provider = None
        if exporter_configured(options):
            self.tracer_provider = self._provider(service_version)

    @classmethod
    def from_env(cls, service_version: str) -> ClientTelemetry:
        return cls(TelemetryOptions.from_env(), service_version)

    def _provider(self, service_version: str):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = resource_from_env({"service.name": CLI_SERVICE_NAME, "service.version": service_version})
        provider = TracerProvider(resource=resource)
        exporter = span_exporter(self.options, console_out=sys.stderr)  # stdout: the transcript
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return provider

    def shutdown(self, timeout: float = 5.0) -> None:
        """Exports the spans ended so far, giving up after ``timeout`` (an unreachable
        collector must not hold the command)."""
        provider = self.tracer_provider
        if provider is None:
            return

        def stop() -> None:
            try:
                provider.shutdown()
            except Exception:  # noqa: BLE001 - shutdown must not fail the command
                logger.warning("telemetry flush failed", exc_info=True)

        thread = threading.Thread(target=stop, daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(max(0.0, timeout - (time.monotonic() - started)))
