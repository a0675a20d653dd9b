"""Server lifecycle: listen, load and warm the model, serve, drain on SIGTERM.

Health (grpc.health.v1) for "" and each Speech service (stt.v1, Google's, Riva's) reads NOT_SERVING from the
moment the port opens until the model is loaded and warm, SERVING while ready,
and NOT_SERVING again as soon as draining starts. With ``--health-address`` a second, plaintext
listener serves only that health service (the same statuses), for probes that cannot speak TLS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from otel import Telemetry, TelemetryOptions

from . import __version__
from .errors import SttError
from .google_api import GOOGLE_SERVICE_NAME, GoogleSpeechService, add_google_service
from .memory import can_release_memory, release_periodically
from .model import SpeechModel
from .options import ModelOptions, ServerOptions
from .riva_api import RIVA_SERVICE_NAME, RivaSpeechService, add_riva_service
from .scheduler import InferenceScheduler
from .security import Guard, ReloadingCertificates, SecurityOptions
from .service import SERVICE_NAME, SpeechService, add_speech_service
from .vad import load_vad_model

logger = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME, GOOGLE_SERVICE_NAME, RIVA_SERVICE_NAME)
MESSAGE_OVERHEAD = 64 << 10
# After the drain deadline, how long stopped streams may still decode their last finals.
FINALS_GRACE_SECONDS = 5.0
# Then ending what is left, closing the ports and flushing telemetry: the process exits at the
# latest drain_seconds + EXIT_AFTER_DRAIN_SECONDS after SIGTERM, whatever is still running.
EXIT_AFTER_DRAIN_SECONDS = 7.0
# Kept free at the end of that for the exit itself, on a busy machine.
EXIT_RESERVE_SECONDS = 0.5


class SttServer:
    """An asyncio gRPC server hosting the Speech, health and reflection services."""

    def __init__(
        self,
        options: ServerOptions,
        model_options: ModelOptions,
        telemetry: Telemetry | None = None,
        security: SecurityOptions | None = None,
    ) -> None:
        self.options = options
        self.security = security or SecurityOptions()
        self.model_options = model_options
        self.telemetry = telemetry or Telemetry(TelemetryOptions(enabled=False), __version__)
        self.service = SpeechService(options, self.telemetry)
        self.service.guard = Guard(self.security)
        self.certificates: ReloadingCertificates | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self.model: SpeechModel | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._scheduler: InferenceScheduler | None = None
        self._memory_release: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Opens the port (health NOT_SERVING) and returns the bound port."""
        largest = max(self.options.max_chunk_bytes, self.options.max_recognize_bytes)
        options = [
            # Above our own limits, so clients get our precise OUT_OF_RANGE errors.
            ("grpc.max_receive_message_length", largest + MESSAGE_OVERHEAD),
            ("grpc.max_send_message_length", 16 << 20),
            ("grpc.so_reuseport", 0),
        ]
        window = self.options.stream_window_bytes
        if window > 0:
            # A fixed window instead of gRPC's bandwidth-delay tuning (options.py says why).
            options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)]
        max_age = self.options.max_connection_age_seconds
        if max_age > 0:
            # gRPC's default grace after the GOAWAY is unlimited: open streams are never cut
            # (max_stream_seconds bounds them).
            options.append(("grpc.max_connection_age_ms", int(max_age * 1000)))
        self._server = grpc.aio.server(options=options)
        # Unparseable requests reach the service as MalformedRequest (INVALID_ARGUMENT).
        add_speech_service(self.service, self._server)
        add_google_service(GoogleSpeechService(self.service), self._server)
        add_riva_service(RivaSpeechService(self.service), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                GOOGLE_SERVICE_NAME,
                RIVA_SERVICE_NAME,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.security.tls:
            self.certificates = ReloadingCertificates(self.security)
            self.port = self._server.add_secure_port(
                self.options.address, self.certificates.server_credentials()
            )
        else:
            self.port = self._server.add_insecure_port(self.options.address)
        if self.port == 0:
            raise RuntimeError(f"could not listen on {self.options.address}")
        if self.security.health_address:
            await self._start_health_listener(self.security.health_address)
        await self._server.start()
        logger.info(
            "listening on %s (%s; health NOT_SERVING until the model is warm)",
            self.address,
            self._describe_security(),
        )
        return self.port

    async def _start_health_listener(self, address: str) -> None:
        """Plaintext grpc.health.v1 only, from the same servicer: the probes' view of the
        server is the main port's, without TLS or credentials."""
        self._health_server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 64 << 10), ("grpc.so_reuseport", 0)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self.health_port = self._health_server.add_insecure_port(address)
        if self.health_port == 0:
            raise RuntimeError(f"could not listen on {address} (--health-address)")
        await self._health_server.start()
        logger.info(
            "health-only plaintext listener on %s", address.rsplit(":", 1)[0] + f":{self.health_port}"
        )

    def _describe_security(self) -> str:
        security = self.security
        if not security.tls:
            parts = ["plaintext"]
        elif security.tls_client_ca:
            parts = ["TLS, client certificates required (mTLS)"]
        else:
            parts = ["TLS"]
        if security.auth_tokens_file:
            parts.append("bearer tokens required")
        elif security.tls_client_ca:
            parts.append("client certificate identities")
        return ", ".join(parts)

    @property
    def address(self) -> str:
        host = self.options.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def load(self) -> SpeechModel:
        """Loads and warms the model off the event loop, then reports SERVING (unless a drain
        began meanwhile)."""
        started = time.perf_counter()

        def load_and_warm() -> SpeechModel:
            load_vad_model()
            model = SpeechModel(self.model_options, self.options.decode)
            model.warm_up()
            return model

        model = await asyncio.to_thread(load_and_warm)
        if self.service.draining:
            # SIGTERM came while loading, which cannot be interrupted. No stream was admitted,
            # so the drain had nothing to wait for: nothing may start serving, or claim to, now.
            logger.info("model %s loaded after shutdown began; not serving", model.name)
            return model
        self.model = model
        self.telemetry.model_loaded(model.name, time.perf_counter() - started)
        self._scheduler = InferenceScheduler(
            model, self.model_options.workers, self.options.decode.max_interim_wait
        )
        self._scheduler.start()
        self.service.attach(model, self._scheduler)
        if self.options.memory_release_seconds > 0 and can_release_memory():
            self._memory_release = asyncio.create_task(
                release_periodically(self.options.memory_release_seconds)
            )
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "ready: serving %s on %s (%s, %s, %d workers x %d threads) in %.1f s",
            model.name,
            self.address,
            model.device,
            self.model_options.compute_type,
            self.model_options.workers,
            self.model_options.cpu_threads,
            time.perf_counter() - started,
        )
        return model

    async def drain_and_stop(self) -> None:
        """NOT_SERVING, refuse new streams, let open ones finish (up to drain_seconds),
        then finalise the rest and stop: within drain_seconds + FINALS_GRACE_SECONDS + 1 s.
        Decodes still running then are not waited for (``serve`` bounds the exit)."""
        if self.service.draining:
            return
        self.service.draining = True
        await self.health.enter_graceful_shutdown()
        logger.info(
            "draining: health NOT_SERVING, %d open streams, %d Recognize calls",
            len(self.service.sessions),
            self.service.recognizing,
        )
        await self._sessions_end_within(self.options.drain_seconds)
        for session in list(self.service.sessions):
            session.stop()
        # Stopped sessions still decode and deliver the finals of what they received, for a
        # short grace; whatever is still open then ends with a status the client can act on.
        await self._sessions_end_within(FINALS_GRACE_SECONDS)
        for session in list(self.service.sessions):
            session.abort(
                SttError(
                    grpc.StatusCode.UNAVAILABLE,
                    "STT_SERVER_SHUTTING_DOWN",
                    "the server shut down before this stream's last finals were decoded; "
                    "retry the rest on another instance",
                )
            )
        await self._sessions_end_within(0.5)
        # Both listeners at once: each stop waits up to its grace for the calls still open.
        await asyncio.gather(
            *(server.stop(grace=0.5) for server in (self._server, self._health_server) if server is not None)
        )
        if self._memory_release is not None:
            self._memory_release.cancel()
        if self._scheduler is not None:
            await self._scheduler.stop()
        if self.model is not None:
            self.telemetry.model_unloaded(self.model.name)
        logger.info("stopped")
        self._stopped.set()

    async def _sessions_end_within(self, seconds: float) -> None:
        """Waits up to ``seconds`` for the open streams, and the Recognize calls, which cannot be
        stopped early but whose responses are owed as a stream's finals are."""
        deadline = time.monotonic() + seconds
        while self.service.active_calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _cannot_listen(address: str) -> str | None:
    """Why ``address`` (HOST:PORT) cannot be listened on, found by binding it as gRPC would;
    None when it can be, or when this cannot tell (then gRPC finds out).

    gRPC core writes its own raw line to stderr (``E... add_port.cc:83] Failed to add port``)
    when a bind fails, whatever Python does after, and reads ``GRPC_VERBOSITY`` only once, at
    start: the one way to a single clear line is not to let its bind fail."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None  # port 0 always binds
    try:
        resolved = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError):
        return None
    problems = []
    for family, kind, proto, _, sockaddr in resolved:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC's listener: SO_REUSEADDR on, SO_REUSEPORT off (grpc.so_reuseport 0).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                problems.append((exc.strerror or str(exc)).lower())
                continue
        return None  # gRPC listens when any resolved address binds
    return problems[0] if problems else None


def _listen_problem(options: ServerOptions, security: SecurityOptions | None) -> str | None:
    """``ADDRESS: why`` for the first listen address that cannot be bound, before gRPC tries.
    Should another process take a port after this, gRPC's own line comes first after all."""
    listeners = [(options.address, options.address)]
    if security is not None and security.health_address:
        listeners.append((security.health_address, f"{security.health_address} (--health-address)"))
    for address, named in listeners:
        reason = _cannot_listen(address)
        if reason:
            return f"{named}: {reason}"
    return None


