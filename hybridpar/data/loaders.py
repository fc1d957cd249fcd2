"""Batching for the hybrid: shuffled training batches and exact, uniformly shaped evaluation batches.

Training uses ``DistributedSampler``'s strided split of one seeded permutation: worker ``r`` takes positions
``r, r+W, ...``, so global step ``j`` (the union of every worker's ``j``-th batch) is permutation positions
``j*B .. (j+1)*B-1`` for global batch ``B`` whatever the world size. Evaluation must cover every held-out
example exactly once, yet every worker must bring the same batch shape to the model-parallel head, so short
batches are padded with zero images marked ``valid=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from hybridpar.data.bundle import DataError, check_int


def _check_rank(rank: int, world_size: int) -> None:
    check_int(world_size, "world_size")
    check_int(rank, "rank", minimum=0)
    if rank >= world_size:
        raise DataError(f"rank={rank} is not below world_size={world_size}")


class _AugmentingLoader(DataLoader):
    """Applies the dataset's (seed, epoch)-keyed batch augmenter in the consuming thread."""

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        augment = self.dataset.make_augmenter(sampler.seed, sampler.epoch)
        batches = super().__iter__()
        if augment is None:
            yield from batches
            return
        # The sampler is deterministic for a given epoch and the loader keeps batch order, so batch j holds
        # exactly these indices.
        order = torch.tensor(list(sampler), dtype=torch.long)
        b = self.batch_size
        for j, (x, y) in enumerate(batches):
            x = augment(x, order[j * b : (j + 1) * b])
            yield (x.pin_memory() if self.pin_memory else x), y


def train_loader(
    dataset: Dataset,
    *,
    local_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of ``local_batch`` for worker ``rank``; call ``loader.sampler.set_epoch(epoch)`` before each epoch.

    Each epoch every example is used at most once across all workers; the ``len(dataset) % (world_size *
    local_batch)`` left over after the last full global batch sit the epoch out (a different few each epoch).
    """
    check_int(local_batch, "local_batch")
    _check_rank(rank, world_size)
    check_int(seed, "seed", minimum=0)
    check_int(num_workers, "num_workers", minimum=0)
    global_batch = world_size * local_batch
    if len(dataset) < global_batch:
        raise DataError(
            f"the training set has {len(dataset)} examples, fewer than one global batch "
            f"(world_size={world_size} x local_batch={local_batch} = {global_batch})"
        )
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Seeds the worker processes' global generators (torchvision transforms), reproducibly per (seed, rank).
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    loader_cls = _AugmentingLoader if hasattr(dataset, "make_augmenter") else DataLoader
    return loader_cls(
        dataset,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
    )


def eval_steps(n_examples: int, local_batch: int, world_size: int) -> int:
    """Batches every worker yields in ``eval_batches``: enough for the worker with the most examples."""
    check_int(n_examples, "n_examples", minimum=0)
    check_int(local_batch, "local_batch")
    check_int(world_size, "world_size")
    return math.ceil(math.ceil(n_examples / world_size) / local_batch)


def eval_batches(
    dataset: Dataset, *, local_batch: int, rank: int, world_size: int, num_workers: int = 0
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, valid)`` batches of exactly ``local_batch`` rows over examples ``rank, rank+world_size, ...``.

    Every worker yields ``eval_steps(len(dataset), local_batch, world_size)`` batches; rows past a worker's
    real examples are zero images with label 0 and ``valid`` False, so counting only valid rows gives the
    exact held-out metric.
    """
    check_int(local_batch, "local_batch")
    _check_rank(rank, world_size)
    check_int(num_workers, "num_workers", minimum=0)
    n = len(dataset)
    if n == 0:
        raise DataError("the held-out set is empty; nothing to evaluate")
    steps = eval_steps(n, local_batch, world_size)
    mine = Subset(dataset, range(rank, n, world_size))
    loader = DataLoader(mine, batch_size=local_batch, shuffle=False, num_workers=num_workers)
    return _padded(loader, dataset, local_batch, steps)


def _padded(
    loader: DataLoader, dataset: Dataset, local_batch: int, steps: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    x_like: Tensor | None = None
    y_like: Tensor | None = None
    done = 0
    for x, y in loader:
        k = len(y)
        valid = torch.arange(local_batch) < k
        if k < local_batch:
            x = torch.cat([x, x.new_zeros((local_batch - k, *x.shape[1:]))])
            y = torch.cat([y, y.new_zeros(local_batch - k)])
        x_like, y_like = x, y
        done += 1
        yield x, y, valid
    if done < steps:
        if x_like is None:  # this worker has no real examples at all: take the shape from example 0
            image, label = dataset[0]
            x_like = torch.as_tensor(image).unsqueeze(0)
            y_like = torch.as_tensor(label).unsqueeze(0)
        x = x_like.new_zeros((local_batch, *x_like.shape[1:]))
        y = y_like.new_zeros(local_batch)
        valid = torch.zeros(local_batch, dtype=torch.bool)
        for _ in range(steps - done):
            yield x.clone(), y.clone(), valid.clone()
