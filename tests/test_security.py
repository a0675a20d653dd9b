"""Transport security and authentication with real certificates, real handshakes and real
third-party clients (grpcurl, grpc_health_probe).

Two servers, one per scenario, each started once for the module:
- ``tls_server``: TLS, bearer tokens (alice, bob, carol; only alice and bob allowed), one
  stream per identity, a plaintext health-only port, OTLP export to a real receiver;
- ``mtls_server``: mTLS, no tokens: the client certificate's name is the identity (alice allowed).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_status import rpc_status

from engine.api import stt_pb2
from engine.audio import read_audio_file
from engine.client import SpeechClient, StreamConfig, final_transcripts
from engine.errors import error_reason
from tests.helpers import (
    JFK_TEXT,
    REPO,
    SAMPLE,
    ProbeExit,
    ServerProcess,
    assert_retry_after,
    free_port,
    health_probe,
    tool,
    wait_until,
    wer,
)
from tests.otlp_receiver import OtlpReceiver
from tests.pki import Pki, issue_server

TOKENS = {name: secrets.token_urlsafe(24) for name in ("alice", "bob", "carol")}
INFO = "stt.v1.Speech/GetServerInfo"


# --- servers ----------------------------------------------------------------------------------------


def wait_serving(server: ServerProcess, client: SpeechClient, timeout: float = 120) -> None:
    def serving() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            return client.health(timeout=1) == "SERVING"
        except grpc.RpcError:
            return False

    with client:
        wait_until(serving, timeout, what=f"{server.target} to report SERVING")


def stopped(server: ServerProcess) -> None:
    code = server.stop()
    assert code == 0, server.log()[-3000:]


@dataclass
class TlsServer:
    process: ServerProcess
    pki: Pki
    health_target: str
    receiver: OtlpReceiver

    @property
    def target(self) -> str:
        return self.process.target

    def client(self, token: str | None = None, **options) -> SpeechClient:
        return SpeechClient(self.target, ca_file=self.pki.ca_file, token=token, **options)


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory) -> Iterator[TlsServer]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    lines = ["# identity  sha256(token)", ""]
    lines += [f"{name} {hashlib.sha256(token.encode()).hexdigest()}" for name, token in TOKENS.items()]
    tokens.write_text("\n".join(lines) + "\n")
    health_port = free_port()
    receiver = OtlpReceiver().start()
    process = ServerProcess(
        *("--tls-cert", pki.server_cert, "--tls-key", pki.server_key),
        *("--auth-tokens-file", str(tokens), "--auth-allowed-identities", "alice, bob"),
        *("--max-streams-per-identity", "1", "--health-address", f"127.0.0.1:{health_port}"),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
    )
    server = TlsServer(process, pki, f"127.0.0.1:{health_port}", receiver)
    try:
        wait_serving(process, SpeechClient(server.health_target))
        yield server
    finally:
        stopped(process)
        receiver.stop()


@dataclass
class MtlsServer:
    process: ServerProcess
    pki: Pki

    def client(self, who: str | None) -> SpeechClient:
        cert, key = self.pki.clients[who] if who else (None, None)
        return SpeechClient(self.process.target, ca_file=self.pki.ca_file, cert_file=cert, key_file=key)


@pytest.fixture(scope="module")
def mtls_server(pki) -> Iterator[MtlsServer]:
    process = ServerProcess(
        *("--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", pki.ca_file),
        *("--auth-allowed-identities", "alice"),
        env={"OTEL_SDK_DISABLED": "true"},
    )
    server = MtlsServer(process, pki)
    try:
        wait_serving(process, server.client("alice"))
        yield server
    finally:
        stopped(process)


def refused(call) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if hasattr(result, "__next__"):
            list(result)  # a stream fails on iteration
    return raised.value.code(), error_reason(rpc_status.from_call(raised.value))


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("grpcurl"), *args], capture_output=True, text=True, timeout=30)


# --- TLS and bearer tokens -----------------------------------------------------------------------------


def test_a_stream_over_tls_gets_the_transcript(tls_server, jfk):
    with tls_server.client(TOKENS["alice"]) as client:
        responses = list(client.stream_audio(jfk, StreamConfig(interim_results=False), realtime=False))
    assert wer([JFK_TEXT], [" ".join(final_transcripts(responses))]) < 0.1
    # The port speaks only TLS: a plaintext client never gets an answer.
    with SpeechClient(tls_server.target) as plaintext:
        with pytest.raises(grpc.RpcError) as raised:
            plaintext.health(timeout=3)
    assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_the_google_client_authenticates_with_its_bearer_token_over_tls(tls_server, jfk):
    """google-cloud-speech sends its credentials as ``authorization: Bearer``: a channel with the
    engine's CA and an access token is all a Google client needs."""
    from google.api_core import exceptions
    from google.cloud import speech_v1 as speech
    from google.cloud.speech_v1.services.speech.transports import SpeechGrpcTransport

    from engine.audio import float_to_linear16

    ca = grpc.ssl_channel_credentials(Path(tls_server.pki.ca_file).read_bytes())
    config = speech.RecognitionConfig(
        encoding=speech.RecognitionConfig.AudioEncoding.LINEAR16,
        sample_rate_hertz=16000,
        language_code="en-US",
    )
    audio = speech.RecognitionAudio(content=float_to_linear16(jfk))
    for token, raised in ((TOKENS["alice"], None), ("not-a-token", exceptions.Unauthenticated),
                          (TOKENS["carol"], exceptions.PermissionDenied)):  # fmt: skip
        credentials = grpc.composite_channel_credentials(ca, grpc.access_token_call_credentials(token))
        with grpc.secure_channel(tls_server.target, credentials) as channel:
            client = speech.SpeechClient(transport=SpeechGrpcTransport(channel=channel))
            if raised is None:
                response = client.recognize(config=config, audio=audio)
                transcript = " ".join(r.alternatives[0].transcript for r in response.results)
                assert wer([JFK_TEXT], [transcript]) < 0.1
            else:
                with pytest.raises(raised):
                    client.recognize(config=config, audio=audio)