async def serve(
    options: ServerOptions,
    model_options: ModelOptions,
    telemetry: Telemetry,
    security: SecurityOptions | None = None,
) -> None:
    """Runs a server until SIGTERM or SIGINT, then drains, flushes telemetry and exits."""
    server = SttServer(options, model_options, telemetry, security)
    logger.info(telemetry.describe())
    problem = _listen_problem(options, security)
    try:
        if problem is None:
            await server.start()
    except RuntimeError as exc:  # the port was taken since, or the address is not ours
        problem = f"{options.address}: {' '.join(str(exc).split())}"
    if problem:
        logger.error("cannot listen on %s", problem)
        await asyncio.to_thread(telemetry.shutdown)
        raise SystemExit(1) from None
    loop = asyncio.get_running_loop()
    deadline = ExitDeadline()

    def shut_down() -> None:
        deadline.start(options.drain_seconds + EXIT_AFTER_DRAIN_SECONDS)
        asyncio.ensure_future(server.drain_and_stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shut_down)
    try:
        await server.load()
    except Exception as exc:
        # One line for the operator; the traceback only at DEBUG.
        logger.error("model %s failed to load: %s; exiting", model_options.model, " ".join(str(exc).split()))
        logger.debug("model load failure", exc_info=True)
        await server.drain_and_stop()
        await asyncio.to_thread(telemetry.shutdown)
        raise SystemExit(1) from None
    await server.wait_stopped()
    # Everything recorded before SIGTERM, the drained streams included, leaves now, in the
    # time the exit deadline leaves.
    await asyncio.to_thread(telemetry.shutdown, deadline.remaining(5.0, EXIT_RESERVE_SECONDS))
    deadline.exit_now()


