"""The ``stt-engine`` command: serve, transcribe, demo, info."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import grpc
from google.protobuf import json_format

from otel import ClientTelemetry, Telemetry, TelemetryOptions, configure_logging

from . import __version__
from .api import stt_pb2
from .audio import read_audio_file
from .client import SpeechClient, StreamConfig, parse_target, read_token, wait_finished
from .options import ModelOptions, ServerOptions, env_default, env_flag
from .security import SecurityOptions

SAMPLE = Path(__file__).parent / "samples" / "jfk.wav"


def _server_options(args: argparse.Namespace) -> tuple[ServerOptions, ModelOptions]:
    import dataclasses

    defaults = ServerOptions()
    streaming = dataclasses.replace(
        defaults.default_streaming,
        silence_duration_ms=args.silence_ms,
        interim_interval_ms=args.interim_interval_ms,
        interim_window_ms=args.interim_window_ms,
        speculative_final_ms=args.speculative_final_ms,
        vad_refresh_ms=args.vad_refresh_ms,
        short_utterance_ms=args.short_utterance_ms,
        long_utterance_ms=args.long_utterance_ms,
        long_interim_interval_ms=args.long_interim_interval_ms,
    )
    decode = dataclasses.replace(defaults.decode, fallback_on_low_logprob=args.fallback == "whisper")
    server = ServerOptions(
        address=args.address,
        max_concurrent_streams=args.max_streams,
        max_stream_seconds=args.max_stream_seconds,
        max_chunk_bytes=args.max_chunk_bytes,
        max_recognize_seconds=args.max_recognize_seconds,
        max_recognize_bytes=args.max_recognize_bytes,
        config_timeout_seconds=args.config_timeout_seconds,
        idle_timeout_seconds=args.idle_timeout_seconds,
        max_backlog_seconds=args.max_backlog_seconds,
        drain_seconds=args.drain_seconds,
        default_streaming=streaming,
        decode=decode,
        memory_release_seconds=args.memory_release_seconds,
        max_connection_age_seconds=args.max_connection_age_seconds,
    )
    model = ModelOptions(
        model=args.model,
        device=args.device,
        compute_type=args.compute_type,
        cpu_threads=args.threads,
        workers=args.workers,
        warmup_runs=args.warmup_runs,
    )
    return server, model


def _number(kind: type, low: float, high: float | None = None):
    """An argparse type: a ``kind`` (int or float) from ``low`` to ``high``. Defaults from
    ``STT_*`` variables are strings and pass through it too, so a bad variable is a usage
    error naming the flag, not a traceback."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low:g}" if high is None else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bounds}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (port 0-65535)")
    return text


