"""``data.name`` -> the builder for that dataset."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hybridpar.data.bundle import DataBundle, DataError, cfg_get
from hybridpar.data.embedded import build_embedded
from hybridpar.data.fake import build_fake
from hybridpar.data.imagenet import build_imagenet
from hybridpar.data.synthetic import build_synthetic

BUILDERS: dict[str, Callable[[Mapping[str, Any]], DataBundle]] = {
    "embedded": build_embedded,
    "imagenet": build_imagenet,
    "fake": build_fake,
    "synthetic": build_synthetic,
}


def build_datasets(cfg: Mapping[str, Any]) -> DataBundle:
    """Train and held-out datasets for ``cfg.name`` (default ``embedded``), checked before any worker starts."""
    name = cfg_get(cfg, "name", "embedded")
    if name not in BUILDERS:
        raise DataError(f"data.name={name!r} is not a known dataset; known: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](cfg)