class ExitDeadline:
    """The hard bound on shutdown: the process ends at the deadline, whatever is running.

    A decode running when the drain ends cannot be interrupted, and Python waits for it at
    exit (the inference pool's threads, and ``asyncio.run`` for ``to_thread`` work such as a
    Recognize call's segmentation); on a busy machine that, the interpreter's own teardown
    (over a second) and the telemetry flush held the exit up to 13.9 s after SIGTERM with
    --drain-seconds 1. Everything owed to clients is sent by then, so the rest is abandoned:
    once drained and flushed the process ends at once, and a timer ends it at the deadline if
    it gets stuck before.
    """

    def __init__(self) -> None:
        self._at: float | None = None

    def start(self, seconds: float) -> None:
        """Ends the process ``seconds`` from now unless it exits before; once."""
        if self._at is not None:
            return
        self._at = time.monotonic() + seconds
        timer = threading.Timer(seconds, self._expire)
        timer.daemon = True  # does not hold an exit that comes sooner
        timer.start()

    def remaining(self, most: float, reserve: float = 0.0) -> float:
        """Up to ``most`` seconds, less whatever would run into the last ``reserve`` seconds."""
        if self._at is None:
            return most
        return max(0.0, min(most, self._at - time.monotonic() - reserve))

    def _expire(self) -> None:
        logger.warning("exit deadline reached before the shutdown finished; exiting now")
        self.exit_now()

    @staticmethod
    def exit_now() -> None:
        """Ends the process with status 0, without the interpreter's teardown. The console log
        handlers flush every record; not logging.shutdown(), whose OpenTelemetry handler would
        wait up to 30 s on an unreachable collector."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(0)
