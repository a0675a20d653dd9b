"""Generated protobuf and gRPC modules for ``proto/stt/v1/stt.proto`` (see engine.codegen)."""

from . import stt_pb2, stt_pb2_grpc

__all__ = ["stt_pb2", "stt_pb2_grpc"]
