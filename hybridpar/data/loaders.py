"""Batching for the hybrid: shuffled training batches and exact, uniformly shaped evaluation batches.

Training uses ``DistributedSampler``'s strided split of one seeded permutation: worker ``r`` takes positions
``r, r+W, ...``, so global step ``j`` (the union of every worker's ``j``-th batch) is permutation positions
``j*B .. (j+1)*B-1`` for global batch ``B`` whatever the world size. Evaluation must cover every held-out
example exactly once, yet every worker must bring the same batch shape to the model-parallel head, so short
batches are padded with zero images marked ``valid=False``.

Image folders (``ImageFiles``) take a second path through both: the sampler hands each worker process
``(index, epoch)`` keys, the dataset returns what stood in for any unreadable file, and the loader strips
that in the consuming process, so callers see the same ``(x, y)`` / ``(x, y, valid)`` batches while
``loader.skipped`` / ``batches.skipped`` count the examples whose file could not be read.

Two more sources give the same interface (``start_epoch``, ``(x, y)`` batches, ``skipped``; ``(x, y, valid)``
for evaluation) and the same per-epoch split: ``data=synthetic`` (a pool already on the device,
``synthetic.py``) and ``data.loader=dali`` for image folders (``dali.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate

from hybridpar.data.bundle import DataError, check_int
from hybridpar.data.imagenet import ImageFiles, Loaded, report_unreadable
from hybridpar.data.synthetic import SyntheticImages, SyntheticLoader, synthetic_eval_rows

LOADERS = ("torch", "dali")


def _check_rank(rank: int, world_size: int) -> None:
    check_int(world_size, "world_size")
    check_int(rank, "rank", minimum=0)
    if rank >= world_size:
        raise DataError(f"rank={rank} is not below world_size={world_size}")


class _Sampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way (a resumed run: the batches before
    ``start`` were trained on before the checkpoint), and for keyed datasets yields ``(index, epoch)``.

    The epoch must travel with the index. Persistent DataLoader worker processes hold the copy of the dataset
    made when they started (pickled under spawn/forkserver, copied on fork), so an epoch set on the dataset
    afterwards would never reach them; the sampler runs in the main process and its keys go to the workers
    with every batch, whatever the start method.
    """

    def __init__(self, *args: Any, keyed: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keyed = keyed
        self.start = 0  # indices of this worker's epoch list to leave out (whole batches)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        indices = list(super().__iter__())[self.start :]
        return iter([(i, epoch) for i in indices] if self.keyed else indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


class _Keyed(Dataset):
    """Maps a sampler's ``(index, epoch)`` key to ``ImageFiles.load`` with this loader's seed."""

    def __init__(self, dataset: ImageFiles, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Loaded | str:
        index, epoch = key
        try:
            return self.dataset.load(index, seed=self.seed, epoch=epoch)
        except DataError as exc:
            # Raised in a worker process, the loader would re-raise it wrapped in the worker's traceback (not one
            # line), and shutting down workers after an exception waits 5 s on each; handed back as data, the
            # consuming process raises it (``_stripped``) and the workers close as usual.
            return str(exc)


Batch = tuple[Tensor, Tensor, Tensor, list[tuple[str, str]]]  # images, labels, substituted rows, (path, reason)


def _collate_loaded(items: list[Loaded | str]) -> Batch | str:
    """Stack images and labels; keep the per-row substitution flags and the (path, reason) list as they are."""
    failed = next((item for item in items if isinstance(item, str)), None)
    if failed is not None:
        return failed
    images, labels, substituted, unreadable = zip(*items)
    bad = [entry for entries in unreadable for entry in entries]
    return default_collate(images), default_collate(labels), torch.tensor(substituted, dtype=torch.bool), bad


def _stripped(
    batches: Iterable[Batch | str], dataset: ImageFiles, counter: Any
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, substituted)`` from keyed batches; counts substituted rows on ``counter.skipped`` and logs
    each unreadable file here, in the consuming process (a worker's log lines would go nowhere under spawn)."""
    # No name but ``it`` may hold the DataLoader's iterator, and no ``for`` (it would keep one on the frame's
    # stack): the traceback of the DataError keeps this frame alive, and an iterator left in it would stop its
    # worker processes only when the garbage collector breaks the cycle, by which time its queues may be closed
    # first and each worker waits out its 5 s poll before it sees the end.
    it = iter(batches)
    del batches
    while (batch := next(it, None)) is not None:
        if isinstance(batch, str):
            del it  # the iterator's __del__ stops the workers now
            raise DataError(batch)
        x, y, substituted, unreadable = batch
        counter.skipped += int(substituted.sum())
        report_unreadable(dataset, unreadable)
        yield x, y, substituted


class _TrainLoader(DataLoader):
    """The loader ``train_loader`` returns.

    For a dataset with ``make_augmenter`` (embedded) it applies the (seed, epoch)-keyed batch augmenter in the
    consuming thread. For ``ImageFiles`` it drops the substitution details and keeps ``skipped``: the running
    total, over every epoch so far, of examples whose own file was unreadable (0 for other datasets).
    """

    skipped: int = 0

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Set the epoch (its permutation and augmentation) and leave out its first ``skip_batches``
        batches without loading them (resuming mid-epoch)."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = skip_batches * self.batch_size

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.dataset, _Keyed):
            try:
                for x, y, _ in _stripped(super().__iter__(), self.dataset.dataset, self):
                    yield x, y
            except DataError:
                # The error's traceback holds this frame and so the loader: drop its persistent workers now
                # rather than as long as someone keeps the error (a later epoch would start new ones).
                self._iterator = None
                raise
            return
        sampler = self.sampler
        make_augmenter = getattr(self.dataset, "make_augmenter", None)
        augment = make_augmenter(sampler.seed, sampler.epoch) if make_augmenter is not None else None
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
    loader: str = "torch",
    device: torch.device | str = "cpu",
) -> DataLoader:
    """Batches of ``local_batch`` for worker ``rank``; call ``loader.start_epoch(epoch)`` before each epoch.

    Each epoch every example is used at most once across all workers; the ``len(dataset) % (world_size *
    local_batch)`` left over after the last full global batch sit the epoch out (a different few each epoch).
    ``loader.skipped`` counts, over all epochs so far, the examples replaced because their file was unreadable.
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
    if _dali(loader, dataset):
        from hybridpar.data.dali import dali_train_loader

        return dali_train_loader(
            dataset, local_batch=local_batch, rank=rank, world_size=world_size, seed=seed, device=torch.device(device)
        )
    keyed = isinstance(dataset, ImageFiles)
    sampler = _Sampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True, keyed=keyed
    )
    if isinstance(dataset, SyntheticImages):  # already on the device: no DataLoader at all
        return SyntheticLoader(dataset, sampler, local_batch=local_batch, device=device)
    # Seeds the worker processes' global generators (any global-RNG transform), reproducibly per (seed, rank).
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    return _TrainLoader(
        _Keyed(dataset, seed) if keyed else dataset,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
        collate_fn=_collate_loaded if keyed else None,
    )


def eval_steps(n_examples: int, local_batch: int, world_size: int) -> int:
    """Batches every worker yields in ``eval_batches``: enough for the worker with the most examples."""
    check_int(n_examples, "n_examples", minimum=0)
    check_int(local_batch, "local_batch")
    check_int(world_size, "world_size")
    return math.ceil(math.ceil(n_examples / world_size) / local_batch)


def eval_batches(
    dataset: Dataset,
    *,
    local_batch: int,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    loader: str = "torch",
    device: torch.device | str = "cpu",
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, valid)`` batches of exactly ``local_batch`` rows over examples ``rank, rank+world_size, ...``.

    Every worker yields ``eval_steps(len(dataset), local_batch, world_size)`` batches; rows past a worker's
    real examples are zero images with label 0 and ``valid`` False, so counting only valid rows gives the
    exact held-out metric. An example whose file is unreadable gets a stand-in row, also ``valid`` False (it
    would otherwise count the stand-in twice); ``.skipped`` on the returned iterator counts them.
    """
    check_int(local_batch, "local_batch")
    _check_rank(rank, world_size)
    check_int(num_workers, "num_workers", minimum=0)
    n = len(dataset)
    if n == 0:
        raise DataError("the held-out set is empty; nothing to evaluate")
    if isinstance(dataset, SyntheticImages):
        rows = synthetic_eval_rows(dataset, local_batch=local_batch, rank=rank, world_size=world_size, device=device)
        return _padded(rows, dataset, local_batch, eval_steps(n, local_batch, world_size))
    if _dali(loader, dataset):
        from hybridpar.data.dali import dali_eval_batches

        return dali_eval_batches(
            dataset, local_batch=local_batch, rank=rank, world_size=world_size, device=torch.device(device)
        )
    return EvalBatches(dataset, local_batch, rank, world_size, num_workers)


def _dali(loader: str, dataset: Dataset) -> bool:
    """Whether ``data.loader`` asks for DALI; it reads image files, so only ImageNet-style folders qualify."""
    if loader not in LOADERS:
        raise DataError(f"data.loader={loader!r} is not a known loader; known: {', '.join(LOADERS)}")
    if loader == "dali" and not isinstance(dataset, ImageFiles):
        raise DataError("data.loader=dali reads image folders: it needs data=imagenet")
    return loader == "dali"


class EvalBatches(Iterator[tuple[Tensor, Tensor, Tensor]]):
    """What ``eval_batches`` returns: its batches, and ``skipped``, the number so far of this worker's held-out
    examples whose file was unreadable (complete once the iterator is exhausted; 0 for in-memory data)."""

    def __init__(self, dataset: Dataset, local_batch: int, rank: int, world_size: int, num_workers: int):
        self.skipped = 0
        n = len(dataset)
        steps = eval_steps(n, local_batch, world_size)
        if isinstance(dataset, ImageFiles):
            # Epoch 0 of seed 0: the evaluation transform draws nothing, the key only names the example.
            keys = [(i, 0) for i in range(rank, n, world_size)]
            loader = DataLoader(
                _Keyed(dataset, 0),
                batch_size=local_batch,
                sampler=keys,
                num_workers=num_workers,
                collate_fn=_collate_loaded,
            )
            rows = _stripped(loader, dataset, self)
        else:
            mine = Subset(dataset, range(rank, n, world_size))
            loader = DataLoader(mine, batch_size=local_batch, shuffle=False, num_workers=num_workers)
            rows = ((x, y, torch.zeros(len(y), dtype=torch.bool)) for x, y in loader)
        self._batches = _padded(rows, dataset, local_batch, steps)

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        return next(self._batches)


def _padded(
    rows: Iterator[tuple[Tensor, Tensor, Tensor]], dataset: Dataset, local_batch: int, steps: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, valid)`` of exactly ``local_batch`` rows, ``steps`` of them, from ``(x, y, substituted)`` rows."""
    x_like: Tensor | None = None
    y_like: Tensor | None = None
    done = 0
    for x, y, substituted in rows:
        k = len(y)
        valid = torch.arange(local_batch) < k
        valid[:k] &= ~substituted
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
