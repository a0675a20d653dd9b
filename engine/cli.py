"""The ``stt-engine`` command: serve, transcribe, demo, info."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from .client import SpeechClient, StreamConfig, read_token, wait_finished
from .flags import CLIENT_FLAGS, SECURITY_FLAGS, SERVE_FLAGS, SERVER_FLAGS, Flag, add_flags, option_fields
from .options import ModelOptions, ServerOptions
from .security import SecurityOptions

SAMPLE = Path(__file__).parent / "samples" / "jfk.wav"


def _server_options(args: argparse.Namespace) -> tuple[ServerOptions, ModelOptions]:
    defaults = ServerOptions()
    server = dataclasses.replace(
        defaults,
        default_streaming=dataclasses.replace(
            defaults.default_streaming, **option_fields(args, "streaming", SERVER_FLAGS)
        ),
        decode=dataclasses.replace(defaults.decode, **option_fields(args, "decode", SERVER_FLAGS)),
        **option_fields(args, "server", SERVER_FLAGS),
    )
    return server, ModelOptions(**option_fields(args, "model", SERVER_FLAGS))


def _security_options(args: argparse.Namespace) -> SecurityOptions:
    return SecurityOptions(**option_fields(args, "security", SECURITY_FLAGS))


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
    overrides = {**option_fields(args, "telemetry", SERVER_FLAGS), "enabled": enabled}
    if args.telemetry_console:
        overrides.update(traces_exporter="console", metrics_exporter="console", logs_exporter="console")
    options = TelemetryOptions.from_env(**overrides)
    telemetry = Telemetry(options, __version__)
    configure_logging(options.log_level, options.log_format, telemetry.logger_provider)
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
    chunk_ms = Flag("--chunk-ms", "audio per message", kind=int, low=10, high=10000)
    parser.add_argument("--chunk-ms", type=chunk_ms.argparse_type(), default=100)


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
    add_flags(serve, SERVE_FLAGS)
    serve.set_defaults(func=cmd_serve)

    transcribe = commands.add_parser("transcribe", help="stream an audio file to a server")
    transcribe.add_argument("file")
    add_flags(transcribe, CLIENT_FLAGS)
    _add_transcribe_arguments(transcribe)
    transcribe.set_defaults(func=cmd_transcribe)

    demo = commands.add_parser("demo", help="start a server here and stream a sample through it")
    demo.add_argument("file", nargs="?", help="audio file (default: the bundled JFK sample)")
    add_flags(demo, SERVER_FLAGS)
    _add_transcribe_arguments(demo)
    demo.set_defaults(func=cmd_demo, address="127.0.0.1:0", log_level="WARNING")

    info = commands.add_parser("info", help="print the server's model and limits")
    add_flags(info, CLIENT_FLAGS)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
