"""A real OTLP/gRPC receiver (the collector's trace, metrics and logs services) for tests.

It stores every export request it gets, so tests can assert on exactly what the
engine's OTLP exporters sent over the wire.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpReceiver(
    trace_service_pb2_grpc.TraceServiceServicer,
    metrics_service_pb2_grpc.MetricsServiceServicer,
    logs_service_pb2_grpc.LogsServiceServicer,
):
    def __init__(self) -> None:
        self.traces: list = []
        self.metrics: list = []
        self.logs: list = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def Export(self, request, context):  # noqa: N802 - one method name serves all three services
        with self._lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()
            if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                self.metrics.append(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()
            self.logs.append(request)
            return logs_service_pb2.ExportLogsServiceResponse()

    def spans(self) -> list:
        with self._lock:
            return [
                span
                for request in self.traces
                for resource in request.resource_spans
                for scope in resource.scope_spans
                for span in scope.spans
            ]

    def resources(self) -> list:
        with self._lock:
            return [r.resource for request in self.traces for r in request.resource_spans]

    def metric_points(self) -> dict[str, list]:
        """Metric name -> its data points across all exports."""
        points: dict[str, list] = {}
        with self._lock:
            requests = list(self.metrics)
        for request in requests:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        kind = metric.WhichOneof("data")
                        points.setdefault(metric.name, []).extend(getattr(metric, kind).data_points)
        return points

    def log_records(self) -> list:
        with self._lock:
            return [
                record
                for request in self.logs
                for resource in request.resource_logs
                for scope in resource.scope_logs
                for record in scope.log_records
            ]

    def wait_for(self, predicate, timeout: float = 30) -> None:
        from tests.helpers import wait_until

        wait_until(predicate, timeout, 0.1, "the OTLP receiver to get what the test waits for")


class OtlpHttpReceiver(OtlpReceiver):
    """The same store behind OTLP/HTTP (protobuf bodies on /v1/traces, /v1/metrics, /v1/logs).

    ``prefix`` puts the paths under another root, as Loki serves them (``/otlp/v1/logs``).
    """

    def __init__(self, prefix: str = "") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.traces, self.metrics, self.logs = [], [], []
        self._lock = threading.Lock()
        receiver = self
        kinds = {
            f"{prefix}/v1/traces": (
                trace_service_pb2.ExportTraceServiceRequest,
                trace_service_pb2.ExportTraceServiceResponse,
            ),
            f"{prefix}/v1/metrics": (
                metrics_service_pb2.ExportMetricsServiceRequest,
                metrics_service_pb2.ExportMetricsServiceResponse,
            ),
            f"{prefix}/v1/logs": (
                logs_service_pb2.ExportLogsServiceRequest,
                logs_service_pb2.ExportLogsServiceResponse,
            ),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                if self.path not in kinds:
                    self.send_error(404, f"no OTLP endpoint at {self.path}")
                    return
                request_type, response_type = kinds[self.path]
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                receiver.Export(request_type.FromString(body), None)
                payload = response_type().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._http.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpHttpReceiver:
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
