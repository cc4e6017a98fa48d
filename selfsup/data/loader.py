"""Batches from a `Source`: the endless, resumable training stream (`Loader`, its order a function
of (seed, epoch) alone, one process's slice of each global batch) and one ordered, padded pass
for evaluation (`eval_batches`). Undecodable images are skipped and counted.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from selfsup.data.sources import DecodeError, Source
from selfsup.errors import UserError

_log = logging.getLogger(__name__)
_PREFETCH = 3  # batches decoded ahead of the consumer
_MAX_WARNINGS = 10  # per reader: a damaged dataset must not bury everything else in warnings
_PROBE = 32  # examples read by `check_decodes`


class _Reader:
    """Reads examples; None for an undecodable one, remembered and warned about once (the first
    `_MAX_WARNINGS` of them; the rest are only counted)."""

    def __init__(self, source: Source):
        self.source, self._bad, self._lock = source, set(), threading.Lock()

    def get(self, index: int) -> tuple[np.ndarray, int] | None:
        if index in self._bad:
            return None
        try:
            return self.source[index]
        except DecodeError as err:
            with self._lock:
                first = index not in self._bad
                self._bad.add(index)
                count = len(self._bad)
            if first and count <= _MAX_WARNINGS:
                more = "; further ones are skipped silently" if count == _MAX_WARNINGS else ""
                _log.warning("skipping undecodable image (index %d): %s%s", index, err, more)
            return None


def check_decodes(source: Source, what: str) -> None:
    """UserError unless at least one of the first `_PROBE` examples decodes: a truncated or
    damaged data file is then reported before anything compiles, in one line."""
    first_error = None
    for index in range(min(len(source), _PROBE)):
        try:
            source[index]
            return
        except DecodeError as err:
            first_error = first_error or err
    if first_error is not None:
        cause = str(first_error).splitlines()[0][:300]
        raise UserError(
            f"{what}: none of the first {min(len(source), _PROBE)} images decodes ({cause}); "
            "the data file may be truncated or damaged: check or rebuild it"
        )


def first_decodable(source: Source, count: int) -> tuple[np.ndarray, int]:
    """(uint8 [n, S, S, 3], skipped): the images of the first `count` decodable examples in index
    order (n < count only if the split has fewer), and how many undecodable ones were skipped on
    the way (each warned about once, as the Loader does)."""
    reader, images, skipped = _Reader(source), [], 0
    for index in range(len(source)):
        if len(images) == count:
            break
        example = reader.get(index)
        if example is None:
            skipped += 1
        else:
            images.append(example[0])
    if not images:
        raise UserError(f"none of the {len(source)} images in the dataset decodes; check the data")
    return np.stack(images), skipped


def _collate(examples: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    images = np.stack([image for image, _ in examples])
    return {"image": images, "label": np.asarray([label for _, label in examples], np.int32)}


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(
            f"batch size {global_batch_size} must be a positive multiple of the process count "
            f"{process_count}; change config.batch_size"
        )
    return global_batch_size // process_count


def _prefetch(
    make_batch: Callable[[int, ThreadPoolExecutor], dict], steps: Iterable[int], num_threads: int
) -> Iterator[dict]:
    """Yields make_batch(step, pool) for each step, built ahead in a background thread.

    Closing (or garbage-collecting) the generator stops and joins the thread.
    """
    out: queue.Queue = queue.Queue(maxsize=_PREFETCH)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            with ThreadPoolExecutor(num_threads, thread_name_prefix="selfsup-decode") as pool:
                for step in steps:
                    if not put(make_batch(step, pool)):
                        return
            put(end)
        except BaseException as err:  # re-raised in the consumer
            put(err)

    thread = threading.Thread(target=produce, name="selfsup-prefetch", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class Loader:
    """Training batches: an endless stream, resumable at any step, the same on every host count.

    Global batch b holds positions [k*G, (k+1)*G) of `epoch_order(b // steps_per_epoch)`, with
    k = b % steps_per_epoch and G the global batch size (the last partial batch of an epoch is
    dropped). This process gets rows [pid*L, (pid+1)*L) of it, L = G / process_count.
    """

    def __init__(
        self,
        source: Source,
        global_batch_size: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = 8,
    ):
        self.local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
        self.steps_per_epoch = len(source) // global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the split has {len(source)} examples, fewer than one batch of "
                f"{global_batch_size}; lower config.batch_size"
            )
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise UserError(f"seed {seed!r} must be a non-negative int")
        self.source, self.global_batch_size, self.seed = source, global_batch_size, int(seed)
        self.process_index, self.num_threads = process_index, max(1, num_threads)
        self._reader = _Reader(source)
        self._skipped = 0

    @property
    def skipped(self) -> int:
        """Rows of the batches yielded so far (this process) whose own example was undecodable
        and was replaced by the next decodable one in the epoch order."""
        return self._skipped

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [len(source)]: a permutation of range(len(source)), a function of (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

    def _example_at(self, order: np.ndarray, position: int) -> tuple[tuple[np.ndarray, int], bool]:
        """(example, replaced): the first decodable at `position`, position + 1, ... (wrapping)."""
        n = len(order)
        for offset in range(n):
            example = self._reader.get(int(order[(position + offset) % n]))
            if example is not None:
                return example, offset > 0
        raise UserError(f"none of the {n} images in the dataset decodes; check the data")

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches from global step `start_step` on (the data position saved in checkpoints):
        {"image": uint8 [L, S, S, 3], "label": int32 [L]}."""
        if start_step < 0:
            raise ValueError(f"start_step {start_step} < 0")
        g, lb = self.global_batch_size, self.local_batch_size
        current: dict[str, Any] = {"epoch": None}

        def make(step: int, pool: ThreadPoolExecutor) -> tuple[dict, int]:
            epoch, k = divmod(step, self.steps_per_epoch)
            if current["epoch"] != epoch:
                current.update(epoch=epoch, order=self.epoch_order(epoch))
            order, first = current["order"], k * g + self.process_index * lb
            rows = list(pool.map(lambda p: self._example_at(order, p), range(first, first + lb)))
            return _collate([example for example, _ in rows]), sum(r for _, r in rows)

        return self._counted(_prefetch(make, itertools.count(start_step), self.num_threads))

    def _counted(self, batches: Iterator[tuple[dict, int]]) -> Iterator[dict[str, np.ndarray]]:
        # Counted as batches are handed out, not as prefetched, so `skipped` is exact.
        with contextlib.closing(batches):
            for batch, replaced in batches:
                self._skipped += replaced
                yield batch


def eval_batches(
    source: Source,
    global_batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 8,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over the split: ceil(N / G) batches of
    {"image": uint8 [L, S, S, 3], "label": int32 [L], "valid": bool [L]}.

    Rows past the end (zero images, label 0) and undecodable images have valid = False. Every
    process gets the same number of batches, each its rows [pid*L, (pid+1)*L) of the global one.
    """
    lb = _local_batch_size(global_batch_size, process_index, process_count)
    n, reader = len(source), _Reader(source)
    blank = (np.zeros((source.image_size,) * 2 + (3,), np.uint8), 0)

    def make(step: int, pool: ThreadPoolExecutor) -> dict:
        first = step * global_batch_size + process_index * lb
        rows = list(pool.map(lambda i: reader.get(i) if i < n else None, range(first, first + lb)))
        batch = _collate([blank if row is None else row for row in rows])
        batch["valid"] = np.asarray([row is not None for row in rows])
        return batch

    return _prefetch(make, range(-(-n // global_batch_size)), max(1, num_threads))
