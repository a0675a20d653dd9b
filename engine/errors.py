"""Errors that reach clients as gRPC statuses with google.rpc details.

Every refusal names what was wrong in its message, carries a stable ``reason``
(``google.rpc.ErrorInfo``) that clients can switch on, and, for bad request
fields, a ``google.rpc.BadRequest`` field violation. Never a stack trace. A refusal that
the same request may simply repeat also says when: ``google.rpc.RetryInfo`` for clients that
read details, and the ``grpc-retry-pushback-ms`` trailer that gRPC's own retry policy honours
(it ignores RetryInfo).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "stt-engine"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

# Seconds a refused client should wait before sending the same request again, by reason.
# Only refusals at admission are here: nothing of the call was read, so a repeat is safe.
RETRY_DELAYS: dict[str, float] = {
    # This server will take nothing new, ever; another replica will. A second lets gRPC
    # health checking or Kubernetes endpoints take this one out of rotation first.
    "STT_SERVER_DRAINING": 1.0,
    # About a load and warm-up: the bundled tiny.en takes about a second on a CPU, larger
    # models a few. gRPC's five attempts then cover 8 s; to wait out a longer load, watch
    # health for SERVING instead.
    "STT_MODEL_LOADING": 2.0,
    # A slot frees when any stream or Recognize call ends: Recognize calls last about a
    # second, and a balanced client's retry goes to the next server anyway.
    "STT_TOO_MANY_STREAMS": 1.0,
    # The same kind of refusal, for one identity's streams: one of them must end first.
    "STT_TOO_MANY_STREAMS_FOR_IDENTITY": 1.0,
}


class SttError(Exception):
    """A failure to report to the client as a gRPC status."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field
        self.retry_after = retry_after  # seconds; None: repeating the request will not help

    @property
    def retry_after_ms(self) -> int | None:
        return None if self.retry_after is None else round(self.retry_after * 1000)

    def to_status(self) -> grpc.Status:
        """The grpc.Status: code, message, the ``grpc-status-details-bin`` trailer and, when
        the refusal is retryable, the ``grpc-retry-pushback-ms`` trailer."""
        details = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        details.append(_pack(info))
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.message
            )
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
        trailers = ()
        if self.retry_after_ms is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(self.retry_after_ms)
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
            trailers = ((RETRY_PUSHBACK_KEY, str(self.retry_after_ms)),)
        status = rpc_status.to_status(
            status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message, details=details)
        )
        return Status(status.code, status.details, tuple(status.trailing_metadata) + trailers)


@dataclass(frozen=True)
class Status(grpc.Status):
    """What ``context.abort`` takes: the code, the message and the trailers."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


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


def retryable(code: grpc.StatusCode, reason: str, message: str) -> SttError:
    """A refusal the client may repeat as it is, after ``RETRY_DELAYS[reason]``."""
    return SttError(code, reason, message, retry_after=RETRY_DELAYS[reason])


def decode_failed() -> SttError:
    return SttError(
        grpc.StatusCode.INTERNAL, "STT_DECODE_FAILED", "decoding an utterance failed on the server"
    )


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
