"""Every flag of the ``stt-engine`` server and client commands, declared once.

A ``Flag`` gives a flag's name, type, range or choices, default, help and the options field it
feeds. From these declarations alone come the argparse options, the reading of each flag's
``STT_*`` environment variable (validated exactly as the flag is, so a bad variable is a usage
error naming the flag), the option dataclasses of ``stt-engine serve``, and, in the tests, the
README flag table check and the range tests of every numeric flag.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from otel.options import LOG_LEVELS, parse_log_level

from .client import parse_target

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def _plain(number: float) -> str:
    """A bound as a user writes it: 16777216, not 1.67772e+07; 0.1, not 0.100000."""
    return str(int(number)) if float(number).is_integer() else str(number)


def listen_address(text: str) -> str:
    """``HOST:PORT`` with a port from 0 to 65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (port 0-65535)")
    return text


def server_target(text: str) -> str:
    """A client target (``HOST:PORT``, ``IP:PORT,IP:PORT`` or ``dns:///NAME:PORT``)."""
    parse_target(text)  # its ValueError says what is wrong
    return text


def identities(text: str | None) -> frozenset[str]:
    """A comma-separated list of identities; none (every identity allowed) when empty."""
    return frozenset(name.strip() for name in (text or "").split(",") if name.strip())


class FromEnvironment(str):
    """A flag's default read from its variable: its parse errors name the variable too."""

    variable: str

    def __new__(cls, value: str, variable: str) -> FromEnvironment:
        text = super().__new__(cls, value)
        text.variable = variable
        return text


class _Switch(argparse.Action):
    """``store_true`` that takes a ``type``: argparse converts a string default (the
    variable's value) with it, as it does for every other flag."""

    def __init__(self, option_strings, dest, default=None, type=None, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, type=type, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, True)


@dataclass(frozen=True)
class Flag:
    """One command-line flag and its ``STT_*`` environment variable.

    Attributes:
        name: the flag, ``--max-streams``; the variable is ``STT_`` + its name in capitals.
        help: what it does, for ``--help``.
        default: the default as a user would write it; None: unset.
        kind: ``str``, ``int``, ``float`` or ``bool`` (a switch: given, it is true; its variable
            takes 1/0, true/false, yes/no or on/off).
        low, high: the range of an ``int`` or ``float`` (``high`` None: no upper bound).
        choices: the values a ``str`` flag may take.
        check: validates (and may normalise) a ``str`` value; raises ValueError saying why not.
        feeds: the option field the value goes to, ``<group>.<field>``; groups: ``model``,
            ``server``, ``streaming``, ``decode``, ``security``, ``telemetry``. None: the
            command reads it itself.
        convert: turns the parsed value into that field's value (default: as parsed).
        unset: what an unset flag means, as the README's default column says it.
    """

    name: str
    help: str
    default: str | None = None
    kind: type = str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[str], Any] | None = None
    feeds: str | None = None
    convert: Callable[[Any], Any] | None = None
    unset: str = "none"

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    @property
    def variable(self) -> str:
        return "STT_" + self.dest.upper()

    @property
    def numeric(self) -> bool:
        return self.kind in (int, float)

    def parse(self, text: str) -> Any:
        """The flag's value from ``text``; ValueError saying why it is not one."""
        if self.kind is bool:
            word = text.strip().lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(f"{text!r} is not true or false (1/0, true/false, yes/no, on/off)")
            return word in TRUE_WORDS
        if text == "" and self.default is None:
            return None  # an empty variable (or flag) leaves an optional flag unset
        if self.numeric:
            return self._number(text)
        if self.choices and text not in self.choices:
            raise ValueError(f"{text!r} is not one of {', '.join(self.choices)}")
        return self.check(text) if self.check else text

    def _number(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}") from None
        if value < self.low or (self.high is not None and value > self.high):
            raise ValueError(f"{text} is out of range: must be {self.bounds}")
        return value

    @property
    def bounds(self) -> str:
        """A numeric flag's range in words."""
        if self.high is None:
            return f"at least {_plain(self.low)}"
        return f"from {_plain(self.low)} to {_plain(self.high)}"

    def option_value(self, value: Any) -> Any:
        """What the parsed ``value`` sets the ``feeds`` field to."""
        return self.convert(value) if self.convert else value

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """The argparse option, its default read from the variable when that is set."""
        from_env = os.environ.get(self.variable)
        default = self.default if from_env is None else FromEnvironment(from_env, self.variable)
        bounds = f"{self.bounds}; " if self.numeric else ""
        described = f"{self.help} ({bounds}env {self.variable}; default {self.default or self.unset})"
        if self.kind is bool:
            parser.add_argument(
                self.name, action=_Switch, type=self.argparse_type(), default=default, help=described
            )
            return
        metavar = "{" + ",".join(self.choices) + "}" if self.choices else None
        parser.add_argument(
            self.name, type=self.argparse_type(), default=default, metavar=metavar, help=described
        )

    def argparse_type(self) -> Callable[[str], Any]:
        """The flag's ``parse`` as an argparse type, for the flag and its variable alike."""

        def parse(text: str) -> Any:
            try:
                return self.parse(text)
            except ValueError as exc:
                source = f" (from {text.variable})" if isinstance(text, FromEnvironment) else ""
                raise argparse.ArgumentTypeError(f"{exc}{source}") from None

        parse.__name__ = self.kind.__name__  # argparse names the type in its own messages
        return parse


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> None:
    for flag in flags:
        flag.add_to(parser)


