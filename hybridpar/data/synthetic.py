"""Batches that cost nothing to load: the step's own speed, end to end, with no loader in the way.

``data=fake`` still decodes nothing but builds every image as a PIL picture in loader worker processes and
copies each batch to the device: on a fast GPU that, not the step, sets the pace. ``data=synthetic`` draws
its examples once, with a fixed seed, straight on the device the worker trains on, and every batch is a
gather from that pool on the same device: no PIL, no worker processes, no host-to-device copy.

The epoch keeps the torch loader's meaning (``loaders._Sampler``): one permutation of the pool per epoch,
seeded by ``seed + epoch``, worker ``r`` taking positions ``r, r+W, ...`` in whole batches, so the global
batch of step ``j`` is the same examples whatever the world size, and a resumed run restarts at a batch.
The labels are learnable (a class's images share a mean pattern under the noise), so a run on synthetic data
shows a falling loss and a throughput, not a model worth keeping.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hybridpar.data.bundle import DataBundle, cfg_get, check_int


class SyntheticImages(Dataset):
    """``size`` images ``3×image_size×image_size`` and labels drawn from ``seed``, made on a device at first use.

    Emulated workers are threads of one process: they share one pool per device (made once, under a
    lock, read only afterwards) instead of each holding a copy.
    """

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int, split: int = 0):
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.seed, self.split = seed, split  # split 0 trains, 1 is held out: other examples, the same classes
        self._pools: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.size

    def pool(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Every image and label of the set, on ``device``; the same values on every device type."""
        device = torch.device(device)
        with self._lock:
            if device not in self._pools:
                self._pools[device] = self._make(device)
            return self._pools[device]

    def _make(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Drawn on the CPU a slice at a time (same numbers on any device, no CPU copy of the whole set kept),
        # then moved: a device generator's stream would differ between CPU and CUDA.
        s, c = self.image_size, self.num_classes
        # One low-frequency pattern per class (8×8, upsampled) under unit noise: learnable, cheap to make.
        # The patterns come from the seed alone, so held-out examples show the classes the training set shows.
        patterns = torch.randn(c, 3, 8, 8, generator=torch.Generator().manual_seed(self.seed))
        key = np.random.SeedSequence([self.seed, self.split]).generate_state(1, dtype=np.uint64)[0]
        g = torch.Generator().manual_seed(int(key))
        labels = torch.randint(0, c, (self.size,), generator=g)
        images = torch.empty(self.size, 3, s, s, device=device)
        chunk = 64
        for i in range(0, self.size, chunk):
            y = labels[i : i + chunk]
            base = torch.nn.functional.interpolate(patterns[y], size=(s, s), mode="nearest")
            noise = torch.randn(len(y), 3, s, s, generator=g)
            images[i : i + chunk] = (0.5 * base + noise).to(device)
        return images, labels.to(device)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        images, labels = self.pool(torch.device("cpu"))
        return images[index], int(labels[index])


def build_synthetic(cfg: Mapping[str, Any]) -> DataBundle:
    size = check_int(cfg_get(cfg, "size", 1024), "data.size")
    val_size = check_int(cfg_get(cfg, "val_size", 256), "data.val_size")
    num_classes = check_int(cfg_get(cfg, "num_classes", 1000), "data.num_classes")
    s = check_int(cfg_get(cfg, "image_size", 224), "data.image_size")
    seed = check_int(cfg_get(cfg, "seed", 0), "data.seed", minimum=0)
    train = SyntheticImages(size, s, num_classes, seed, split=0)
    val = SyntheticImages(val_size, s, num_classes, seed, split=1)
    return DataBundle(train=train, val=val, num_classes=num_classes, in_channels=3, image_size=s)


class SyntheticLoader:
    """``train_loader``'s interface over a device pool: ``start_epoch``, iteration, ``skipped`` (always 0).
    The order is the torch loader's own sampler's (``sampler``), so both split an epoch the same way."""

    skipped = 0

    def __init__(self, dataset: SyntheticImages, sampler, *, local_batch: int, device):
        self.sampler, self.batch_size = sampler, local_batch
        self.images, self.labels = dataset.pool(torch.device(device))

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.sampler.start = skip_batches * self.batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        mine, b = torch.tensor(list(self.sampler), device=self.images.device), self.batch_size
        for j in range(len(mine) // b):
            idx = mine[j * b : (j + 1) * b]
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)


def synthetic_eval_rows(
    dataset: SyntheticImages, *, local_batch: int, rank: int, world_size: int, device
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, substituted)`` rows of examples ``rank, rank+W, ...`` of the pool on ``device``, in batches of
    ``local_batch`` (the last one short); ``eval_batches`` pads them as it pads every dataset's."""
    images, labels = dataset.pool(torch.device(device))
    mine = torch.arange(rank, len(dataset), world_size, device=images.device)
    for idx in mine.split(local_batch):
        yield images.index_select(0, idx), labels.index_select(0, idx), torch.zeros(len(idx), dtype=torch.bool)
