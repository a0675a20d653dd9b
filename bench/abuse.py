"""Abuse benchmark: health, a good stream's finals and server memory while each attack runs.

Every run gets a fresh server, started from ``--server-repo`` (so the same script measures two
checkouts) with default limits or the flags its attack names. A good client streams the
long-form (the clips of ../shared/audio joined with 1.5 s pauses, 56 s) at real-time pace, once
alone and then once beside each attack. The attack runs in its own process, so it shares no GIL
with the good stream or the health watcher; it starts 2 s before the good stream and stops 5 s
after the good stream's audio ends (its last final is due by then); finals still missing 30 s
later are given up, so every run is bounded. Reported per run: health's answer time, max and
p95 (checked every 100 ms); the good stream's final latency after its last word (p50/p95/max)
and WER; the server's peak RSS (VmHWM); its log's ERROR lines and longest line; the 1-minute
load average; and what the attack achieved.

    python bench/abuse.py                                      # every attack, this checkout
    python bench/abuse.py --attacks keepalive drain            # some of them
    git worktree add ../before 5ad5fac                         # the engine before issue 25
    python bench/abuse.py --attacks issue25 --server-repo ../before --label before
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.streaming import (  # noqa: E402
    StreamRecord,
    cpu_seconds,
    long_form,
    percentile,
    run_stream,
    score,
    start_server,
)
from engine.api import SERVICE_NAME, stt_pb2, stt_pb2_grpc  # noqa: E402
from engine.audio import float_to_linear16  # noqa: E402
from engine.client import SpeechClient  # noqa: E402

GOOD_IDENTITY = "carol"  # the good stream's identity where the server requires tokens


@dataclass(frozen=True)
class Setting:
    """What an attack process knows of the server it attacks."""

    target: str
    server_pid: int
    audio_dir: Path
    tokens: dict[str, str]  # identity -> bearer token (the server checks them where the attack asks)


@dataclass(frozen=True)
class Attack:
    """``run`` goes on until ``stop`` is set and returns its figures; ``effect`` summarises them."""

    run: Callable[[Setting, threading.Event], dict]
    server_args: tuple[str, ...] = ()
    tokens: bool = False  # serve with --auth-tokens-file; the good stream sends carol's token


# --- helpers ------------------------------------------------------------------------------------


def _config(encoding: int = stt_pb2.LINEAR16, sample_rate_hertz: int = 16000, **fields):
    config = stt_pb2.RecognitionConfig(encoding=encoding, sample_rate_hertz=sample_rate_hertz, **fields)
    return stt_pb2.StreamingRecognizeRequest(
        streaming_config=stt_pb2.StreamingRecognitionConfig(config=config, interim_results=True)
    )


def _audio(data: bytes) -> stt_pb2.StreamingRecognizeRequest:
    return stt_pb2.StreamingRecognizeRequest(audio_content=data)


def _bearer(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token else None


def _call(target: str, requests, stop: threading.Event, token: str | None = None) -> str:
    """One stream, read to its end or cancelled at ``stop``; its status code's name (errors are
    the point of most attacks)."""
    with SpeechClient(target, token=token, retries=False) as client:
        call = client.stream(requests, timeout=600)
        done = threading.Event()

        def cancel_at_stop() -> None:
            while not done.is_set():
                if stop.wait(0.25):
                    call.cancel()
                    return

        threading.Thread(target=cancel_at_stop, daemon=True).start()
        try:
            for _ in call:
                pass
            return "OK"
        except grpc.RpcError as error:
            return error.code().name
        finally:
            done.set()


def _unary(method, request: bytes, stop: threading.Event, metadata=None, timeout: float = 120) -> str:
    """One unary call of serialized ``request`` on a raw method, cancelled at ``stop``."""
    future = method.future(request, metadata=metadata, timeout=timeout)
    while not future.done():
        if stop.wait(0.1):
            future.cancel()
    try:
        future.result()
        return "OK"
    except grpc.FutureCancelledError:
        return "CANCELLED"
    except grpc.RpcError as error:
        return error.code().name


def _raw_channel(target: str) -> grpc.Channel:
    """A channel whose methods take and return bytes (no serializers), with room for 16 MB."""
    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])


def _raw_recognize(channel: grpc.Channel):
    return channel.unary_unary(f"/{SERVICE_NAME}/Recognize")


def _recognize_request(pcm: bytes) -> bytes:
    return stt_pb2.RecognizeRequest(
        config=stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, sample_rate_hertz=16000),
        audio_content=pcm,
    ).SerializeToString()


def _speech(setting: Setting, seconds: float) -> bytes:
    """The long-form looped to ``seconds``, as LINEAR16."""
    audio, _ = long_form(setting.audio_dir, 1.5, 0)
    return float_to_linear16(np.resize(audio, int(seconds * 16000)))


def _in_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _codes(counter: Counter) -> str:
    return ", ".join(f"{code} {n}" for code, n in counter.most_common())


# --- issue 10's attacks -------------------------------------------------------------------------


def huge_prompt(setting: Setting, stop: threading.Event) -> dict:
    """20 MB prompts, one stream after another."""
    prompt = "hot words " * 2_000_000
    codes = Counter()
    while not stop.is_set():
        codes[_call(setting.target, [_config(prompt=prompt), _audio(b"\0" * 3200)], stop)] += 1
    return {"codes": dict(codes), "effect": _codes(codes)}


def long_recognize(setting: Setting, stop: threading.Event) -> dict:
    """2.3 h of MULAW in one Recognize, then 280 s of speech-like noise, in a loop."""
    mulaw = stt_pb2.RecognizeRequest(
        config=stt_pb2.RecognitionConfig(encoding=stt_pb2.MULAW, sample_rate_hertz=8000),
        audio_content=b"\x7f" * (8000 * 8280),
    ).SerializeToString()
    noise = (0.01 * np.random.default_rng(0).standard_normal(16000 * 280)).astype(np.float32)
    long_pcm = _recognize_request(float_to_linear16(noise))
    codes = Counter()
    with _raw_channel(setting.target) as channel:
        recognize = _raw_recognize(channel)
        while not stop.is_set():
            for request in (mulaw, long_pcm):
                codes[_unary(recognize, request, stop)] += 1
    return {"codes": dict(codes), "effect": _codes(codes)}


def idle(setting: Setting, stop: threading.Event) -> dict:
    """4 connections that never send a byte, reopened as they time out."""
    codes = Counter()

    def nothing() -> Iterator:
        stop.wait()
        yield from ()

    def one(_: int) -> None:
        while not stop.is_set():
            codes[_call(setting.target, nothing(), stop)] += 1

    _in_threads(4, one)
    return {"codes": dict(codes), "effect": _codes(codes)}


def flood(setting: Setting, stop: threading.Event) -> dict:
    """3 clients sending 30 minutes of speech as fast as the server reads."""
    data = _speech(setting, 1800)

    def requests() -> Iterator:
        yield _config()
        for i in range(0, len(data), 3200):
            if stop.is_set():
                return
            yield _audio(data[i : i + 3200])

    _in_threads(3, lambda _: _call(setting.target, requests(), stop))
    return {"effect": "-"}


def long_strings(setting: Setting, stop: threading.Event) -> dict:
    """10 MB of NULs as the model name and 100 KB language codes, repeated."""
    codes = Counter()
    while not stop.is_set():
        codes[_call(setting.target, [_config(model="\0" * 10_000_000)], stop)] += 1
        codes[_call(setting.target, [_config(language_code="x" * 100_000)], stop)] += 1
    return {"codes": dict(codes), "effect": _codes(codes)}


# --- issue 25's attacks -------------------------------------------------------------------------

CHUNK_BYTES = 1 << 20  # the default --max-chunk-bytes: the largest chunk a stream may send


def _big_chunks(setting: Setting, stop: threading.Event, encoding: int, rate: int, chunk: bytes) -> dict:
    """Two clients sending 1 MiB chunks of near-silence as fast as the server reads them: the
    server converts, resamples and scores the VAD of every one. Silence, so no utterance's
    backlog ever stops the reading. A stream ended by --max-stream-seconds is reopened."""
    sent = [0, 0]
    codes = Counter()

    def requests(client: int) -> Iterator:
        yield _config(encoding=encoding, sample_rate_hertz=rate)
        while not stop.is_set():
            sent[client] += 1
            yield _audio(chunk)

    def client(index: int) -> None:
        while not stop.is_set():
            codes[_call(setting.target, requests(index), stop)] += 1

    _in_threads(2, client)
    bytes_per_second = rate * (1 if encoding == stt_pb2.MULAW else 2)
    audio_seconds = sum(sent) * len(chunk) / bytes_per_second
    return {
        "chunks_sent": sum(sent),
        "audio_sent_s": audio_seconds,
        "codes": dict(codes),
        "effect": f"{sum(sent)} chunks sent ({audio_seconds / 3600:.1f} h of audio)",
    }


def mulaw_chunks(setting: Setting, stop: threading.Event) -> dict:
    """1 MiB MULAW chunks at 8 kHz (131 s of audio each) from two clients (issue 25, item 1)."""
    # The smallest MULAW amplitudes around zero: near-silence.
    chunk = np.random.default_rng(1).choice([0xFF, 0xFE, 0xFD, 0x7F, 0x7E, 0x7D], CHUNK_BYTES)
    return _big_chunks(setting, stop, stt_pb2.MULAW, 8000, chunk.astype(np.uint8).tobytes())


def linear16_chunks(setting: Setting, stop: threading.Event) -> dict:
    """1 MiB LINEAR16 chunks at 16 kHz (32.8 s each) from two clients (item 1)."""
    chunk = np.random.default_rng(1).integers(-30, 30, CHUNK_BYTES // 2).astype("<i2").tobytes()
    return _big_chunks(setting, stop, stt_pb2.LINEAR16, 16000, chunk)


KEEPALIVE_STREAMS = 3  # with the good stream, every slot of --max-streams 4


def keepalive(setting: Setting, stop: threading.Event) -> dict:
    """Three streams that, once configured, send only an empty (or a 2-byte) audio_content every
    2 s, under --max-streams 4 --idle-timeout-seconds 3 (item 2). With the good stream they fill
    every slot; a probe stream every 10 s shows whether a newcomer gets one."""
    started = time.monotonic()
    ended: dict[int, tuple[float, str]] = {}
    probes: list[str] = []

    def keepalives(payload: bytes) -> Iterator:
        yield _config()
        while not stop.wait(2.0):
            yield _audio(payload)

    def hold(index: int) -> None:
        code = _call(setting.target, keepalives(b"" if index % 2 == 0 else b"\0\0"), stop)
        if not stop.is_set():  # the server ended it
            ended[index] = (time.monotonic() - started, code)

    holders = [threading.Thread(target=hold, args=(i,), daemon=True) for i in range(KEEPALIVE_STREAMS)]
    for holder in holders:
        holder.start()
    while not stop.wait(10.0):
        probes.append(_call(setting.target, [_config(), *[_audio(b"\0" * 3200)] * 5], stop))
    for holder in holders:
        holder.join(10)
    still_open = KEEPALIVE_STREAMS - len(ended)
    endings = Counter(code for _, code in ended.values())
    return {
        "open_at_end": still_open,
        "ended": {str(i): {"after_s": round(at, 1), "code": code} for i, (at, code) in ended.items()},
        "probes": probes,
        "effect": f"{still_open}/{KEEPALIVE_STREAMS} keepalive streams open at the end"
        + (
            f", the others ended {_codes(endings)} after {max(at for at, _ in ended.values()):.1f} s"
            if ended
            else ""
        )
        + f"; probes: {_codes(Counter(probes))}",
    }


def _unparseable(message_type, good: bytes, seeds=range(1000)) -> bytes:
    """Random bytes that ``message_type`` fails to parse (random bytes often parse as unknown fields)."""
    for seed in seeds:
        data = np.random.default_rng(seed).bytes(len(good) or 64)
        try:
            message_type.FromString(data)
        except Exception:  # DecodeError: what the server's deserializer meets
            return data
    raise AssertionError("no unparseable bytes found")


def _bad_utf8(message) -> bytes:
    """``message`` serialized with its QQQQ language code replaced by invalid UTF-8."""
    data = message.SerializeToString().replace(b"QQQQ", b"\xff\xfe\xfd\xfc")
    try:
        type(message).FromString(data)
    except Exception:
        return data
    raise AssertionError("the invalid UTF-8 parsed")


def malformed(setting: Setting, stop: threading.Event) -> dict:
    """Requests whose bytes are no valid message (random bytes, invalid UTF-8 in a string field),
    sent with raw calls, from two clients, 20 calls a second each; the status codes they get
    (item 3). The server log's ERROR lines are counted for every run."""
    config_bytes = _config().SerializeToString()
    audio_bytes = _audio(b"\0" * 3200).SerializeToString()
    bad_config = stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, language_code="QQQQ")
    cases: dict[str, tuple[str, list[bytes] | bytes]] = {
        "Recognize random bytes": (
            "unary",
            _unparseable(stt_pb2.RecognizeRequest, _recognize_request(b"\0" * 64)),
        ),
        "Recognize bad UTF-8": (
            "unary",
            _bad_utf8(stt_pb2.RecognizeRequest(config=bad_config, audio_content=b"\0" * 64)),
        ),
        "stream random bytes first": (
            "stream",
            [_unparseable(stt_pb2.StreamingRecognizeRequest, config_bytes)],
        ),
        "stream bad UTF-8 config": (
            "stream",
            [
                _bad_utf8(
                    stt_pb2.StreamingRecognizeRequest(
                        streaming_config=stt_pb2.StreamingRecognitionConfig(config=bad_config)
                    )
                )
            ],
        ),
        "stream random bytes after audio": (
            "stream",
            [config_bytes, audio_bytes, _unparseable(stt_pb2.StreamingRecognizeRequest, audio_bytes)],
        ),
    }
    codes: Counter = Counter()
    by_case: dict[str, Counter] = {name: Counter() for name in cases}

    def client(_: int) -> None:
        with _raw_channel(setting.target) as channel:
            recognize = _raw_recognize(channel)
            stream = channel.stream_stream(f"/{SERVICE_NAME}/StreamingRecognize")
            while not stop.is_set():
                for name, (kind, payload) in cases.items():
                    if kind == "unary":
                        code = _unary(recognize, payload, stop, timeout=10)
                    else:
                        try:
                            for _ in stream(iter(payload), timeout=10):
                                pass
                            code = "OK"
                        except grpc.RpcError as error:
                            code = error.code().name
                    if stop.is_set():
                        return  # cut short by the end of the run, not answered by the server
                    codes[code] += 1
                    by_case[name][code] += 1
                    stop.wait(0.05)

    _in_threads(2, client)
    return {
        "codes": dict(codes),
        "by_case": {name: dict(c) for name, c in by_case.items()},
        "effect": f"{sum(codes.values())} calls: {_codes(codes)}",
    }


