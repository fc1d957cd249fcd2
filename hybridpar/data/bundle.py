"""What every dataset hands the trainer, the one error the data room raises, and its config checks.

Config values arrive from Hydra or from a plain dict; each is checked here, once, so a typo fails with one
line naming the key instead of deep inside a transform or, worse, after the workers have started talking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from hybridpar.errors import HybridparError


@dataclass(frozen=True)
class DataBundle:
    """Train and held-out data plus the three numbers the model is built from."""

    train: Dataset  # items are (float32 image C×H×W, int label)
    val: Dataset
    num_classes: int
    in_channels: int
    image_size: int  # side of the square images the model receives


class DataError(HybridparError):
    """Data that cannot be found, read, split or batched as configured."""


def cfg_get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    # OmegaConf hands back None for a mandatory "???" value; a plain dict hands back the string.
    return default if value is None or value == "???" else value


def check_int(value: Any, what: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise DataError(f"{what} must be {kind}, got {value!r}")
    return value


def check_float(value: Any, what: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise DataError(f"{what} must be a number >= {minimum}, got {value!r}")
    return float(value)
