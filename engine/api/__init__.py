"""Generated protobuf and gRPC modules for ``proto/stt/v1/stt.proto`` (see engine.codegen)."""

from . import stt_pb2, stt_pb2_grpc

# "stt.v1.Speech": the health service name of the server's readiness, checked by clients too.
SERVICE_NAME = stt_pb2.DESCRIPTOR.services_by_name["Speech"].full_name

__all__ = ["SERVICE_NAME", "stt_pb2", "stt_pb2_grpc"]
