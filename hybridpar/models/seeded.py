"""Seeded model construction that is safe with emulated workers.

Every worker builds the same full-size model from the same seed and keeps its slice. Emulated
workers are threads of one process and share torch's global generator, so construction holds a
process-wide lock and forks the RNG: the model depends on the seed alone, and the caller's
generator state is left untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
# Held while a model is built, traced (torch.fx patches nn.Module's attribute access process-wide
# while it traces) or cut into shards: emulated workers are threads, and one's module work must
# not run inside another's trace.
MODEL_LOCK = threading.RLock()


def build_seeded(factory: Callable[[], T], seed: int) -> T:
    with MODEL_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()
