"""Decoding ahead of training in worker processes, in exactly the order (and with exactly the content) of the
serial path.

:func:`ordered_prefetch` runs a picklable function over a stream of keys in ``torch.utils.data.DataLoader`` worker
processes and yields the results in key order; every random choice of a sample is already fixed by its plan
(see :mod:`.dataset`), so workers change nothing but speed. Workers hand back uint8 frames, 4x smaller than float
pixels, through shared memory; the conversion to pixels happens in the calling process.

Keys are read lazily, at most ``num_workers * prefetch_factor`` ahead of the consumer, so an endless stream of
keys (such as :func:`batch_refs`) keeps the same worker processes across epochs. Closing the returned generator
(or dropping it) stops the workers.
"""

from __future__ import annotations

import functools
import signal
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from torch.utils.data import DataLoader, Dataset

from .dataset import Batch, Sample, SamplePlan, VideoDataset, collate, frames_to_pixels

K = TypeVar("K")
T = TypeVar("T")


class _Mapped(Dataset):
    """A map-style dataset whose "index" is any key: ``dataset[key] = fn(key)``."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __getitem__(self, key):
        return self.fn(key)


def _as_is(result):
    return result


def _ignore_stop_signals(worker_id: int) -> None:
    """Worker processes leave stopping to the training process: a Ctrl-C or a (torchrun-forwarded) SIGTERM reaches
    them too, and killed workers would fail the run while it finishes its step and writes the resumable state. They
    end when the stream is closed, or with their parent (DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def ordered_prefetch(
    fn: Callable[[K], T], keys: Iterable[K], num_workers: int, prefetch_factor: int = 2
) -> Iterator[T]:
    """``fn(key)`` for each key, in order. ``num_workers`` 0 calls ``fn`` in this process when the consumer asks;
    more runs it in that many worker processes, up to ``num_workers * prefetch_factor`` keys ahead.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one) when workers are used.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        yield from map(fn, keys)
        return
    loader = DataLoader(
        _Mapped(fn),
        sampler=keys,
        batch_size=None,  # each key is one item: no automatic batching
        collate_fn=_as_is,  # keep numpy arrays and dataclasses as they are
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        worker_init_fn=_ignore_stop_signals,
    )
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator  # the last reference: its workers stop now, not whenever the garbage collector runs


def _decode_batch(dataset: VideoDataset, epoch: int, sample_ids: Sequence[int]) -> list[tuple[SamplePlan, np.ndarray]]:
    plans = [dataset.plan(s, epoch) for s in sample_ids]
    return [(plan, dataset.frames(plan)) for plan in plans]


def prefetching_batches(
    dataset: VideoDataset, batches: Sequence[Sequence[int]], epoch: int, num_workers: int
) -> Iterator[Batch]:
    """The :class:`Batch` of each list of sample ids in ``batches`` (e.g. ``dataset.batches(epoch, n)[pos:]``), in
    order, decoded ``num_workers`` processes ahead; identical to ``collate([dataset.load(s, epoch) for s in ids])``.
    """
    load = functools.partial(_decode_batch, dataset, epoch)
    for decoded in ordered_prefetch(load, batches, num_workers):
        yield collate(
            [Sample(frames_to_pixels(f), p.caption, p.is_regularization, str(p.source)) for p, f in decoded]
        )


@dataclass(frozen=True)
class BatchRef:
    """One batch of a run: ``dataset.batches(epoch, batch_size)[position] == sample_ids``."""

    epoch: int
    position: int
    sample_ids: tuple[int, ...]


def batch_refs(dataset: VideoDataset, batch_size: int, epoch: int = 0, position: int = 0) -> Iterator[BatchRef]:
    """Every batch from ``(epoch, position)`` on, epoch after epoch, without end.

    A position at or past the end of its epoch starts the next epoch (as a resumed run's saved position may be).
    """
    while True:
        batches = dataset.batches(epoch, batch_size)
        for pos in range(position, len(batches)):
            yield BatchRef(epoch, pos, tuple(batches[pos]))
        epoch, position = epoch + 1, 0
