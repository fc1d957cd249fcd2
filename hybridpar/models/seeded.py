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
_LOCK = threading.Lock()


def build_seeded(factory: Callable[[], T], seed: int) -> T:
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()
