"""The data room: datasets (embedded MNIST, ImageNet, fake, synthetic) and the batching the hybrid needs.

``build_datasets(cfg)`` turns the ``data`` config into a ``DataBundle``; ``train_loader`` and
``eval_batches`` split it across workers so that the global batch, and the held-out metric, do not depend
on the world size.
"""

from hybridpar.data.build import build_datasets
from hybridpar.data.bundle import DataBundle, DataError
from hybridpar.data.imagenet import Lighting
from hybridpar.data.loaders import LOADERS, eval_batches, eval_steps, train_loader

__all__ = [
    "LOADERS",
    "DataBundle",
    "DataError",
    "Lighting",
    "build_datasets",
    "eval_batches",
    "eval_steps",
    "train_loader",
]
