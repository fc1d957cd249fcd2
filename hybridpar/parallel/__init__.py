"""Parallel layout: the data-parallel trunk, the model-parallel head, the hybrid step."""

from hybridpar.parallel.hybrid import HybridModel, assemble, global_mean_loss
from hybridpar.parallel.linear import ColumnParallelLinear, RowParallelLinear, ShardSpec, WorkerDropout

__all__ = [
    "ColumnParallelLinear",
    "HybridModel",
    "RowParallelLinear",
    "ShardSpec",
    "WorkerDropout",
    "assemble",
    "global_mean_loss",
]