def test_the_riva_client_authenticates_with_a_bearer_token_over_tls(tls_server, jfk):
    """riva.client.Auth sends whatever metadata it is given: the engine's token is one header."""
    import riva.client

    from engine.audio import float_to_linear16

    config = riva.client.RecognitionConfig(
        encoding=riva.client.AudioEncoding.LINEAR_PCM, sample_rate_hertz=16000, language_code="en-US"
    )
    for token, code in ((TOKENS["bob"], None), ("not-a-token", grpc.StatusCode.UNAUTHENTICATED)):
        auth = riva.client.Auth(
            ssl_root_cert=tls_server.pki.ca_file,
            use_ssl=True,
            uri=tls_server.target,
            metadata_args=[["authorization", f"Bearer {token}"]],
        )
        asr = riva.client.ASRService(auth)
        if code is None:
            response = asr.offline_recognize(float_to_linear16(jfk), config)
            transcript = " ".join(r.alternatives[0].transcript for r in response.results)
            assert wer([JFK_TEXT], [transcript]) < 0.1
        else:
            with pytest.raises(grpc.RpcError) as raised:
                asr.offline_recognize(float_to_linear16(jfk), config)
            assert raised.value.code() == code


def test_tokens_are_required_and_checked(tls_server, jfk):
    short = jfk[:8000]
    for token in (None, "not-a-token", TOKENS["alice"] + "x"):
        with tls_server.client(token) as client:
            assert refused(client.server_info) == (grpc.StatusCode.UNAUTHENTICATED, "STT_UNAUTHENTICATED")
            assert refused(lambda c=client: c.recognize(short)) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "STT_UNAUTHENTICATED",
            )
            assert refused(lambda c=client: c.stream_audio(short, realtime=False)) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "STT_UNAUTHENTICATED",
            )
    with tls_server.client() as client:  # another scheme is not a bearer token
        metadata = [("authorization", f"Basic {TOKENS['alice']}")]
        request = stt_pb2.GetServerInfoRequest()
        assert refused(lambda: client.speech.GetServerInfo(request, metadata=metadata)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "STT_UNAUTHENTICATED",
        )
    # A valid token of an identity outside the allow-list is known but not allowed.
    with tls_server.client(TOKENS["carol"]) as client:
        assert refused(client.server_info) == (grpc.StatusCode.PERMISSION_DENIED, "STT_PERMISSION_DENIED")
    with tls_server.client(TOKENS["bob"]) as client:
        assert client.server_info().model == "tiny.en"
        assert client.recognize(jfk).results


