"""Compressed audio streamed in chunks (FLAC, Ogg or WebM Opus, MP3, AMR, AMR-WB), decoded as it arrives.

The Google and Riva layers accept these encodings; each turns a stream's compressed chunks
into 16 kHz mono LINEAR16 for the recognition core, so the core's limits and clocks count
decoded audio. A chunk may end anywhere, in a header, an Ogg page or a frame: what cannot be
decoded yet is kept for the next chunk. Each decoder splits the byte stream into the codec's
packets itself (Ogg pages, WebM blocks, FLAC frames by their CRC, MP3 through FFmpeg's parser,
AMR frame sizes), so decoding
is synchronous, costs no thread, and yields audio as soon as a packet is whole.

Bad bytes raise ``CompressedAudioError``, which says what was wrong.
"""

from __future__ import annotations

import struct

import av
import numpy as np

TARGET_RATE = 16000
MAX_PENDING_BYTES = 1 << 20  # undecodable bytes held before the stream is refused


class CompressedAudioError(ValueError):
    """The bytes are not the encoding the stream declared."""


class _Decoder:
    """Shared by the formats: decoded frames resampled to 16 kHz mono int16."""

    name = "audio"

    def __init__(self) -> None:
        self._pending = b""
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=TARGET_RATE)

    def decode(self, data: bytes) -> bytes:
        """LINEAR16 at 16 kHz mono for ``data``, the stream's next bytes."""
        self._pending += data
        try:
            pcm = b"".join(self._pcm(frame) for frame in self._frames())
        except CompressedAudioError:
            raise
        except (av.error.FFmpegError, struct.error, IndexError, ValueError) as exc:
            raise CompressedAudioError(f"the audio is not valid {self.name}: {exc}") from None
        if len(self._pending) > MAX_PENDING_BYTES:
            raise CompressedAudioError(
                f"{len(self._pending)} bytes arrived without a whole {self.name} packet in them"
            )
        return pcm

    def flush(self) -> bytes:
        """What the codec and resampler still hold, at the end of the stream."""
        try:
            pcm = b"".join(self._pcm(frame) for frame in self._drain())
        except av.error.FFmpegError as exc:
            raise CompressedAudioError(f"the audio is not valid {self.name}: {exc}") from None
        return pcm + b"".join(f.to_ndarray().astype("<i2").tobytes() for f in self._resampler.resample(None))

    def _pcm(self, frame: av.AudioFrame) -> bytes:
        return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in self._resampler.resample(frame))

    def _frames(self):
        raise NotImplementedError

    def _drain(self):
        return ()


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def flac_crc16(data: bytes) -> int:
    """The CRC-16 a FLAC frame ends with (polynomial 0x8005, as the FLAC format defines it)."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc


class FlacDecoder(_Decoder):
    """Native FLAC: the ``fLaC`` marker and metadata blocks (STREAMINFO gives the codec its
    parameters), then frames. A frame ends where the next frame's sync code begins and the
    bytes before it end with their own CRC-16: the sync code alone also occurs inside frames
    (FFmpeg's parser, fed chunks, split some frames there and lost audio)."""

    name = "FLAC"

    def __init__(self) -> None:
        super().__init__()
        self._context = av.CodecContext.create("flac", "r")
        self._header_done = False
        self._searched = 2  # where the search for the next frame's sync resumes

    def _frames(self):
        if not self._header_done and not self._read_header():
            return
        data = self._pending
        start = 0
        position = max(self._searched, 2)
        while True:
            position = data.find(b"\xff", position)
            if position < 0 or position + 1 >= len(data):
                break
            if data[position + 1] in (0xF8, 0xF9) and self._ends_frame(data[start:position]):
                yield from self._context.decode(av.Packet(data[start:position]))
                start = position
                position += 2
                continue
            position += 1
        self._pending = data[start:]
        self._searched = max(2, (position if position >= 0 else len(data)) - start - 1)

    @staticmethod
    def _ends_frame(frame: bytes) -> bool:
        return len(frame) > 8 and flac_crc16(frame[:-2]) == int.from_bytes(frame[-2:], "big")

    def _drain(self):
        if self._header_done and self._ends_frame(self._pending):
            yield from self._context.decode(av.Packet(self._pending))
        self._pending = b""

    def _read_header(self) -> bool:
        data = self._pending
        if len(data) < 4:
            return False
        if data[:4] != b"fLaC":
            raise CompressedAudioError("FLAC audio must start with the 'fLaC' stream marker")
        offset, streaminfo = 4, None
        while True:
            if len(data) < offset + 4:
                return False
            kind, size = data[offset] & 0x7F, int.from_bytes(data[offset + 1 : offset + 4], "big")
            last = data[offset] & 0x80
            if len(data) < offset + 4 + size:
                return False
            if kind == 0:
                streaminfo = data[offset + 4 : offset + 4 + size]
            offset += 4 + size
            if last:
                break
        if streaminfo is None:
            raise CompressedAudioError("FLAC audio has no STREAMINFO block")
        self._context.extradata = streaminfo
        self._pending = data[offset:]
        self._header_done = True
        return True


class Mp3Decoder(_Decoder):
    """MP3 frames, after an ID3v2 tag if there is one; FFmpeg's parser finds the frames."""

    name = "MP3"

    def __init__(self) -> None:
        super().__init__()
        self._context = av.CodecContext.create("mp3", "r")
        self._tag_checked = False

    def _frames(self):
        if not self._tag_checked:
            if len(self._pending) < 10:
                return
            if self._pending[:3] == b"ID3":
                size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(self._pending[6:10]))
                if len(self._pending) < size:
                    return
                self._pending = self._pending[size:]
            self._tag_checked = True
        data, self._pending = self._pending, b""
        for packet in self._context.parse(data):
            yield from self._context.decode(packet)

    def _drain(self):
        for packet in self._context.parse(None):
            yield from self._context.decode(packet)
        yield from self._context.decode(None)


