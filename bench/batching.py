"""What batching decodes across streams costs and changes: one by one vs ``decode_batch``.

A realistic queue of decodes from many streams (real clips of ../shared/audio and utterances of
../shared/audio-long): interims on windows of 1-4 s and finals of 2-15 s, in a shuffled
arrival order. Each configuration decodes the whole queue; batches form as the scheduler forms
them (``InferenceScheduler``: same kind and settings, encoder lengths within the frame
tolerance, up to B in arrival order). Configurations run interleaved, round after round, in one
process, and the table gives medians over the rounds: CPU seconds (the whole process) and wall
seconds per audio second, and the WER of each configuration's transcripts against the
one-by-one transcripts (whisper-normalizer's EnglishTextNormalizer, jiwer), finals against
their reference too.

    python bench/batching.py                        # B = 1, 2, 4, 8; 3 rounds (about 90 s)
    python bench/batching.py --tolerance 100000     # batch finals of any lengths together
    python bench/batching.py --sizes 1 4 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.audio_sets import RATE, long_utterances, short_clips  # noqa: E402
from engine.model import DecodeRequest, Hypothesis, SpeechModel  # noqa: E402
from engine.options import ModelOptions  # noqa: E402
from engine.scheduler import BATCH_FRAME_TOLERANCE  # noqa: E402


@dataclass(eq=False)
class Item:
    audio: np.ndarray
    request: DecodeRequest
    reference: str  # the transcript of a final's audio; "" for an interim window
    frames: int = 0

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE


def decode_mix(interims: int, finals: int, seed: int) -> list[Item]:
    """Finals: whole utterances of 2-15 s; interims: their first 1-4 s, as a stream's
    interims are. Shuffled, as decodes of many streams arrive."""
    rng = random.Random(seed)
    utterances = [(clip.audio, clip.transcript) for clip in short_clips()]
    for reading in long_utterances().values():
        utterances += [
            (clip.audio, clip.transcript) for clip in reading if 2 * RATE <= len(clip.audio) <= 15 * RATE
        ]
    rng.shuffle(utterances)
    items = [Item(audio, DecodeRequest(final=True), text) for audio, text in utterances[:finals]]
    for index in range(interims):
        audio, _ = utterances[index % len(utterances)]
        window = rng.choice((1.0, 2.0, 3.0, 4.0))
        items.append(Item(audio[: int(min(window * RATE, len(audio)))], DecodeRequest(final=False), ""))
    rng.shuffle(items)
    return items


def batches(items: list[Item], size: int, tolerance: int) -> list[list[Item]]:
    """The scheduler's rule on a full queue: the first item, then queued items of its kind
    whose encoder lengths keep the batch within ``tolerance`` frames, up to ``size``."""
    queue = sorted(items, key=lambda item: not item.request.final)  # finals first
    formed = []
    while queue:
        first = queue.pop(0)
        batch, lowest, highest = [first], first.frames, first.frames
        for item in list(queue):
            if len(batch) >= size:
                break
            if item.request.final != first.request.final:
                continue
            if max(highest, item.frames) - min(lowest, item.frames) > tolerance:
                continue
            batch.append(item)
            queue.remove(item)
            lowest, highest = min(lowest, item.frames), max(highest, item.frames)
        formed.append(batch)
    return formed


def run(model: SpeechModel, items: list[Item], size: int, tolerance: int) -> tuple[float, float, dict]:
    """CPU and wall seconds for the whole queue, and each item's hypothesis."""
    results: dict[int, Hypothesis] = {}
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches(items, size, tolerance):
        hypotheses = model.decode_batch([(item.audio, item.request) for item in batch])
        results.update({id(item): h for item, h in zip(batch, hypotheses)})
    return time.process_time() - cpu, time.perf_counter() - wall, results


def wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses) if normalise(r)]
    return jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]) if pairs else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes (1: one by one)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interims", type=int, default=24)
    parser.add_argument("--finals", type=int, default=12)
    parser.add_argument("--tolerance", type=int, default=BATCH_FRAME_TOLERANCE, help="encoder frames")
    parser.add_argument("--threads", type=int, default=1, help="CTranslate2 threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = SpeechModel(ModelOptions(workers=1, cpu_threads=args.threads))
    model.warm_up()
    items = decode_mix(args.interims, args.finals, args.seed)
    for item in items:
        item.frames = model.encoder_frames(len(item.audio), item.request)
    audio_seconds = sum(item.seconds for item in items)
    sizes = sorted(set([1] + args.sizes))
    figures: dict[int, list[tuple[float, float]]] = {size: [] for size in sizes}
    texts: dict[int, dict] = {}
    for _ in range(args.rounds):
        for size in sizes:
            cpu, wall, results = run(model, items, size, args.tolerance)
            figures[size].append((cpu, wall))
            texts[size] = results  # greedy and beam search are deterministic: any round's

    finals = [item for item in items if item.request.final]
    interims = [item for item in items if not item.request.final]
    print(
        f"{len(finals)} finals ({sum(i.seconds for i in finals):.0f} s), {len(interims)} interims "
        f"({sum(i.seconds for i in interims):.0f} s); tolerance {args.tolerance} frames; "
        f"{args.rounds} rounds; medians\n"
    )
    print(
        "| B | batches | CPU-s / audio-s | wall-s / audio-s | CPU vs B=1 | WER vs B=1 (finals) "
        "| WER vs B=1 (interims) | WER vs reference (finals) | changed texts |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base_cpu = statistics.median(cpu for cpu, _ in figures[1])
    for size in sizes:
        cpu = statistics.median(c for c, _ in figures[size])
        wall = statistics.median(w for _, w in figures[size])

        def text(item: Item, of: int = size) -> str:
            return texts[of][id(item)].text

        changed = sum(text(item) != text(item, 1) for item in items)
        print(
            f"| {size} | {len(batches(items, size, args.tolerance))} | {cpu / audio_seconds:.4f} "
            f"| {wall / audio_seconds:.4f} | {cpu / base_cpu:.2f} "
            f"| {wer([text(i, 1) for i in finals], [text(i) for i in finals]):.2%} "
            f"| {wer([text(i, 1) for i in interims], [text(i) for i in interims]):.2%} "
            f"| {wer([i.reference for i in finals], [text(i) for i in finals]):.2%} | {changed} |"
        )
    largest = max(sizes)
    print(f"\nTexts that differ from one-by-one at B={largest}:")
    for item in items:
        alone, batched = texts[1][id(item)].text, texts[largest][id(item)].text
        if alone != batched:
            padded = texts[largest][id(item)].encoder_frames
            print(
                f"- {'final' if item.request.final else 'interim'} {item.seconds:.1f} s, "
                f"{item.frames} frames alone: {alone!r} -> {batched!r} (batch of "
                f"{texts[largest][id(item)].batch_size}, {padded} frames)"
            )


if __name__ == "__main__":
    main()