def test_health_and_reflection_are_open_without_a_token(tls_server):
    with tls_server.client() as client:
        assert client.health() == "SERVING" and client.health("stt.v1.Speech") == "SERVING"
    listed = grpcurl("-cacert", tls_server.pki.ca_file, tls_server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "stt.v1.Speech" in listed.stdout.split() and "grpc.health.v1.Health" in listed.stdout.split()


def test_grpcurl_with_tls_flags_and_a_token(tls_server):
    common = ("-cacert", tls_server.pki.ca_file)
    with_token = grpcurl(*common, "-H", f"authorization: Bearer {TOKENS['alice']}", tls_server.target, INFO)
    assert with_token.returncode == 0, with_token.stderr
    assert json.loads(with_token.stdout)["model"] == "tiny.en"
    without = grpcurl(*common, tls_server.target, INFO)
    assert without.returncode != 0 and "Unauthenticated" in without.stderr, without.stderr
    detailed = grpcurl(*common, "-format-error", tls_server.target, INFO)
    assert '"reason":"STT_UNAUTHENTICATED"' in detailed.stderr.replace(" ", ""), detailed.stderr
    # Without the CA the server's certificate is not trusted.
    untrusted = grpcurl(tls_server.target, INFO)
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr, untrusted.stderr


def test_grpc_health_probe_over_tls_and_on_the_plaintext_health_port(tls_server):
    tls = health_probe(
        f"-addr={tls_server.target}",
        "-tls",
        f"-tls-ca-cert={tls_server.pki.ca_file}",
        "-service=stt.v1.Speech",
    )
    assert tls.returncode == 0 and "status: SERVING" in tls.stderr, tls.stderr
    plain = health_probe(f"-addr={tls_server.health_target}", "-service=stt.v1.Speech")
    assert plain.returncode == 0 and "status: SERVING" in plain.stderr, plain.stderr
    # Without TLS the main port never completes a connection: exit 2, as with no server.
    assert (
        health_probe(f"-addr={tls_server.target}", connect_timeout="1s").returncode == ProbeExit.NO_CONNECTION
    )
    # The health port serves health and nothing else, in plaintext.
    with SpeechClient(tls_server.health_target, token=TOKENS["alice"]) as client:
        assert client.health() == "SERVING"
        assert refused(client.server_info)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_streams_per_identity_are_limited(tls_server, jfk):
    release = threading.Event()

    def held() -> Iterator:
        yield StreamConfig().first_request()
        release.wait(30)

    with (
        tls_server.client(TOKENS["alice"]) as alice,
        tls_server.client(TOKENS["bob"]) as bob,
    ):
        active = lambda: bob.server_info().active_streams  # noqa: E731
        first = alice.stream(held())
        wait_until(lambda: active() == 1, 10, what="alice's stream to be admitted")
        with pytest.raises(grpc.RpcError) as over:
            list(alice.stream_audio(jfk[:8000], realtime=False))
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(rpc_status.from_call(over.value)) == "STT_TOO_MANY_STREAMS_FOR_IDENTITY"
        # A capacity refusal like the server-wide one: retry once one of alice's streams ends.
        assert_retry_after(over.value, "STT_TOO_MANY_STREAMS_FOR_IDENTITY")
        # The limit is per identity: bob still gets a stream beside alice's.
        other = bob.stream(held())
        wait_until(lambda: active() == 2, 10, what="bob's stream to be admitted")
        release.set()
        assert list(first) == [] and list(other) == []

        def admitted_again() -> bool:
            try:
                list(alice.stream([StreamConfig().first_request()]))
                return True
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False

        # The ended stream gave its slot back.
        wait_until(admitted_again, 5, what="alice's slot to be released")


def test_the_identity_is_on_the_span_and_the_per_client_metric(tls_server):
    with tls_server.client(TOKENS["bob"]) as client:
        client.server_info()
        list(client.stream([StreamConfig().first_request()]))
    with tls_server.client(TOKENS["carol"]) as client:
        assert refused(client.server_info)[0] == grpc.StatusCode.PERMISSION_DENIED
    with tls_server.client() as client:
        assert refused(client.server_info)[0] == grpc.StatusCode.UNAUTHENTICATED
    receiver = tls_server.receiver

    def attributes(item) -> dict:
        return {kv.key: kv.value.string_value for kv in item.attributes}

    def bob_span():
        return [s for s in receiver.spans() if s.name == INFO and attributes(s).get("enduser.id") == "bob"]

    receiver.wait_for(bob_span)
    for reason in ("STT_UNAUTHENTICATED", "STT_PERMISSION_DENIED"):
        receiver.wait_for(
            lambda r=reason: any(attributes(s).get("stt.error.reason") == r for s in receiver.spans())
        )
    refused_spans = [
        s for s in receiver.spans() if attributes(s).get("stt.error.reason") == "STT_UNAUTHENTICATED"
    ]
    assert refused_spans and all("enduser.id" not in attributes(s) for s in refused_spans)

    def counted() -> set:
        points = receiver.metric_points().get("stt.client.calls", [])
        return {(attributes(p)["enduser.id"], attributes(p)["rpc.method"]) for p in points}

    receiver.wait_for(lambda: {("bob", INFO), ("bob", "stt.v1.Speech/StreamingRecognize")} <= counted())
    assert not any(name == "carol" for name, _ in counted())  # refused, so not counted


def test_tokens_are_never_logged(tls_server):
    with tls_server.client(TOKENS["alice"] + "-wrong") as client:
        refused(client.server_info)
    log = tls_server.process.log()
    assert "STT_UNAUTHENTICATED" in log  # the refusals are logged...
    for token in [*TOKENS.values(), TOKENS["alice"] + "-wrong"]:
        assert token not in log  # ...but never the token
    assert all(token not in str(tls_server.receiver.log_records()) for token in TOKENS.values())


def served_certificate(target: str, ca_file: str) -> x509.Certificate:
    """The certificate a fresh TLS connection to ``target`` is given."""
    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_a_rotated_certificate_is_served_to_new_connections(tls_server):
    pki = tls_server.pki
    before = served_certificate(tls_server.target, pki.ca_file)
    assert (
        before.serial_number
        == x509.load_pem_x509_certificate(Path(pki.server_cert).read_bytes()).serial_number
    )
    with tls_server.client(TOKENS["alice"]) as old_channel:
        assert old_channel.server_info().ready
        renewed = issue_server(pki.ca)
        renewed.write(pki.directory, "server")  # what cert-manager does on renewal
        wait_until(
            lambda: (
                served_certificate(tls_server.target, pki.ca_file).serial_number == renewed.cert.serial_number
            ),
            10,
            what="the new certificate to be served",
        )
        assert old_channel.server_info().ready  # an open connection keeps working
    with tls_server.client(TOKENS["alice"]) as new_channel:
        assert new_channel.server_info().ready
    assert "TLS certificate reloaded" in tls_server.process.log()


def stt_engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_cli_client_speaks_tls_with_a_token(tls_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["alice"] + "\n")
    common = ("--server", tls_server.target, "--tls-ca", tls_server.pki.ca_file)
    info = stt_engine("info", *common, "--token-file", str(token_file))
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["model"] == "tiny.en"
    refused_info = stt_engine("info", *common)
    assert refused_info.returncode == 1 and "UNAUTHENTICATED" in refused_info.stderr
    assert TOKENS["alice"] not in refused_info.stderr + info.stderr
    result = subprocess.run(
        [sys.executable, "-m", "engine", "transcribe", str(SAMPLE), *common, "--fast", "--no-interim"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STT_TOKEN": TOKENS["bob"]},
    )
    assert result.returncode == 0, result.stderr
    finals = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if line.startswith("[")]
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1


def test_serve_refuses_inconsistent_security_flags(pki):
    for args, message in (
        (("--tls-cert", pki.server_cert), "--tls-cert and --tls-key go together"),
        (("--tls-client-ca", pki.ca_file), "needs --tls-cert"),
        (("--tls-cert", pki.server_cert, "--tls-key", pki.clients["alice"][1]), "not a valid"),
        (("--auth-tokens-file", pki.server_cert), "expected `identity sha256-hex`"),
    ):
        result = stt_engine("serve", "--address", "127.0.0.1:0", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


# --- mTLS ------------------------------------------------------------------------------------------------


def test_mtls_rejects_a_client_without_a_trusted_certificate(mtls_server):
    for who in (None, "stranger"):
        with mtls_server.client(who) as client:
            with pytest.raises(grpc.RpcError) as raised:
                client.health(timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, who
    with mtls_server.client("alice") as client:
        assert client.health() == "SERVING"


def test_mtls_identity_is_authenticated_and_authorised(mtls_server, jfk):
    with mtls_server.client("alice") as client:
        assert client.server_info().model == "tiny.en"
        responses = list(client.stream_audio(jfk, StreamConfig(interim_results=False), realtime=False))
        assert wer([JFK_TEXT], [" ".join(final_transcripts(responses))]) < 0.1
    with mtls_server.client("mallory") as client:  # signed by the CA, but not allowed
        assert client.health() == "SERVING"  # health stays open
        assert refused(client.server_info) == (grpc.StatusCode.PERMISSION_DENIED, "STT_PERMISSION_DENIED")


def test_grpcurl_and_grpc_health_probe_with_client_certificates(mtls_server):
    pki, target = mtls_server.pki, mtls_server.process.target
    cert, key = pki.clients["alice"]
    info = grpcurl("-cacert", pki.ca_file, "-cert", cert, "-key", key, target, INFO)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["ready"] is True
    assert grpcurl("-cacert", pki.ca_file, target, INFO).returncode != 0  # no client certificate
    probe = health_probe(
        f"-addr={target}",
        "-tls",
        f"-tls-ca-cert={pki.ca_file}",
        f"-tls-client-cert={cert}",
        f"-tls-client-key={key}",
    )
    assert probe.returncode == 0 and "status: SERVING" in probe.stderr, probe.stderr
    no_certificate = health_probe(
        f"-addr={target}", "-tls", f"-tls-ca-cert={pki.ca_file}", connect_timeout="1s"
    )
    assert no_certificate.returncode == ProbeExit.NO_CONNECTION  # the handshake fails


def test_quality_metrics_name_a_bounded_identity_and_flag_its_bad_audio(tls_server, jfk, tmp_path):
    """With a tokens file, identities are a configured set: the quality metrics may carry them.
    Bob's microphone clips (JFK 20 dB too loud), then he calls over a telephone line resampled
    to 16 kHz: each utterance is flagged for what it is, on its span and in the counters."""
    source = tmp_path / "jfk.wav"
    subprocess.run(
        ["sox", "-t", "f32", "-r", "16000", "-c", "1", "-", str(source)], input=jfk.tobytes(), check=True
    )
    clipped = tmp_path / "clipped.wav"
    subprocess.run(
        ["sox", str(source), "-b", "16", str(clipped), "gain", "20"], check=True, capture_output=True
    )
    line = tmp_path / "line.wav"
    subprocess.run(["sox", str(source), "-r", "8000", "-e", "mu-law", str(line)], check=True)
    phone = tmp_path / "phone.wav"
    subprocess.run(["sox", str(line), "-r", "16000", "-e", "signed", "-b", "16", str(phone)], check=True)
    trace_ids = {}
    with tls_server.client(TOKENS["bob"]) as client:
        for name, path in (("clipped", clipped), ("narrowband", phone)):
            call = client.stream_audio(
                read_audio_file(path), StreamConfig(interim_results=False), realtime=False
            )
            assert final_transcripts(call)
            trace_ids[name] = dict(call.initial_metadata())["x-trace-id"]
    receiver = tls_server.receiver

    def flagged() -> dict:
        points = receiver.metric_points().get("stt.audio.flagged_utterances", [])
        return {p_attributes(p)["stt.audio.condition"]: p for p in points}

    receiver.wait_for(lambda: {"clipped", "narrowband"} <= set(flagged()))
    for condition, point in flagged().items():
        assert p_attributes(point) == {
            "stt.audio.condition": condition,
            "enduser.id": "bob",
            "stt.encoding": "LINEAR16",
            "stt.sample_rate_class": "wideband",
        }
    assert set(flagged()) == {"clipped", "narrowband"}  # neither quiet nor noisy
    for name, trace_id in trace_ids.items():
        receiver.wait_for(
            lambda t=trace_id: any(
                s.name == "stt.utterance" and s.trace_id.hex() == t for s in receiver.spans()
            )
        )
        utterances = [
            s for s in receiver.spans() if s.name == "stt.utterance" and s.trace_id.hex() == trace_id
        ]
        for span in utterances:
            (conditions,) = [
                kv.value.array_value for kv in span.attributes if kv.key == "stt.audio.conditions"
            ]
            assert [v.string_value for v in conditions.values] == [name]


def p_attributes(point) -> dict:
    return {kv.key: kv.value.string_value for kv in point.attributes}