class OggOpusDecoder(_Decoder):
    """Opus in Ogg pages (RFC 7845): the OpusHead packet gives the channels and the samples to
    skip at the start; OpusTags follows; every later packet is audio."""

    name = "Ogg Opus"

    def __init__(self) -> None:
        super().__init__()
        self._context = None
        self._packet = b""  # a packet continued on the next page
        self._packets_seen = 0
        self._skip = 0  # 48 kHz samples still to drop (pre-skip)

    def _frames(self):
        for packet in self._packets():
            self._packets_seen += 1
            if self._packets_seen == 1:
                self._open(packet)
            elif self._packets_seen > 2:  # the second is OpusTags
                yield from self._decode(packet)

    def _open(self, head: bytes) -> None:
        if head[:8] != b"OpusHead" or len(head) < 19:
            raise CompressedAudioError("Ogg Opus audio must start with an OpusHead packet")
        channels, self._skip = head[9], struct.unpack_from("<H", head, 10)[0]
        if channels < 1 or channels > 2:
            raise CompressedAudioError(f"Ogg Opus audio has {channels} channels; 1 or 2 are supported")
        self._context = av.CodecContext.create("opus", "r")
        self._context.sample_rate = 48000
        self._context.layout = "mono" if channels == 1 else "stereo"
        self._context.extradata = head

    def _decode(self, packet: bytes):
        for frame in self._context.decode(av.Packet(packet)):
            if self._skip:
                samples = frame.samples
                if samples <= self._skip:
                    self._skip -= samples
                    continue
                array = frame.to_ndarray()[..., self._skip :]
                self._skip = 0
                frame = _frame_like(frame, array)
            yield frame

    def _packets(self):
        """Whole packets from the complete Ogg pages held."""
        data = self._pending
        offset = 0
        while len(data) - offset >= 27:
            if data[offset : offset + 4] != b"OggS":
                raise CompressedAudioError("expected an Ogg page ('OggS') in OGG_OPUS audio")
            segments = data[offset + 26]
            header = 27 + segments
            if len(data) - offset < header:
                break
            lacing = data[offset + 27 : offset + header]
            if len(data) - offset < header + sum(lacing):
                break
            body = offset + header
            for size in lacing:
                self._packet += data[body : body + size]
                body += size
                if size < 255:  # a packet ends here
                    yield self._packet
                    self._packet = b""
            offset = body
        self._pending = data[offset:]


