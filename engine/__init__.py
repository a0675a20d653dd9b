"""stt-engine: streaming gRPC speech-to-text on faster-whisper, OpenTelemetry-native."""

__version__ = "0.1.0"