def _target(text: str) -> str:
    try:
        parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    e = env_default
    parser.add_argument(
        "--address",
        type=_address,
        default=e("address", "0.0.0.0:50051"),
        help="listen address (env STT_ADDRESS; port 0 picks a free port)",
    )
    parser.add_argument(
        "--model",
        default=e("model", "tiny.en"),
        help="tiny.en (bundled), a faster-whisper model name or a CTranslate2 "
        "model directory (env STT_MODEL)",
    )
    parser.add_argument("--device", default=e("device", "cpu"), help="cpu, cuda or auto")
    parser.add_argument("--compute-type", default=e("compute_type", "int8"))
    parser.add_argument(
        "--threads",
        type=_number(int, 1, 64),
        default=e("threads", "1"),
        help="CPU threads per inference worker",
    )
    parser.add_argument(
        "--workers",
        type=_number(int, 1, 64),
        default=e("workers", "2"),
        help="inference calls run in parallel",
    )
    parser.add_argument(
        "--warmup-runs",
        type=_number(int, 0, 100),
        default=e("warmup_runs", "1"),
        help="warm-up decode rounds before reporting SERVING",
    )
    parser.add_argument("--max-streams", type=_number(int, 1, 100000), default=e("max_streams", "32"))
    parser.add_argument(
        "--max-stream-seconds", type=_number(float, 1), default=e("max_stream_seconds", "3600")
    )
    parser.add_argument(
        "--max-chunk-bytes", type=_number(int, 1024, 16 << 20), default=e("max_chunk_bytes", "1048576")
    )
    parser.add_argument(
        "--max-recognize-bytes",
        type=_number(int, 1024, 256 << 20),
        default=e("max_recognize_bytes", str(16 << 20)),
        help="largest Recognize request; also gRPC's receive limit for every message",
    )
    parser.add_argument(
        "--max-recognize-seconds",
        type=_number(float, 1, 3600),
        default=e("max_recognize_seconds", "300"),
        help="longest audio one Recognize call takes",
    )
    parser.add_argument(
        "--config-timeout-seconds",
        type=_number(float, 0.1, 600),
        default=e("config_timeout_seconds", "10"),
        help="a stream must send its config within this long",
    )
    parser.add_argument(
        "--idle-timeout-seconds",
        type=_number(float, 0.1, 3600),
        default=e("idle_timeout_seconds", "15"),
        help="a stream that sends nothing for this long ends (OUT_OF_RANGE STT_AUDIO_TIMEOUT)",
    )
    parser.add_argument(
        "--max-backlog-seconds",
        type=_number(float, 5, 3600),
        default=e("max_backlog_seconds", "60"),
        help="undecoded audio of ended utterances per stream before the server stops reading it",
    )
    parser.add_argument("--drain-seconds", type=_number(float, 0, 3600), default=e("drain_seconds", "30"))
    parser.add_argument(
        "--max-connection-age-seconds",
        type=_number(float, 0),
        default=e("max_connection_age_seconds", "0"),
        help="close client connections this old gracefully (GOAWAY; open streams finish), so "
        "clients balancing over DNS find new servers (0: never)",
    )
    parser.add_argument(
        "--memory-release-seconds",
        type=_number(float, 0),
        default=e("memory_release_seconds", "10"),
        help="return freed heap memory to the OS this often (glibc malloc_trim; 0: never)",
    )
    parser.add_argument(
        "--silence-ms",
        type=_number(int, 100, 5000),
        default=e("silence_ms", "700"),
        help="default endpoint silence",
    )
    parser.add_argument(
        "--speculative-final-ms",
        type=_number(int, 0, 5000),
        default=e("speculative_final_ms", "400"),
        help="start the final decode after this much silence, before the endpoint (0: off)",
    )
    parser.add_argument(
        "--interim-interval-ms", type=_number(int, 200, 10000), default=e("interim_interval_ms", "1000")
    )
    parser.add_argument(
        "--interim-window-ms",
        type=_number(int, 0, 28000),
        default=e("interim_window_ms", "4000"),
        help="most audio an interim decodes; older agreed words become its prompt (0: whole utterance)",
    )
    parser.add_argument(
        "--long-interim-interval-ms",
        type=_number(int, 0, 10000),
        default=e("long_interim_interval_ms", "1500"),
        help="interims this far apart once an utterance outgrows the interim window "
        "(0: --interim-interval-ms throughout)",
    )
    parser.add_argument(
        "--short-utterance-ms",
        type=_number(int, 0, 10000),
        default=e("short_utterance_ms", "1000"),
        help="an utterance with less speech than this ends after 1.5 s of silence, not the "
        "endpoint silence, so a slow speaker's single words are decoded together (0: off)",
    )
    parser.add_argument(
        "--long-utterance-ms",
        type=_number(int, 0, 60000),
        default=e("long_utterance_ms", "0"),
        help="an utterance this long ends at a 300 ms pause, not the endpoint silence, so "
        "continuous speech is cut between phrases; costs accuracy (0: off)",
    )
    parser.add_argument(
        "--vad-refresh-ms",
        type=_number(int, 0, 60000),
        default=e("vad_refresh_ms", "1000"),
        help="reset the VAD's fresh state, which scores beside the carried one, after this much "
        "non-speech (0: carried state only)",
    )
    parser.add_argument(
        "--fallback",
        choices=("whisper", "loops"),
        default=e("fallback", "loops"),
        help="when a final is decoded again by sampling: on a low log-prob or a loop, as Whisper "
        "does (whisper), or only on a loop (loops)",
    )
    parser.add_argument("--log-level", default=e("log_level", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=e("log_format", "text"),
        help="console log format (env STT_LOG_FORMAT)",
    )
    metrics_port = e("metrics_port", "")
    parser.add_argument(
        "--metrics-port",
        type=_number(int, 0, 65535),
        default=metrics_port or None,
        help="serve Prometheus metrics on this port (env STT_METRICS_PORT)",
    )
    parser.add_argument(
        "--telemetry-console",
        action="store_true",
        default=env_flag("telemetry_console"),
        help="print spans, metrics and logs to the console instead of OTLP (env STT_TELEMETRY_CONSOLE)",
    )
    parser.add_argument(
        "--trace-chunks",
        choices=("all", "speech", "none"),
        default=e("trace_chunks", "all"),
        help="which audio chunks get a span (env STT_TRACE_CHUNKS)",
    )


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    e = env_default
    parser.add_argument(
        "--tls-cert",
        default=e("tls_cert", None),
        help="PEM server certificate chain; with --tls-key the server speaks TLS, and reloads both "
        "when the files change (env STT_TLS_CERT)",
    )
    parser.add_argument("--tls-key", default=e("tls_key", None), help="PEM private key (env STT_TLS_KEY)")
    parser.add_argument(
        "--tls-client-ca",
        default=e("tls_client_ca", None),
        help="PEM CA bundle: clients must present a certificate it signed (mTLS) (env STT_TLS_CLIENT_CA)",
    )
    parser.add_argument(
        "--auth-tokens-file",
        default=e("auth_tokens_file", None),
        help="lines of `identity sha256-hex-of-token`: Speech calls need `authorization: Bearer "
        "<token>` (env STT_AUTH_TOKENS_FILE)",
    )
    parser.add_argument(
        "--auth-allowed-identities",
        default=e("auth_allowed_identities", ""),
        help="comma-separated identities allowed to call; others get PERMISSION_DENIED "
        "(env STT_AUTH_ALLOWED_IDENTITIES)",
    )
    parser.add_argument(
        "--max-streams-per-identity",
        type=int,
        default=int(e("max_streams_per_identity", "0")),
        help="concurrent streams one authenticated identity may hold (0: no limit)",
    )
    parser.add_argument(
        "--health-address",
        default=e("health_address", None),
        help="also serve grpc.health.v1 alone, in plaintext, here (for probes that cannot speak TLS) "
        "(env STT_HEALTH_ADDRESS)",
    )


def _security_options(args: argparse.Namespace) -> SecurityOptions:
    allowed = frozenset(name.strip() for name in args.auth_allowed_identities.split(",") if name.strip())
    return SecurityOptions(
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
        tls_client_ca=args.tls_client_ca or None,
        auth_tokens_file=args.auth_tokens_file or None,
        allowed_identities=allowed,
        max_streams_per_identity=args.max_streams_per_identity,
        health_address=args.health_address or None,
    )


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    e = env_default
    parser.add_argument(
        "--server",
        type=_target,
        default=e("server", "localhost:50051"),
        help="HOST:PORT; or several servers, each stream going to the next one that reports "
        "SERVING (round_robin): IP:PORT,IP:PORT,... or dns:///NAME:PORT for every address NAME "
        "resolves to, such as a headless Kubernetes Service (env STT_SERVER)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=env_flag("tls"),
        help="connect with TLS, trusting the system roots unless --tls-ca (env STT_TLS)",
    )
    parser.add_argument("--tls-ca", default=e("tls_ca", None), help="PEM CA to trust; implies --tls")
    parser.add_argument(
        "--tls-client-cert", default=e("tls_client_cert", None), help="PEM client certificate for mTLS"
    )
    parser.add_argument("--tls-client-key", default=e("tls_client_key", None), help="its private key")
    parser.add_argument(
        "--tls-server-name", default=None, help="name to verify in the server certificate instead of the host"
    )
    parser.add_argument(
        "--token",
        default=e("token", None),
        help="bearer token (env STT_TOKEN; prefer it or --token-file: arguments are visible in ps)",
    )
    parser.add_argument("--token-file", default=e("token_file", None), help="file holding the bearer token")


def _client(args: argparse.Namespace, target: str, tracer_provider=None) -> SpeechClient:
    """A client with the security options of the command line (none for the demo)."""
    option = lambda name: getattr(args, name, None)  # noqa: E731 - the demo has no client flags
    return SpeechClient(
        target,
        tls=bool(option("tls")),
        ca_file=option("tls_ca"),
        cert_file=option("tls_client_cert"),
        key_file=option("tls_client_key"),
        server_name=option("tls_server_name"),
        token=read_token(option("token"), option("token_file")),
        tracer_provider=tracer_provider,
    )


def _telemetry(args: argparse.Namespace, enabled: bool | None = None) -> Telemetry:
    """Telemetry from the OTEL_* environment and the flags; logging set up to match."""
    overrides = {"metrics_port": args.metrics_port, "chunk_spans": args.trace_chunks, "enabled": enabled}
    if args.telemetry_console:
        overrides.update(traces_exporter="console", metrics_exporter="console", logs_exporter="console")
    options = TelemetryOptions.from_env(**overrides)
    telemetry = Telemetry(options, __version__)
    configure_logging(args.log_level, args.log_format, telemetry.logger_provider)
    return telemetry


def model_problem(model: str) -> str | None:
    """Why ``--model`` cannot be loaded, found before anything starts; None if it may be."""
    from faster_whisper.utils import available_models

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model.bin").is_file():
            return f"--model {model}: not a CTranslate2 model directory (it has no model.bin)"
        return None
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        return f"--model {model}: no such directory"
    if "/" in model:
        return None  # a Hugging Face repo id, downloaded when the server loads it
    if model not in available_models():
        return f"--model {model}: unknown model name; use a path or one of {', '.join(available_models())}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    problem = model_problem(args.model)
    security = _security_options(args)
    try:
        security.validate()
    except ValueError as exc:
        problem = problem or str(exc)
    if problem:
        print(f"stt-engine serve: error: {problem}", file=sys.stderr)
        return 2
    telemetry = _telemetry(args)
    server, model = _server_options(args)
    asyncio.run(serve(server, model, telemetry, security))
    return 0


class _Printer:
    """Prints interim lines that update in place and final lines as they come."""

    def __init__(self, fmt: str, out=sys.stdout) -> None:
        self.fmt = fmt
        self.out = out
        self.tty = out.isatty()
        self._interim_width = 0

    def response(self, response: stt_pb2.StreamingRecognizeResponse) -> None:
        if self.fmt == "jsonl":
            self.out.write(json.dumps(response_json(response)) + "\n")
            self.out.flush()
            return
        if not response.HasField("result") or not response.result.alternatives:
            return
        result = response.result
        text = result.alternatives[0].transcript
        if result.is_final:
            self._clear()
            start = result.result_start_offset.ToTimedelta().total_seconds()
            end = result.result_end_offset.ToTimedelta().total_seconds()
            self.out.write(f"[{start:6.2f} - {end:6.2f}] {text}\n")
        elif self.tty:
            self._clear()
            line = f"  ... {text}"[:200]
            self.out.write(line)
            self._interim_width = len(line)
        else:
            self.out.write(f"  ... {text}\n")
        self.out.flush()

    def _clear(self) -> None:
        if self.tty and self._interim_width:
            self.out.write("\r" + " " * self._interim_width + "\r")
            self._interim_width = 0


def response_json(response: stt_pb2.StreamingRecognizeResponse) -> dict:
    """One response as a flat JSON object, for scripts."""
    if response.HasField("speech_event"):
        event = response.speech_event
        return {
            "type": "speech_event",
            "event": stt_pb2.SpeechEvent.Type.Name(event.type),
            "offset": event.offset.ToTimedelta().total_seconds(),
            "utterance_index": event.utterance_index,
        }
    result = response.result
    best = result.alternatives[0] if result.alternatives else stt_pb2.SpeechRecognitionAlternative()
    data = {
        "type": "result",
        "is_final": result.is_final,
        "utterance_index": result.utterance_index,
        "transcript": best.transcript,
        "confidence": round(best.confidence, 4),
        "stability": round(result.stability, 4),
        "start": result.result_start_offset.ToTimedelta().total_seconds(),
        "end": result.result_end_offset.ToTimedelta().total_seconds(),
    }
    if best.words:
        data["words"] = [json_format.MessageToDict(w, preserving_proto_field_name=True) for w in best.words]
    if len(result.alternatives) > 1:
        data["alternatives"] = [a.transcript for a in result.alternatives[1:]]
    return data


def transcribe_file(path: str, server: str, args: argparse.Namespace) -> int:
    audio = read_audio_file(path)
    config = StreamConfig(
        language_code=args.language,
        interim_results=not args.no_interim,
        enable_word_time_offsets=args.words,
        prompt=args.prompt,
    )
    printer = _Printer(args.format)
    # The command's own CLIENT span (service.name=stt-engine-cli) when OTEL_* configures an
    # exporter: the server's span is then its child, in the trace whose id is printed.
    tracing = ClientTelemetry.from_env(__version__)
    try:
        with _client(args, server, tracing.tracer_provider) as client:
            call = client.stream_audio(audio, config, chunk_ms=args.chunk_ms, realtime=not args.fast)
            try:
                trace_id = dict(call.initial_metadata()).get("x-trace-id")
                if trace_id:
                    print(f"trace id: {trace_id}", file=sys.stderr, flush=True)
                for response in call:
                    printer.response(response)
            except grpc.RpcError as error:
                print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
                return 1
            finally:
                wait_finished(call)  # the client span has ended before it is exported
    finally:
        tracing.shutdown()
    return 0


def _add_transcribe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", action="store_true", help="send as fast as possible")
    parser.add_argument("--format", choices=("text", "jsonl"), default="text")
    parser.add_argument("--language", default="en")
    parser.add_argument("--prompt", default="", help="hot words / context")
    parser.add_argument("--words", action="store_true", help="word time offsets")
    parser.add_argument("--no-interim", action="store_true")
    parser.add_argument("--chunk-ms", type=_number(int, 10, 10000), default=100)


def cmd_transcribe(args: argparse.Namespace) -> int:
    return transcribe_file(args.file, args.server, args)


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args, args.server) as client:
        try:
            info = client.server_info()
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json_format.MessageToJson(info, preserving_proto_field_name=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Starts a server in this process, streams the bundled sample through gRPC."""
    from .server import SttServer

    # The demo exports telemetry only where a collector is configured.
    telemetry = _telemetry(args, enabled=True if "OTEL_EXPORTER_OTLP_ENDPOINT" in os.environ else False)
    server_options, model_options = _server_options(args)
    loop = asyncio.new_event_loop()
    server = SttServer(server_options, model_options, telemetry)
    ready = threading.Event()
    failure: list[BaseException] = []

    async def run() -> None:
        try:
            await server.start()
            await server.load()
        except BaseException as exc:  # reported on the main thread
            failure.append(exc)
            ready.set()
            return
        ready.set()
        await server.wait_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    target = f"127.0.0.1:{server.port}"
    path = args.file or str(SAMPLE)
    print(f"Streaming {path} to {target} in real time (100 ms chunks)...", flush=True)
    started = time.monotonic()
    code = transcribe_file(path, target, args)
    print(f"done in {time.monotonic() - started:.1f} s", flush=True)
    asyncio.run_coroutine_threadsafe(server.drain_and_stop(), loop).result(timeout=60)
    thread.join(timeout=10)
    telemetry.shutdown()
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stt-engine", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    _add_server_arguments(serve)
    _add_security_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    transcribe = commands.add_parser("transcribe", help="stream an audio file to a server")
    transcribe.add_argument("file")
    _add_client_arguments(transcribe)
    _add_transcribe_arguments(transcribe)
    transcribe.set_defaults(func=cmd_transcribe)

    demo = commands.add_parser("demo", help="start a server here and stream a sample through it")
    demo.add_argument("file", nargs="?", help="audio file (default: the bundled JFK sample)")
    _add_server_arguments(demo)
    _add_transcribe_arguments(demo)
    demo.set_defaults(func=cmd_demo, address="127.0.0.1:0", log_level="WARNING")

    info = commands.add_parser("info", help="print the server's model and limits")
    _add_client_arguments(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
