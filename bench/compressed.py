"""What decoding compressed audio costs: CPU-s per audio-s of each streamed encoding.

The Google and Riva layers decode FLAC, Ogg and WebM Opus, MP3, AMR and AMR-WB as they stream in
(``engine/compressed.py``), on the event loop. This encodes the joined long-form of
../shared/audio with ffmpeg in each format, decodes it in 100 ms chunks (as a real-time client
sends it) several times, and reports the median CPU-s per audio-s beside the engine's own
streaming cost in BENCHMARKS.md (about 0.13 at 8 streams).

    python bench/compressed.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.streaming import long_form  # noqa: E402
from engine.audio import float_to_linear16  # noqa: E402
from engine.compressed import streaming_decoder  # noqa: E402
from tests.helpers import amr_narrowband, amr_wideband, ffmpeg  # noqa: E402

FORMATS = {
    "FLAC": ("-f", "flac"),
    "OGG_OPUS": ("-c:a", "libopus", "-b:a", "24k", "-f", "ogg"),
    "WEBM_OPUS": ("-c:a", "libopus", "-b:a", "24k", "-f", "webm"),
    "MP3": ("-c:a", "libmp3lame", "-b:a", "48k", "-f", "mp3"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    audio, _ = long_form(REPO.parent / "shared" / "audio", 1.5, 0)
    seconds = len(audio) / 16000
    pcm = float_to_linear16(audio)
    encoded = {
        name: ffmpeg("-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-", *options, "-", data=pcm)
        for name, options in FORMATS.items()
    }
    encoded["AMR"] = amr_narrowband(audio)
    encoded["AMR_WB"] = amr_wideband(audio)
    print(f"{seconds:.1f} s of audio, {args.rounds} rounds, 100 ms chunks\n")
    print("| encoding | bytes per audio-s | CPU-s per audio-s (median) | decoded / sent duration |")
    print("|---|---|---|---|")
    for name, data in encoded.items():
        chunk = max(1, round(len(data) / seconds / 10))
        costs, decoded = [], 0
        for _ in range(args.rounds):
            decoder = streaming_decoder(name)
            began, out = time.process_time(), 0
            for start in range(0, len(data), chunk):
                out += len(decoder.decode(data[start : start + chunk]))
            out += len(decoder.flush())
            costs.append(time.process_time() - began)
            decoded = out / 32000
        cost = np.median(costs) / seconds
        print(f"| {name} | {len(data) / seconds:.0f} | {cost:.5f} | {decoded / seconds:.3f} |")


if __name__ == "__main__":
    main()