def option_fields(args: argparse.Namespace, group: str, flags: Sequence[Flag]) -> dict[str, Any]:
    """The fields of one options group set by the parsed flags, ``{field: value}``."""
    fields = {}
    for flag in flags:
        if flag.feeds and flag.feeds.split(".")[0] == group and hasattr(args, flag.dest):
            fields[flag.feeds.split(".", 1)[1]] = flag.option_value(getattr(args, flag.dest))
    return fields


def _ms(name: str, help: str, default: str, low: int, high: int, field: str) -> Flag:
    return Flag(name, help, default, int, low, high, feeds=f"streaming.{field}")


def _seconds(name: str, help: str, default: str, low: float, high: float | None, field: str) -> Flag:
    return Flag(name, help, default, float, low, high, feeds=f"server.{field}")


# One flag a few lines, as a table: the formatter would spread each over a dozen.
# fmt: off

# stt-engine serve (and demo): the model, limits and streaming defaults.
SERVER_FLAGS: tuple[Flag, ...] = (
    Flag("--address", "listen address (port 0 picks a free port)", "0.0.0.0:50051",
         check=listen_address, feeds="server.address"),
    Flag("--model", "tiny.en (bundled), a faster-whisper model name or a CTranslate2 model directory",
         "tiny.en", feeds="model.model"),
    Flag("--device", "cpu, cuda or auto", "cpu", feeds="model.device"),
    Flag("--compute-type", "CTranslate2 compute type (int8, float16...)", "int8", feeds="model.compute_type"),
    Flag("--threads", "CPU threads per inference worker", "1", int, 1, 64, feeds="model.cpu_threads"),
    Flag("--workers", "inference calls run in parallel", "2", int, 1, 64, feeds="model.workers"),
    Flag("--batch-size", "most queued decodes of the same kind and encoder length one model call runs "
         "together (1: off)", "1", int, 1, 64, feeds="model.batch_size"),
    Flag("--warmup-runs", "warm-up decode rounds before reporting SERVING", "1", int, 0, 100,
         feeds="model.warmup_runs"),
    Flag("--max-streams", "concurrent streams; more get RESOURCE_EXHAUSTED", "32", int, 1, 100000,
         feeds="server.max_concurrent_streams"),
    _seconds("--max-stream-seconds", "audio one stream may send", "3600", 1, None, "max_stream_seconds"),
    Flag("--max-chunk-bytes", "audio bytes per message", "1048576", int, 1024, 16 << 20,
         feeds="server.max_chunk_bytes"),
    Flag("--max-recognize-bytes", "largest Recognize request; also gRPC's receive limit for every message",
         str(16 << 20), int, 1024, 256 << 20, feeds="server.max_recognize_bytes"),
    _seconds("--max-recognize-seconds", "longest audio one Recognize call takes", "300", 1, 3600,
             "max_recognize_seconds"),
    _seconds("--config-timeout-seconds", "a stream must send its config within this long", "10", 0.1, 600,
             "config_timeout_seconds"),
    _seconds("--idle-timeout-seconds",
             "a stream that sends no audio for this long ends (OUT_OF_RANGE STT_AUDIO_TIMEOUT; less "
             "than half real time counts as none)", "15", 0.1,
             3600, "idle_timeout_seconds"),
    _seconds("--max-backlog-seconds",
             "undecoded audio of ended utterances per stream before the server stops reading it", "60", 5,
             3600, "max_backlog_seconds"),
    _seconds("--drain-seconds", "grace for open streams on SIGTERM", "30", 0, 3600, "drain_seconds"),
    _seconds("--max-connection-age-seconds",
             "close client connections this old gracefully (GOAWAY; open streams finish), so clients "
             "balancing over DNS find new servers (0: never)", "0", 0, None, "max_connection_age_seconds"),
    Flag("--stream-window-bytes",
         "what one call's client may send before the server reads it (HTTP/2 stream window; 0: "
         "gRPC's bandwidth-delay tuning)", str(4 << 20), int, 0, 1 << 30, feeds="server.stream_window_bytes"),
    _seconds("--memory-release-seconds",
             "return freed heap memory to the OS this often (glibc malloc_trim; 0: never)", "10", 0, None,
             "memory_release_seconds"),
    _ms("--silence-ms", "default endpoint silence", "700", 100, 5000, "silence_duration_ms"),
    _ms("--speculative-final-ms",
        "start the final decode after this much silence, before the endpoint (0: off)", "250", 0, 5000,
        "speculative_final_ms"),
    Flag("--early-finals",
         "a final decoded in a pause that ends a sentence and agrees with the interims: ends the "
         "utterance at once (confident), that and cuts continuing speech at the pause (sentence), "
         "or waits for the endpoint (off)", "sentence", choices=("sentence", "confident", "off"),
         feeds="streaming.early_finals"),
    _ms("--interim-interval-ms", "default interim cadence", "1000", 200, 10000, "interim_interval_ms"),
    _ms("--interim-window-ms",
        "most audio an interim decodes; older agreed words become its prompt (0: whole utterance)", "4000",
        0, 28000, "interim_window_ms"),
    _ms("--long-interim-interval-ms",
        "interims this far apart once an utterance outgrows the interim window "
        "(0: --interim-interval-ms throughout)", "1500", 0, 10000, "long_interim_interval_ms"),
    _ms("--short-utterance-ms",
        "an utterance with less speech than this ends after 1.5 s of silence, not the endpoint "
        "silence, so a slow speaker's single words are decoded together (0: off)", "1000", 0, 10000,
        "short_utterance_ms"),
    _ms("--long-utterance-ms",
        "an utterance this long ends at a 300 ms pause, not the endpoint silence, so continuous "
        "speech is cut between phrases; costs accuracy (0: off)", "0", 0, 60000, "long_utterance_ms"),
    _ms("--vad-refresh-ms",
        "reset the VAD's fresh state, which scores beside the carried one, after this much "
        "non-speech (0: carried state only)", "1000", 0, 60000, "vad_refresh_ms"),
    Flag("--fallback",
         "when a final is decoded again by sampling: on a low log-prob or a loop, as Whisper does "
         "(whisper), or only on a loop (loops)", "loops", choices=("whisper", "loops"),
         feeds="decode.fallback_on_low_logprob", convert=lambda value: value == "whisper"),
    Flag("--final-padding-ms",
         "silence appended after a final's audio for the encoder; more keeps Whisper from stopping "
         "before the end of long utterances, and costs decode time", "10000", int, 0, 29000,
         feeds="decode.final_padding_frames", convert=lambda ms: ms // 10),
    Flag("--log-level", f"console log level: {', '.join(LOG_LEVELS)}", "INFO", check=parse_log_level,
         feeds="telemetry.log_level"),
    Flag("--log-format", "console log format", "text", choices=("text", "json"),
         feeds="telemetry.log_format"),
    Flag("--metrics-port", "serve Prometheus metrics on this port", None, int, 0, 65535,
         feeds="telemetry.metrics_port"),
    Flag("--telemetry-console", "print spans, metrics and logs to the console instead of OTLP", "false",
         bool),
    Flag("--trace-chunks", "which audio chunks get a span", "all", choices=("all", "speech", "none"),
         feeds="telemetry.chunk_spans"),
)

# stt-engine serve: transport security and authentication.
SECURITY_FLAGS: tuple[Flag, ...] = (
    Flag("--tls-cert", "PEM server certificate chain; with --tls-key the server speaks TLS, and reloads "
         "both when the files change", feeds="security.tls_cert"),
    Flag("--tls-key", "PEM private key", feeds="security.tls_key"),
    Flag("--tls-client-ca", "PEM CA bundle: clients must present a certificate it signed (mTLS)",
         feeds="security.tls_client_ca"),
    Flag("--auth-tokens-file", "lines of `identity sha256-hex-of-token`: Speech calls need "
         "`authorization: Bearer <token>`", feeds="security.auth_tokens_file"),
    Flag("--auth-allowed-identities", "comma-separated identities allowed to call; others get "
         "PERMISSION_DENIED", feeds="security.allowed_identities", convert=identities, unset="all"),
    Flag("--max-streams-per-identity", "concurrent streams and Recognize calls one authenticated "
         "identity may hold (0: no limit)",
         "0", int, 0, 100000, feeds="security.max_streams_per_identity"),
    Flag("--health-address", "also serve grpc.health.v1 alone, in plaintext, here (for probes that cannot "
         "speak TLS)", check=listen_address, feeds="security.health_address"),
)

# stt-engine transcribe and info: where the server is and how to reach it.
CLIENT_FLAGS: tuple[Flag, ...] = (
    Flag("--server", "HOST:PORT; or several servers, each stream going to the next one that reports "
         "SERVING (round_robin): IP:PORT,IP:PORT,... or dns:///NAME:PORT for every address NAME "
         "resolves to, such as a headless Kubernetes Service", "localhost:50051", check=server_target),
    Flag("--tls", "connect with TLS, trusting the system roots unless --tls-ca", "false", bool),
    Flag("--tls-ca", "PEM CA to trust; implies --tls"),
    Flag("--tls-client-cert", "PEM client certificate for mTLS"),
    Flag("--tls-client-key", "its private key"),
    Flag("--tls-server-name", "name to verify in the server certificate instead of the host"),
    Flag("--token", "bearer token (prefer the variable or --token-file: arguments are visible in ps)"),
    Flag("--token-file", "file holding the bearer token"),
)

# fmt: on

SERVE_FLAGS: tuple[Flag, ...] = SERVER_FLAGS + SECURITY_FLAGS