IDENTITY_LIMIT_ARGS = ("--max-streams", "4", "--max-streams-per-identity", "1")


def identity_slots(setting: Setting, stop: threading.Event) -> dict:
    """Under --max-streams 4 --max-streams-per-identity 1, alice keeps three 290 s Recognize
    calls in flight (with the good stream, carol's: every slot) and bob tries a 2 s Recognize
    every 8 s (item 4)."""
    long_request = _recognize_request(_speech(setting, 290))
    short_request = _recognize_request(_speech(setting, 2))
    alice: Counter = Counter()
    bob: list[str] = []

    def alice_call(_: int) -> None:
        with _raw_channel(setting.target) as channel:
            recognize = _raw_recognize(channel)
            while not stop.is_set():
                code = _unary(recognize, long_request, stop, metadata=_bearer(setting.tokens["alice"]))
                alice[code] += 1
                if code != "OK":
                    stop.wait(1.0)  # refused: try again soon, not in a tight loop

    threads = [threading.Thread(target=alice_call, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    with _raw_channel(setting.target) as channel:
        recognize = _raw_recognize(channel)
        while not stop.wait(8.0):
            bob.append(_unary(recognize, short_request, stop, metadata=_bearer(setting.tokens["bob"])))
    for thread in threads:
        thread.join(10)
    return {
        "alice": dict(alice),
        "bob": bob,
        "effect": f"alice (3 calls at a time): {_codes(alice)}; bob: {_codes(Counter(bob))}",
    }


def cancelled_recognize(setting: Setting, stop: threading.Event) -> dict:
    """48 Recognize calls of 299 s of speech, each cancelled 1.5 s after it is sent, from 8
    threads; then the server's CPU-seconds in the 5 s after the last cancel (item 5)."""
    request = _recognize_request(_speech(setting, 299))
    codes: Counter = Counter()

    def client(_: int) -> None:
        with _raw_channel(setting.target) as channel:
            recognize = _raw_recognize(channel)
            for _ in range(6):
                if stop.is_set():
                    return
                future = recognize.future(request, timeout=120)
                stop.wait(1.5)
                future.cancel()
                try:
                    future.result()
                    codes["OK"] += 1
                except grpc.FutureCancelledError:
                    codes["CANCELLED"] += 1
                except grpc.RpcError as error:
                    codes[error.code().name] += 1

    _in_threads(8, client)
    cpu_at_last_cancel = cpu_seconds(setting.server_pid)
    stop.wait(5.0)
    burned = cpu_seconds(setting.server_pid) - cpu_at_last_cancel
    return {
        "codes": dict(codes),
        "cpu_s_in_5s_after_last_cancel": burned,
        "effect": f"{sum(codes.values())} calls ({_codes(codes)}); "
        f"{burned:.1f} CPU-s in the 5 s after the last cancel",
    }


LARGE_REQUEST_BYTES = 16_000_000


def _refused_large(setting: Setting, stop: threading.Event) -> dict:
    """400 Recognize calls of 16 MB, 25 from each of 16 threads, each on its own connection."""
    request = _recognize_request(b"\x11" * LARGE_REQUEST_BYTES)
    codes: Counter = Counter()

    def client(_: int) -> None:
        with _raw_channel(setting.target) as channel:
            recognize = _raw_recognize(channel)
            for _ in range(25):
                if stop.is_set():
                    return
                codes[_unary(recognize, request, stop, timeout=60)] += 1

    _in_threads(16, client)
    return {"codes": dict(codes), "effect": f"{sum(codes.values())} calls: {_codes(codes)}"}


def refused_unauthenticated(setting: Setting, stop: threading.Event) -> dict:
    """400 16 MB Recognize calls without a token, to a server that requires one (item 6)."""
    return _refused_large(setting, stop)


def refused_capacity(setting: Setting, stop: threading.Event) -> dict:
    """400 16 MB Recognize calls while the good stream holds the only slot of --max-streams 1
    (item 6); they start once it is admitted."""
    with SpeechClient(setting.target) as client:
        deadline = time.monotonic() + 15
        while client.server_info().active_streams < 1 and time.monotonic() < deadline:
            stop.wait(0.1)
    return _refused_large(setting, stop)


def tracestate(setting: Setting, stop: threading.Event) -> dict:
    """GetServerInfo with a valid traceparent and an 8 KB malformed tracestate, twice a second
    (item 7); the table's log column has the server log's longest line."""
    metadata = [
        ("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-01"),
        ("tracestate", "bad key=" + "x" * 8184),
    ]
    codes: Counter = Counter()
    with grpc.insecure_channel(setting.target) as channel:
        speech = stt_pb2_grpc.SpeechStub(channel)
        while not stop.wait(0.5):
            try:
                speech.GetServerInfo(stt_pb2.GetServerInfoRequest(), metadata=metadata, timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
    return {"codes": dict(codes), "effect": f"{sum(codes.values())} calls: {_codes(codes)}"}


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


DRAIN_AFTER_SECONDS = 25.0


def drain(setting: Setting, stop: threading.Event) -> dict:
    """Three clients each send 120 s of speech at once and half-close (finals pending), a new
    stream as one ends; 25 s in, SIGTERM to a server with --drain-seconds 1: the seconds until
    it exits (issue 25's drain deadline). Health after the signal is not counted."""
    data = _speech(setting, 120)
    requests = [_config(), *[_audio(data[i : i + 32000]) for i in range(0, len(data), 32000)]]
    terminated = threading.Event()
    codes: Counter = Counter()

    def flooder(_: int) -> None:
        while not (stop.is_set() or terminated.is_set()):
            codes[_call(setting.target, requests, stop)] += 1

    threads = [threading.Thread(target=flooder, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    if stop.wait(DRAIN_AFTER_SECONDS):
        return {"effect": "stopped before the signal"}
    signalled_at = time.monotonic()
    os.kill(setting.server_pid, signal.SIGTERM)
    terminated.set()
    while _running(setting.server_pid) and time.monotonic() - signalled_at < 120:
        time.sleep(0.05)
    exit_seconds = time.monotonic() - signalled_at
    for thread in threads:
        thread.join(10)
    return {
        "sigterm_at": signalled_at,
        "exit_s": exit_seconds,
        "codes": dict(codes),
        "effect": f"exited {exit_seconds:.1f} s after SIGTERM (--drain-seconds 1)",
    }


ATTACKS: dict[str, Attack] = {
    "huge_prompt": Attack(huge_prompt),
    "long_recognize": Attack(long_recognize),
    "idle": Attack(idle),
    "flood": Attack(flood),
    "long_strings": Attack(long_strings),
    "mulaw_chunks": Attack(mulaw_chunks),
    "linear16_chunks": Attack(linear16_chunks),
    "keepalive": Attack(keepalive, ("--max-streams", "4", "--idle-timeout-seconds", "3")),
    "malformed": Attack(malformed),
    "identity_slots": Attack(identity_slots, IDENTITY_LIMIT_ARGS, tokens=True),
    "cancelled_recognize": Attack(cancelled_recognize),
    "refused_unauthenticated": Attack(refused_unauthenticated, tokens=True),
    "refused_capacity": Attack(refused_capacity, ("--max-streams", "1")),
    "tracestate": Attack(tracestate),
    "drain": Attack(drain, ("--drain-seconds", "1")),
}
GROUPS = {
    "issue10": ["huge_prompt", "long_recognize", "idle", "flood", "long_strings"],
    "issue25": [
        "mulaw_chunks",
        "linear16_chunks",
        "keepalive",
        "malformed",
        "identity_slots",
        "cancelled_recognize",
        "refused_unauthenticated",
        "refused_capacity",
        "tracestate",
        "drain",
    ],
}


def _attack_process(name: str, setting: Setting, stop, results) -> None:
    """The attack, in a process of its own; its figures go back through ``results``."""
    # Attacks wait on a thread event, set from a shared flag that is polled: a process that
    # ends while waiting on a multiprocessing Event leaves the parent's set() waiting for it.
    local_stop = threading.Event()

    def relay_stop() -> None:
        while not stop.value:
            time.sleep(0.05)
        local_stop.set()

    threading.Thread(target=relay_stop, daemon=True).start()
    try:
        outcome = ATTACKS[name].run(setting, local_stop)
    except Exception as exc:  # reported in the table, not lost with the process
        outcome = {"effect": f"attack failed: {exc!r}"}
    results.put(outcome)


# --- the run ------------------------------------------------------------------------------------


@dataclass
class HealthWatch:
    """Checks health every 100 ms; keeps every answer's (time sent, seconds taken, status)."""

    target: str
    samples: list[tuple[float, float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with SpeechClient(self.target) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    status = client.health(timeout=30)
                except grpc.RpcError as error:
                    status = error.code().name
                self.samples.append((sent, time.monotonic() - sent, status))
                self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the kernel's record of the process's largest RSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


ERROR_LINE = re.compile(r" ERROR [\w.]+: ")


def log_figures(path: Path) -> dict:
    lines = path.read_text(errors="replace").splitlines()
    return {
        "log_error_lines": sum(bool(ERROR_LINE.search(line)) for line in lines),
        "log_tracebacks": sum(line.startswith("Traceback") for line in lines),
        "log_longest_line": max((len(line) for line in lines), default=0),
    }


def write_tokens(directory: Path) -> tuple[Path, dict[str, str]]:
    """A tokens file (``identity sha256-hex``, engine/security.py) for alice, bob and carol."""
    tokens = {name: secrets.token_urlsafe(24) for name in ("alice", "bob", GOOD_IDENTITY)}
    path = directory / "tokens"
    path.write_text(
        "".join(f"{name} {hashlib.sha256(t.encode()).hexdigest()}\n" for name, t in tokens.items())
    )
    return path, tokens


ATTACK_AFTER_AUDIO_S = 5.0
FINALS_WAIT_S = 30.0


def _cpu_rate(server, cpu_before: float, started: float) -> float | None:
    """The server's CPU-seconds per second since ``started`` (None once it has exited)."""
    if server.poll() is not None:
        return None
    return (cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - started)


def run_one(name: str, port: int, args, audio, segments, tokens_file: Path, tokens: dict, logs: Path) -> dict:
    """A fresh server, the attack (none for ``none``) and the good stream beside it."""
    attack = ATTACKS.get(name)
    server_args = list(attack.server_args) if attack else []
    if attack and attack.tokens:
        server_args += ["--auth-tokens-file", str(tokens_file)]
    target = f"127.0.0.1:{port}"
    log = logs / f"{name}.log"
    server = start_server(
        target, *server_args, env={"OTEL_SDK_DISABLED": "true"}, repo=args.server_repo, log=log
    )
    load_before = os.getloadavg()[0]
    spawn = multiprocessing.get_context("spawn")  # gRPC does not survive fork
    stop, results = spawn.Value("b", 0, lock=False), spawn.Queue()
    process = None
    try:
        watch = HealthWatch(target)
        cpu_before, started = cpu_seconds(server.pid), time.monotonic()
        if attack:
            setting = Setting(target, server.pid, args.audio_dir, tokens)
            process = spawn.Process(target=_attack_process, args=(name, setting, stop, results), daemon=True)
            process.start()
            time.sleep(2)  # the attack is under way before the good stream starts
        record, cancel_good = StreamRecord(), threading.Event()
        token = tokens[GOOD_IDENTITY] if attack and attack.tokens else None
        good = threading.Thread(target=run_stream, args=(target, audio, record, True, token, cancel_good))
        good_started = time.monotonic()
        good.start()
        # The attack goes on until the good stream's last final is due (its audio's end and
        # ATTACK_AFTER_AUDIO_S); its finals are waited for FINALS_WAIT_S more, so a run is bounded.
        attack_ends = good_started + len(audio) / 16000 + ATTACK_AFTER_AUDIO_S
        peak = peak_rss_mb(server.pid) or 0.0
        while good.is_alive() and time.monotonic() < attack_ends + FINALS_WAIT_S:
            peak = max(peak, peak_rss_mb(server.pid) or 0.0)
            if time.monotonic() > attack_ends and not stop.value:
                stop.value = 1
                cpu_rate = _cpu_rate(server, cpu_before, started)
            good.join(0.2)
        if not stop.value:
            stop.value = 1
            cpu_rate = _cpu_rate(server, cpu_before, started)
        cancel_good.set()
        good.join(10)
        outcome = results.get(timeout=150) if process else {"effect": "-"}
        peak = max(peak, peak_rss_mb(server.pid) or 0.0)
        watch.stop()
    finally:
        stop.value = 1
        if process:
            process.join(10)
            if process.is_alive():
                process.kill()
        server.terminate()
        server.wait(timeout=90)
    load_after = os.getloadavg()[0]
    cutoff = outcome.get("sigterm_at", float("inf"))  # health after SIGTERM is meant to change
    answers = [taken for sent, taken, _ in watch.samples if sent < cutoff]
    health_failures = Counter(
        status for sent, _, status in watch.samples if sent < cutoff and status != "SERVING"
    )
    result = score([record], [segments])
    latencies = [f.arrival - f.last_word_end for f in record.finals if f.last_word_end is not None]
    return {
        "attack": name,
        "server_args": server_args,
        "load_1min": [load_before, load_after],
        "health_max_s": max(answers, default=None),
        "health_p95_s": percentile(answers, 95),
        "health_failures": dict(health_failures),
        "word_latency_p50": result["word_latency_p50"],
        "word_latency_p95": result["word_latency_p95"],
        "word_latency_max": max(latencies, default=None),
        "wer": result["wer"],
        "good_stream_error": record.error,
        "rss_peak_mb": peak,
        "server_cpu_per_s": cpu_rate,
        **log_figures(log),
        **outcome,
    }


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| attack | load 1 min | health max / p95 (s) | good final after last word p50 / p95 / max (s) "
        "| WER % | RSS peak (MB) | log ERROR lines / longest (chars) | effect |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        failures = f" ({_codes(Counter(row['health_failures']))})" if row["health_failures"] else ""
        good_error = ""
        if row["good_stream_error"]:
            cut = "CANCELLED" in row["good_stream_error"]
            good_error = (
                f" (finals missing {FINALS_WAIT_S:.0f} s after the attack)" if cut else " (ended in error)"
            )
        lines.append(
            f"| {row['attack']} | {row['load_1min'][0]:.1f} | {fmt(row['health_max_s'])} / "
            f"{fmt(row['health_p95_s'])}{failures} | {fmt(row['word_latency_p50'])} / "
            f"{fmt(row['word_latency_p95'])} / {fmt(row['word_latency_max'])}{good_error} | "
            f"{fmt(100 * row['wer'] if row['wer'] is not None else None)} | {row['rss_peak_mb']:.0f} | "
            f"{row['log_error_lines']} / {row['log_longest_line']} | {row['effect']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--attacks",
        nargs="+",
        choices=[*ATTACKS, *GROUPS],
        default=list(ATTACKS),
        help="attacks or groups of them (issue10, issue25); every run starts with one alone (none)",
    )
    parser.add_argument(
        "--server-repo",
        type=Path,
        default=REPO,
        help="the checkout whose server is measured (default: this one), e.g. an unfixed worktree",
    )
    parser.add_argument(
        "--label", default=None, help="names the results file (default: --server-repo's name)"
    )
    parser.add_argument("--port", type=int, default=50290, help="first port; each run takes the next")
    args = parser.parse_args()
    names = [n for a in args.attacks for n in GROUPS.get(a, [a])]
    label = args.label or args.server_repo.resolve().name
    audio, segments = long_form(args.audio_dir, 1.5, 0)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / f"abuse-{label}-logs"
    logs.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tokens_file, tokens = write_tokens(Path(scratch))
        for index, name in enumerate(["none", *names]):
            row = run_one(name, args.port + index, args, audio, segments, tokens_file, tokens, logs)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / f"abuse-{label}.json").write_text(json.dumps(rows, indent=2))
    print(f"\nserver: {args.server_repo.resolve()}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
