"""Batch samplers: lists of dataset indices by duration buckets or of a fixed size, sharded over
ranks, with a resumable position (``state_dict()``).

Shapes: B batch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class DurationBatchSampler:
    """Lists of dataset indices, each holding at most ``max_duration`` seconds of audio (or
    exactly ``batch_size`` utterances when that is given).

    Training: utterances are split into ``num_buckets`` equal-count duration buckets, each
    bucket is shuffled and cut into batches, and the batches are shuffled, all from
    (seed, epoch). With W ranks, duration batches are dealt out (rank r takes batches r, r + W,
    ... of a list cut to a multiple of W, so every rank runs the same number of steps);
    fixed-size batches are cut W times larger and rank r takes the r-th slice of each, so the
    utterances of a step are the same whatever W (bar bucket remainders of fewer than W
    utterances, which W ranks cannot share and drop). Evaluation: longest first (a memory problem
    shows at once), no shuffling, nothing dropped (ranks may differ by one batch).

    The position inside the epoch is part of :meth:`state_dict`, so a run resumed from a
    checkpoint continues with exactly the next batch.
    """

    def __init__(
        self,
        durations: Sequence[float],
        *,
        max_duration: float | None = None,
        batch_size: int | None = None,
        num_buckets: int = 8,
        training: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size is None and (max_duration is None or max_duration <= 0):
            raise ValueError(f"give max_duration > 0 (seconds per batch) or batch_size, got "
                             f"max_duration={max_duration}, batch_size={batch_size}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.durations = np.asarray(durations, dtype=np.float64)
        self.max_duration = max_duration
        self.batch_size = batch_size
        self.num_buckets = max(1, num_buckets)
        self.training = training
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._position = 0  # batches of this epoch already consumed
        self._resume = False  # the next pass starts at _position instead of 0
        self._tracked = False  # the loader, not the iterator, advances _position
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self._position, self._resume = epoch, 0, False

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches()
        start = self._position if self._resume else 0
        self._resume = False
        self._position = start
        for i in range(start, len(batches)):
            if not self._tracked:
                self._position = i + 1
            yield batches[i]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self._position, "seed": self.seed,
                "num_utterances": len(self.durations), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off: the next pass starts at its position."""
        now = (self.seed, len(self.durations), self.world_size)
        saved = (state.get("seed", now[0]), state.get("num_utterances", now[1]),
                 state.get("world_size", now[2]))
        if saved != now:
            warnings.warn(f"resuming batches with other data or settings: (seed, utterances, "
                          f"world size) was {saved}, is {now}; the batch order will not match "
                          "the original run", stacklevel=2)
        self.epoch = int(state["epoch"])
        self._position = min(int(state["position"]), len(self._epoch_batches()))
        self._resume = True

    @contextlib.contextmanager
    def tracked_by_consumer(self) -> Iterator[int]:
        """While active, the position counts batches the consumer received (through
        :meth:`advance`), not those handed to DataLoader workers that prefetch ahead.
        Yields the position the next pass starts at."""
        self._tracked = True
        try:
            yield self._position if self._resume else 0
        finally:
            self._tracked = False

    def advance(self) -> None:
        self._position += 1

    def _epoch_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._make_batches())
        return self._cache[1]

    def _make_batches(self) -> list[list[int]]:
        if not self.training:
            order = np.argsort(-self.durations, kind="stable")
            return self._pack(order, self.batch_size)[self.rank :: self.world_size]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.argsort(self.durations, kind="stable")
        # Fixed-size batches are cut at the global size (batch_size per rank x world size) and
        # each rank takes its slice, so a step's utterances do not depend on the number of ranks.
        size = None if self.batch_size is None else self.batch_size * self.world_size
        batches: list[list[int]] = []
        for bucket in np.array_split(order, min(self.num_buckets, max(len(order), 1))):
            batches += self._pack(rng.permutation(bucket), size)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.batch_size is not None:
            mine = [np.array_split(b, self.world_size)[self.rank].tolist()
                    for b in batches if len(b) >= self.world_size]
        else:
            usable = len(batches) // self.world_size * self.world_size
            mine = batches[self.rank : usable : self.world_size]
        if not mine:
            raise ValueError(f"{len(batches)} batch(es) of data for {self.world_size} ranks: "
                             "lower max_duration / batch_size or add data")
        return mine

    def _pack(self, indices: np.ndarray, batch_size: int | None) -> list[list[int]]:
        if batch_size is not None:
            return [indices[i : i + batch_size].tolist()
                    for i in range(0, len(indices), batch_size)]
        batches, current, total = [], [], 0.0
        for i in indices.tolist():
            if current and total + self.durations[i] > self.max_duration:
                batches.append(current)
                current, total = [], 0.0
            current.append(i)
            total += self.durations[i]
        if current:
            batches.append(current)
        return batches
