"""What the Google and Riva API layers share: their output options and their phrase hints.

Both APIs leave punctuation out unless asked for it, both mask profanity on request, and both
take lists of phrases (with boosts) that the engine gives Whisper as its prompt.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

from .api import stt_pb2
from .compressed import CompressedAudioError, streaming_decoder
from .errors import SttError, invalid_argument, out_of_range
from .settings import MAX_PROMPT_CHARS

# Punctuation Whisper writes, removed when automatic punctuation is off (both APIs' default):
# sentence marks, and quotes and brackets around words. Kept: apostrophes and hyphens inside
# words ("don't", "well-known") and points and commas inside numbers ("3.5", "1,000").
_PUNCTUATION = re.compile(r"(?<!\d)[.,](?!\d)|[.,](?=\s|$)|[?!;:\"“”‘’()\[\]…]|(?<!\w)'|'(?!\w)")
# Words masked by a profanity filter, as Google and Riva mask them: the first letter, then asterisks.
PROFANITIES = frozenset(
    "fuck fucking fucked fucker motherfucker shit shitty bullshit bitch bitches bastard asshole "
    "cunt dick cock pussy whore slut damn goddamn piss".split()
)
_WORD = re.compile(r"[A-Za-z]+")


def strip_punctuation(text: str) -> str:
    """``text`` without the punctuation the APIs leave out when it is not asked for."""
    return " ".join(_PUNCTUATION.sub("", text).split())


def mask_profanity(text: str) -> str:
    """``text`` with each profane word as its first letter and asterisks ("f***")."""

    def mask(match: re.Match) -> str:
        word = match.group(0)
        return word[0] + "*" * (len(word) - 1) if word.lower() in PROFANITIES else word

    return _WORD.sub(mask, text)


class OutputText:
    """How a result's text is written: with or without punctuation, masked or not."""

    def __init__(self, punctuation: bool, profanity_filter: bool) -> None:
        self.punctuation = punctuation
        self.profanity_filter = profanity_filter

    def __call__(self, text: str) -> str:
        if not self.punctuation:
            text = strip_punctuation(text)
        return mask_profanity(text) if self.profanity_filter else text


def duration_seconds(duration: Any) -> float:
    """A ``google.protobuf.Duration`` in seconds."""
    return duration.ToNanoseconds() / 1e9


def refuse(field: str, message: str) -> SttError:
    """INVALID_ARGUMENT for a field the engine cannot honour, naming it."""
    return invalid_argument("STT_CONFIG_UNSUPPORTED", f"{field}: {message}", field)


def phrase_prompt(contexts: Iterable[Any], field: str) -> str:
    """The phrases of ``speech_contexts`` as the decoder prompt, most boosted first (Whisper has
    no per-phrase weight: earlier text in the prompt is what a boost can become). A negative
    boost, which asks for a phrase to be avoided, cannot be honoured."""
    weighted = []
    for index, context in enumerate(contexts):
        if context.boost < 0:
            raise refuse(f"{field}[{index}].boost", "negative boosts (avoid a phrase) are not supported")
        weighted += [(-context.boost, phrase.strip()) for phrase in context.phrases if phrase.strip()]
    prompt = ", ".join(phrase for _, phrase in sorted(weighted, key=lambda item: item[0]))
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid_argument(
            "STT_PROMPT_TOO_LONG",
            f"{field} hold {len(prompt)} characters of phrases; at most {MAX_PROMPT_CHARS}",
            field,
        )
    return prompt


# Decoded audio goes to the core in pieces of at most 1 s (16 kHz LINEAR16), so a small
# compressed message never exceeds the core's per-message limit once decoded.
PCM_PIECE_BYTES = 32000
# Compressed bytes decoded at a time, only when the core wants more audio: a message of a
# megabyte of low-rate Opus holds twenty minutes of speech, which decoded at once took seconds
# of the event loop and hundreds of megabytes; this way the core's stream-length limit stops
# the decoding too.
COMPRESSED_SLICE_BYTES = 4096


def check_message_size(data: bytes, limit: int) -> None:
    """The core's per-message limit, applied to a compressed message as sent."""
    if len(data) > limit:
        raise out_of_range(
            "STT_CHUNK_TOO_LARGE",
            f"audio_content of {len(data)} bytes exceeds the limit of {limit} bytes per message",
            "audio_content",
        )


def _malformed(exc: CompressedAudioError) -> SttError:
    return invalid_argument("STT_AUDIO_MALFORMED", f"audio_content: {exc}", "audio_content")