class WebmOpusDecoder(OggOpusDecoder):
    """Opus in WebM (Matroska), as browsers' MediaRecorder writes it: the Opus track's
    CodecPrivate is its OpusHead, and every SimpleBlock or Block of that track holds one packet.
    Master elements (Segment, Cluster, Tracks...) are read through, so clusters of unknown size,
    as a live recorder writes them, are no different."""

    name = "WebM Opus"
    # Matroska element IDs, as written (with their length marker).
    MASTERS = {
        0x18538067,
        0x1F43B675,
        0x1654AE6B,
        0xAE,
        0xA0,
    }  # Segment, Cluster, Tracks, TrackEntry, BlockGroup
    EBML, TRACK_NUMBER, CODEC_ID, CODEC_PRIVATE = 0x1A45DFA3, 0xD7, 0x86, 0x63A2
    BLOCKS = {0xA3, 0xA1}  # SimpleBlock, Block

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._track: dict = {}  # the TrackEntry being read: number, codec, head
        self._opus_track: int | None = None

    def _frames(self):
        data, offset = self._pending, 0
        while True:
            header = self._element_header(data, offset)
            if header is None:
                break
            element, size, body = header
            if not self._started:
                if element != self.EBML:
                    raise CompressedAudioError("WebM audio must start with an EBML header")
                self._started = True
            if element in self.MASTERS:
                if element == 0xAE:
                    self._track = {}
                offset = body  # read through: its children follow
                continue
            if size is None:
                raise CompressedAudioError(f"WebM element {element:#x} has an unknown size")
            if len(data) < body + size:
                break
            yield from self._element(element, data[body : body + size])
            offset = body + size
        self._pending = data[offset:]

    def _element(self, element: int, value: bytes):
        if element == self.TRACK_NUMBER:
            self._track["number"] = int.from_bytes(value, "big")
        elif element == self.CODEC_ID:
            self._track["codec"] = value.rstrip(b"\0")
        elif element == self.CODEC_PRIVATE:
            self._track["head"] = value
        if self._opus_track is None and self._track.get("codec") == b"A_OPUS" and "head" in self._track:
            if "number" in self._track:
                self._opus_track = self._track["number"]
                self._open(self._track["head"])
        if element in self.BLOCKS and self._opus_track is not None:
            track, length = _read_vint(value, 0)
            if track == self._opus_track and length is not None:
                if len(value) < length + 3:
                    raise CompressedAudioError("a WebM block is shorter than its header")
                if value[length + 2] & 0x06:
                    raise CompressedAudioError("laced WebM blocks are not supported")
                yield from self._decode(value[length + 3 :])

    @staticmethod
    def _element_header(data: bytes, offset: int):
        """(ID, size or None when unknown, offset of the body), or None until it is all here."""
        if offset >= len(data):
            return None
        first = data[offset]
        id_length = 1 + (8 - first.bit_length()) if first else 0
        if not 1 <= id_length <= 4:
            raise CompressedAudioError("not a WebM element")
        if len(data) < offset + id_length + 1:
            return None
        element = int.from_bytes(data[offset : offset + id_length], "big")
        size, size_length = _read_vint(data, offset + id_length)
        if size_length is None:
            return None
        return element, size, offset + id_length + size_length


def _read_vint(data: bytes, offset: int) -> tuple[int | None, int | None]:
    """An EBML variable-length integer: (value, or None for "unknown"; its length), with a
    length of None until all its bytes are here."""
    if offset >= len(data):
        return None, None
    first = data[offset]
    if not first:
        raise CompressedAudioError("not a WebM size")
    length = 9 - first.bit_length()
    if len(data) < offset + length:
        return None, None
    value = first & (0xFF >> length)
    for byte in data[offset + 1 : offset + length]:
        value = (value << 8) | byte
    return (None if value == (1 << (7 * length)) - 1 else value), length


def _frame_like(frame: av.AudioFrame, array: np.ndarray) -> av.AudioFrame:
    out = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(array), format=frame.format.name, layout=frame.layout.name
    )
    out.sample_rate = frame.sample_rate
    return out


class AmrDecoder(_Decoder):
    """AMR or AMR-WB in the storage format (RFC 4867, section 5): the ``#!AMR`` or ``#!AMR-WB``
    line, then frames whose first byte gives their size."""

    # Frame payload bytes by frame type, after the one-byte header (RFC 4867, tables 1a and 1b).
    NB_SIZES = (12, 13, 15, 17, 19, 20, 26, 31, 5, 0, 0, 0, 0, 0, 0, 0)
    WB_SIZES = (17, 23, 32, 36, 40, 46, 50, 58, 60, 5, 0, 0, 0, 0, 0, 0)

    def __init__(self, wideband: bool = False) -> None:
        super().__init__()
        self.name = "AMR-WB" if wideband else "AMR"
        self._magic = b"#!AMR-WB\n" if wideband else b"#!AMR\n"
        self._sizes = self.WB_SIZES if wideband else self.NB_SIZES
        self._context = av.CodecContext.create("amrwb" if wideband else "amrnb", "r")
        self._context.sample_rate = 16000 if wideband else 8000
        self._context.layout = "mono"
        self._header_done = False

    def _frames(self):
        if not self._header_done:
            if len(self._pending) < len(self._magic):
                return
            if not self._pending.startswith(self._magic):
                raise CompressedAudioError(f"{self.name} audio must start with {self._magic!r}")
            self._pending = self._pending[len(self._magic) :]
            self._header_done = True
        offset = 0
        data = self._pending
        while offset < len(data):
            size = 1 + self._sizes[(data[offset] >> 3) & 0x0F]
            if len(data) - offset < size:
                break
            yield from self._context.decode(av.Packet(data[offset : offset + size]))
            offset += size
        self._pending = data[offset:]


STREAMED_ENCODINGS = ("FLAC", "OGG_OPUS", "WEBM_OPUS", "MP3", "AMR", "AMR_WB")


def streaming_decoder(encoding: str) -> _Decoder:
    """A decoder for ``encoding``, one of ``STREAMED_ENCODINGS``."""
    if encoding == "FLAC":
        return FlacDecoder()
    if encoding == "OGG_OPUS":
        return OggOpusDecoder()
    if encoding == "WEBM_OPUS":
        return WebmOpusDecoder()
    if encoding == "MP3":
        return Mp3Decoder()
    if encoding in ("AMR", "AMR_WB"):
        return AmrDecoder(wideband=encoding == "AMR_WB")
    raise ValueError(f"no streaming decoder for {encoding}")
