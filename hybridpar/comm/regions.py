"""Differentiable moves of activations between workers, one autograd Function per pattern.

Each Function's forward and backward are mirror images (Megatron's mappings): gathering a
tensor's parts in the forward sums the gradient back onto the parts in the backward, and an
all-to-all that re-shards rows into columns re-shards the gradient's columns into rows.

Names say what happens to the tensor's *layout* on this worker:
``batch`` = this worker's own examples, all features; ``features`` = all examples of the
group, this worker's slice of the features. A group of one returns its input untouched, so the
single-device path runs the same code.

Why not ``torch.distributed._functional_collectives``: they address a registered
ProcessGroup, which the in-process emulation is not, and they would move bytes the ledger does
not see (uneven splits are not the reason: their ``all_to_all_single`` takes split sizes). These
Functions call the :class:`~hybridpar.comm.base.Communicator`, so both backends, and the byte
ledger, see every move. Every Function keeps the same state: ``ctx.comm`` and ``ctx.args``, the
arguments of its backward's move.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd import Function

from hybridpar.comm.base import Communicator


class _GatherBatch(Function):
    @staticmethod
    def forward(ctx, x, comm, sizes, tag):
        ctx.comm, ctx.args = comm, (0, sizes, tag + ".grad")
        return comm.all_gather(x, 0, sizes, tag)

    @staticmethod
    def backward(ctx, g):
        # Each example's gradient, summed over all workers' shards, returns to its owner.
        return ctx.comm.reduce_scatter(g.contiguous(), *ctx.args), None, None, None


class _ScatterBatch(Function):
    @staticmethod
    def forward(ctx, x, comm, sizes, tag):
        ctx.comm, ctx.args = comm, (0, sizes, tag + ".grad")
        return comm.reduce_scatter(x.contiguous(), 0, sizes, tag)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.all_gather(g.contiguous(), *ctx.args), None, None, None


class _GatherFeatures(Function):
    @staticmethod
    def forward(ctx, x, comm, sizes, tag):
        ctx.comm, ctx.args = comm, (1, sizes, tag + ".grad")
        return comm.all_gather(x, 1, sizes, tag)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.reduce_scatter(g.contiguous(), *ctx.args), None, None, None


class _ReduceScatterFeatures(Function):
    @staticmethod
    def forward(ctx, x, comm, sizes, tag):
        ctx.comm, ctx.args = comm, (1, sizes, tag + ".grad")
        return comm.reduce_scatter(x.contiguous(), 1, sizes, tag)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.all_gather(g.contiguous(), *ctx.args), None, None, None


def rows_to_columns_chunks(x, rank: int, batch_sizes, feature_sizes):
    """What to send and expect to turn (own rows, all columns) into (all rows, own columns):
    column slice j goes to worker j; worker i's rows arrive. Concatenate what arrives along dim 0."""
    send = [c.contiguous() for c in x.split(feature_sizes, 1)]
    return send, [torch.Size((bs, feature_sizes[rank])) for bs in batch_sizes]


def columns_to_rows_chunks(x, rank: int, batch_sizes, feature_sizes):
    """The mirror: (all rows, own columns) -> (own rows, all columns); concatenate along dim 1."""
    send = [c.contiguous() for c in x.split(batch_sizes, 0)]
    return send, [torch.Size((batch_sizes[rank], fs)) for fs in feature_sizes]


def _rows_to_columns(x, comm: Communicator, batch_sizes, feature_sizes, tag):
    return torch.cat(comm.all_to_all(*rows_to_columns_chunks(x, comm.rank, batch_sizes, feature_sizes), tag), 0)


def _columns_to_rows(x, comm: Communicator, batch_sizes, feature_sizes, tag):
    return torch.cat(comm.all_to_all(*columns_to_rows_chunks(x, comm.rank, batch_sizes, feature_sizes), tag), 1)


class _BatchToFeatures(Function):
    @staticmethod
    def forward(ctx, x, comm, batch_sizes, feature_sizes, tag):
        ctx.comm, ctx.args = comm, (batch_sizes, feature_sizes, tag + ".grad")
        return _rows_to_columns(x, comm, batch_sizes, feature_sizes, tag)

    @staticmethod
    def backward(ctx, g):
        return _columns_to_rows(g, ctx.comm, *ctx.args), None, None, None, None


class _FeaturesToBatch(Function):
    @staticmethod
    def forward(ctx, x, comm, batch_sizes, feature_sizes, tag):
        ctx.comm, ctx.args = comm, (batch_sizes, feature_sizes, tag + ".grad")
        return _columns_to_rows(x, comm, batch_sizes, feature_sizes, tag)

    @staticmethod
    def backward(ctx, g):
        return _rows_to_columns(g, ctx.comm, *ctx.args), None, None, None, None


def gather_batch(x: torch.Tensor, comm: Communicator, batch_sizes: Sequence[int], tag: str = "batch") -> torch.Tensor:
    """Own examples -> every worker holds all examples (all-gather; backward reduce-scatter)."""
    return x if comm.world_size == 1 else _GatherBatch.apply(x, comm, list(batch_sizes), tag)


def scatter_batch(x: torch.Tensor, comm: Communicator, batch_sizes: Sequence[int], tag: str = "batch") -> torch.Tensor:
    """Partial sums over all examples -> each owner holds the full sum of its examples
    (reduce-scatter; backward all-gather)."""
    return x if comm.world_size == 1 else _ScatterBatch.apply(x, comm, list(batch_sizes), tag)


def gather_features(
    x: torch.Tensor, comm: Communicator, feature_sizes: Sequence[int], tag: str = "features"
) -> torch.Tensor:
    """Own feature slice -> all features (all-gather along dim 1; backward reduce-scatter)."""
    return x if comm.world_size == 1 else _GatherFeatures.apply(x, comm, list(feature_sizes), tag)


def reduce_scatter_features(
    x: torch.Tensor, comm: Communicator, feature_sizes: Sequence[int], tag: str = "features"
) -> torch.Tensor:
    """Partial sums of all features -> own feature slice of the full sum (backward all-gather)."""
    return x if comm.world_size == 1 else _ReduceScatterFeatures.apply(x, comm, list(feature_sizes), tag)


def batch_to_features(
    x: torch.Tensor, comm: Communicator, batch_sizes: Sequence[int], feature_sizes: Sequence[int], tag: str = "batch"
) -> torch.Tensor:
    """Own examples, all features -> all examples, own feature slice (all-to-all both ways)."""
    if comm.world_size == 1:
        return x
    return _BatchToFeatures.apply(x, comm, list(batch_sizes), list(feature_sizes), tag)


def features_to_batch(
    x: torch.Tensor, comm: Communicator, batch_sizes: Sequence[int], feature_sizes: Sequence[int], tag: str = "batch"
) -> torch.Tensor:
    """All examples, own feature slice -> own examples, all features (all-to-all both ways)."""
    if comm.world_size == 1:
        return x
    return _FeaturesToBatch.apply(x, comm, list(batch_sizes), list(feature_sizes), tag)
