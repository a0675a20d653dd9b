"""Inference scheduling: model calls run on worker threads, finals first.

CTranslate2 releases the GIL, so a small thread pool gives real parallelism while
the event loop keeps reading audio for every stream. Finals outrank interims:
under load a stream's interim results thin out, its finals never wait behind
someone else's interims. Within a priority, requests run in arrival order. That is fair
across streams for finals: a stream queues its next final only once the one before is decoded
(the next is prompted with its text), so each stream has at most one final waiting, and a
client sending hours of audio at once delays another stream's final by one decode at most.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .model import DecodeRequest, Hypothesis, SpeechModel

FINAL_PRIORITY = 0
INTERIM_PRIORITY = 1
# Most encoder frames by which two decodes sharing a batch may differ: none, as a shorter input
# padded to a longer one changes its text. bench/batching.py, 12 finals and 24 interims: with
# 200 frames, 4 of the 12 finals changed ("mischief maker" -> "wisheth maker"; WER against the
# references 15.5% -> 18.7%) for no CPU saved (0.98 of one by one, against 0.89 with 0). Interims
# of windows up to 4 s all have the 600-frame minimum, so they still batch; finals batch within
# one 50-frame bucket (``DecodeOptions.encoder_frames_bucket``).
BATCH_FRAME_TOLERANCE = 0


class DecodeObserver(Protocol):
    """What the scheduler reports about one decode (otel.DecodeTelemetry implements it)."""

    def queued(self) -> None: ...
    def dequeued(self, waited: float) -> None: ...
    def run(self, function: Any, *args: Any) -> Any: ...
    def finished(self, hypothesis: Hypothesis) -> None: ...
    def skipped(self, reason: str) -> None: ...
    def failed(self, error: BaseException) -> None: ...


class _Unobserved:
    def queued(self) -> None:
        pass

    def dequeued(self, waited: float) -> None:
        pass

    def run(self, function, *args):
        return function(*args)

    def finished(self, hypothesis) -> None:
        pass

    def skipped(self, reason: str) -> None:
        pass

    def failed(self, error) -> None:
        pass


UNOBSERVED = _Unobserved()


class StaleInterim(Exception):
    """An interim waited too long in the queue and was dropped unrun."""


@dataclass(eq=False)  # compared by identity: comparing jobs would compare their audio
class _Job:
    """A queued decode: ordered by priority, then arrival."""

    priority: int
    order: int
    queued_at: float
    future: asyncio.Future
    audio: np.ndarray
    request: DecodeRequest
    observer: DecodeObserver
    settings: tuple  # SpeechModel.batch_settings: jobs with equal settings may share a batch
    frames: int  # encoder frames when decoded alone

    def __lt__(self, other: _Job) -> bool:
        return (self.priority, self.order) < (other.priority, other.order)


class _JobQueue(asyncio.PriorityQueue):
    def remove(self, job: _Job) -> bool:
        """Takes ``job`` out of the queue; False when a worker has taken it already."""
        for index, queued in enumerate(self._queue):
            if queued is job:
                del self._queue[index]
                heapq.heapify(self._queue)
                return True
        return False

    def take_batch_mates(self, first: _Job, limit: int, frame_tolerance: int) -> list[_Job]:
        """Takes up to ``limit`` queued jobs that can share ``first``'s batch, in arrival order:
        the same priority and decode settings, and encoder lengths that differ by at most
        ``frame_tolerance`` frames across the whole batch."""
        lowest = highest = first.frames
        mates: list[_Job] = []
        for job in sorted(self._queue):
            if len(mates) >= limit or job.priority != first.priority:
                break  # sorted: the rest rank lower
            if job.future.done() or job.settings != first.settings:
                continue
            if max(highest, job.frames) - min(lowest, job.frames) > frame_tolerance:
                continue
            mates.append(job)
            lowest, highest = min(lowest, job.frames), max(highest, job.frames)
        if mates:
            taken = {id(job) for job in mates}
            self._queue[:] = [job for job in self._queue if id(job) not in taken]
            heapq.heapify(self._queue)
        return mates


class InferenceScheduler:
    """Runs ``SpeechModel`` decodes on ``workers`` threads with priorities, in batches.

    A worker that takes a job also takes the queued jobs that can share its model calls (see
    ``take_batch_mates``), up to ``max_batch`` in all, and decodes them with one
    ``SpeechModel.decode_batch``, and no more than its share of the queue (queued jobs over
    workers), so no worker idles while another decodes a batch. It never waits for mates: an
    idle server decodes each request as it comes, and batches form only from what queued while
    the workers were busy.
    """

    def __init__(
        self,
        model: SpeechModel,
        workers: int,
        max_interim_wait: float = 0.5,
        max_batch: int | None = None,
        frame_tolerance: int = BATCH_FRAME_TOLERANCE,
    ) -> None:
        self.model = model
        self.workers = workers
        self.max_interim_wait = max_interim_wait
        self.max_batch = max_batch if max_batch is not None else model.options.batch_size
        self.frame_tolerance = frame_tolerance
        self.stale_interims = 0
        self._finals_queued = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stt-infer")
        self._queue: _JobQueue | None = None
        self._tasks: list[asyncio.Task] = []
        self._order = itertools.count()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def finals_waiting(self) -> bool:
        """A final is queued for a worker: a new interim now would only delay it."""
        return self._finals_queued > 0

    def start(self) -> None:
        self._queue = _JobQueue()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        """Stops taking jobs. A decode already running is not waited for: CTranslate2 cannot
        interrupt it, and waiting blocked the event loop past the shutdown deadline."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def decode(
        self, audio: np.ndarray, request: DecodeRequest, observer: DecodeObserver | None = None
    ) -> Hypothesis:
        """Queues a decode and waits for it; cancelling the caller drops a queued job."""
        assert self._queue is not None, "scheduler not started"
        observer = observer or UNOBSERVED
        future = asyncio.get_running_loop().create_future()
        priority = FINAL_PRIORITY if request.final else INTERIM_PRIORITY
        observer.queued()
        self._finals_queued += request.final
        job = _Job(
            priority,
            next(self._order),
            time.perf_counter(),
            future,
            audio,
            request,
            observer,
            self.model.batch_settings(request),
            self.model.encoder_frames(len(audio), request),
        )
        self._queue.put_nowait(job)
        try:
            return await future
        except asyncio.CancelledError:
            # Finals outrank interims, so under sustained load the workers may never reach a
            # cancelled interim: left queued, it held its audio and telemetry for as long as the
            # load lasted (RSS grew by 17 KB per stream over 8000 short streams).
            if self._queue.remove(job):
                self._finals_queued -= request.final
                observer.skipped("cancelled")
            raise

    def _admit(self, job: _Job) -> bool:
        """Dequeues a taken job; False when it is not to be decoded (cancelled or stale)."""
        self._finals_queued -= job.request.final
        if job.future.done():  # the stream gave up on it (cancelled or closed)
            job.observer.skipped("cancelled")
            return False
        waited = time.perf_counter() - job.queued_at
        job.observer.dequeued(waited)
        if not job.request.final and waited > self.max_interim_wait:
            # Behind: skip it; the stream's next interim or its final covers this audio.
            self.stale_interims += 1
            job.observer.skipped("stale")
            job.future.set_exception(StaleInterim(f"interim waited {waited:.2f} s"))
            return False
        return True

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            # At most a fair share of the queue: the other workers' cores would idle otherwise.
            share = -(-(self._queue.qsize() + 1) // self.workers)
            taken = [first]
            if min(self.max_batch, share) > 1:
                limit = min(self.max_batch, share) - 1
                taken += self._queue.take_batch_mates(first, limit, self.frame_tolerance)
            jobs = [job for job in taken if self._admit(job)]
            if not jobs:
                continue
            items = [(job.audio, job.request) for job in jobs]
            try:
                # The batch runs in its first job's context: its logs go to that decode's span.
                hypotheses = await loop.run_in_executor(
                    self._executor, jobs[0].observer.run, self.model.decode_batch, items
                )
            except Exception as exc:  # surfaced to every stream in the batch
                for job in jobs:
                    job.observer.failed(exc)
                    if not job.future.done():
                        job.future.set_exception(exc)
            else:
                for job, hypothesis in zip(jobs, hypotheses):
                    job.observer.finished(hypothesis)
                    if not job.future.done():
                        job.future.set_result(hypothesis)
