"""Errors that reach clients as gRPC statuses with google.rpc details.

Every refusal names what was wrong in its message, carries a stable ``reason``
(``google.rpc.ErrorInfo``) that clients can switch on, and, for bad request
fields, a ``google.rpc.BadRequest`` field violation. Never a stack trace.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "stt-engine"


class SttError(Exception):
    """A failure to report to the client as a gRPC status."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field

    def to_status(self) -> grpc.Status:
        """The grpc.Status (code, message and ``grpc-status-details-bin`` trailer)."""
        details = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        details.append(_pack(info))
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.message
            )
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
        status = status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=details
        )
        return rpc_status.to_status(status)


def shown(value: str, limit: int = 40) -> str:
    """A client's string as error messages and logs may quote it: ``repr`` of at most
    ``limit`` characters, with the length when it was cut, so no client can make us echo
    (or log) an unbounded value."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def invalid_argument(reason: str, message: str, field: str | None = None) -> SttError:
    return SttError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, field)


def out_of_range(reason: str, message: str, field: str | None = None) -> SttError:
    return SttError(grpc.StatusCode.OUT_OF_RANGE, reason, message, field)


def error_reason(status_details: status_pb2.Status | None) -> str | None:
    """The ErrorInfo reason inside a google.rpc.Status, for clients and tests."""
    if status_details is None:
        return None
    for detail in status_details.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None