class AudioIn:
    """A stream's audio as the core takes it: as sent, or decoded from a compressed encoding
    (``compressed.STREAMED_ENCODINGS``) into 16 kHz mono LINEAR16 pieces, a slice at a time
    as the core asks for them."""

    def __init__(self, compressed: str | None) -> None:
        self.decoder = streaming_decoder(compressed) if compressed else None
        self._pieces: deque[bytes] = deque()
        self._compressed = bytearray()  # received, not decoded yet
        self._ended = False
        self._flushed = False

    def add(self, data: bytes) -> None:
        if self.decoder is None:
            self._pieces.append(data)
        else:
            self._compressed += data

    def end(self) -> None:
        """The client sent its last message: what the decoder holds comes out last."""
        self._ended = True

    def take(self) -> bytes | None:
        """The next piece for the core, decoding more when none is left; None: it needs more
        input (or, after ``end``, there is no more)."""
        while not self._pieces and self.decoder is not None and (self._compressed or self._ended):
            try:
                if self._compressed:
                    data = bytes(self._compressed[:COMPRESSED_SLICE_BYTES])
                    del self._compressed[:COMPRESSED_SLICE_BYTES]
                    self._split(self.decoder.decode(data))
                elif not self._flushed:
                    self._flushed = True
                    self._split(self.decoder.flush())
                else:
                    break
            except CompressedAudioError as exc:
                raise _malformed(exc) from None
        return self._pieces.popleft() if self._pieces else None

    def _split(self, pcm: bytes) -> None:
        for start in range(0, len(pcm), PCM_PIECE_BYTES):
            self._pieces.append(pcm[start : start + PCM_PIECE_BYTES])


def decode_all(compressed: str, data: bytes, max_seconds: float) -> bytes:
    """A whole compressed recording (a Recognize call's) as 16 kHz mono LINEAR16; OUT_OF_RANGE
    as soon as it decodes to more than ``max_seconds``, before it is all decoded."""
    audio = AudioIn(compressed)
    audio.add(data)
    audio.end()
    pcm, limit = bytearray(), int(max_seconds * 32000)
    for piece in iter(audio.take, None):
        pcm += piece
        if len(pcm) > limit:
            raise out_of_range(
                "STT_AUDIO_TOO_LONG",
                f"the {compressed} audio decodes to more than the limit of {max_seconds:g} s for "
                "Recognize; stream it with StreamingRecognize",
                "audio_content",
            )
    return bytes(pcm)


class TranslatedStream:
    """Another API's stream requests as stt.v1 requests: its config (translated by
    ``configure``) first, then its audio, decoded when compressed (``AudioIn``). What the core
    refuses (audio before the config, a second config, a message that did not parse) is passed
    on for the core to refuse with its own errors. Subclasses name their request type and may
    check each request, count the audio and end the input early."""

    request_type: type

    def __init__(self, requests: AsyncIterator[Any], max_message_bytes: int) -> None:
        self._requests = requests
        self._max_message_bytes = max_message_bytes
        self.audio: AudioIn | None = None  # once configured
        self._input_done = False

    def __aiter__(self) -> TranslatedStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            piece = self.audio.take() if self.audio is not None else None
            if piece is not None:
                self.audio_sent(len(piece))
                return stt_pb2.StreamingRecognizeRequest(audio_content=piece)
            if self._input_done or await self.input_ended():
                raise StopAsyncIteration
            try:
                request = await anext(self._requests)
            except StopAsyncIteration:
                self._input_done = True
                if self.audio is None:
                    raise
                self.audio.end()
                continue
            if not isinstance(request, self.request_type):
                return request  # a MalformedRequest: the core refuses it
            self.check(request)
            if request.HasField("streaming_config"):
                if self.audio is not None:  # a second config: the core says so
                    return stt_pb2.StreamingRecognizeRequest(
                        streaming_config=stt_pb2.StreamingRecognitionConfig()
                    )
                config, compressed = self.configure(request)
                self.audio = AudioIn(compressed)
                return stt_pb2.StreamingRecognizeRequest(streaming_config=config)
            if self.audio is None:  # audio before the config: the core says so
                return stt_pb2.StreamingRecognizeRequest(audio_content=request.audio_content)
            audio = request.audio_content  # a copy at each access (upb): take one
            if self.audio.decoder is not None:  # the core checks what it receives as sent
                check_message_size(audio, self._max_message_bytes)
            self.audio.add(audio)

    def configure(self, request: Any) -> tuple[stt_pb2.StreamingRecognitionConfig, str | None]:
        """The stream's config as the core's, and its compressed encoding (None: PCM)."""
        raise NotImplementedError

    def check(self, request: Any) -> None:
        """Refuses (SttError) a request the core would not see the fault in."""

    def audio_sent(self, num_bytes: int) -> None:
        """``num_bytes`` of LINEAR16, MULAW or ALAW went to the core."""

    async def input_ended(self) -> bool:
        """Whether to end the stream's input now, as if the client had half-closed."""
        return False
