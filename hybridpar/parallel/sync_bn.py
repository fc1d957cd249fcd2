"""Batch norm over the global batch for the data-parallel trunk.

A replicated trunk with ordinary BatchNorm normalises each worker's b examples by their own
statistics: the result then depends on K, and is not the single device's on the K·b batch (DDP
does this too). ``WorkerSyncBatchNorm`` all-reduces the per-channel sums over the workers — the
mean, then the squared deviations from it (two passes, as exact as one device's), and in backward
the sums of dy and dy·x̂ — so every worker normalises by the global statistics and the hybrid
equals the single device with BN too. Why not ``torch.nn.SyncBatchNorm``: it needs a process group
(the emulated workers have none) and a GPU; this one runs over any :class:`Communicator`.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridpar.comm.base import Communicator


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, comm: Communicator, eps: float, tag: str):
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n_local = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        stats = comm.all_reduce(torch.cat([x.sum(dims), n_local]), tag)
        n = stats[-1]
        mean = stats[:-1] / n
        xc = x - mean.view(shape)
        var = comm.all_reduce((xc * xc).sum(dims), tag) / n  # biased: what normalisation uses
        invstd = torch.rsqrt(var + eps)
        xhat = xc * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.comm, ctx.n, ctx.dims, ctx.shape, ctx.tag = comm, n, dims, shape, tag
        ctx.mark_non_differentiable(mean, var)
        return xhat * weight.view(shape) + bias.view(shape), mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
        total = ctx.comm.all_reduce(local, ctx.tag + ".grad")
        c = weight.numel()
        sum_dy, sum_dy_xhat = total[:c], total[c:]
        dx = (weight * invstd).view(shape) * (dy - (sum_dy / ctx.n).view(shape) - xhat * (sum_dy_xhat / ctx.n).view(shape))
        # The weight and bias gradients stay local: the trunk's all-reduce sums them like any other.
        return dx, local[c:], local[:c], None, None, None


class WorkerSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer normalising by the statistics of the global batch (all workers)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, comm: Communicator, tag: str):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device if bn.weight is not None else None)  # fmt: skip
        self.load_state_dict(bn.state_dict())
        self.comm, self.tag = comm, tag

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.comm.world_size == 1:
            return super().forward(x)
        ones = torch.ones(self.num_features, dtype=x.dtype, device=x.device)
        weight = self.weight if self.affine else ones
        bias = self.bias if self.affine else torch.zeros_like(ones)
        y, mean, var, n = _SyncBN.apply(x, weight, bias, self.comm, self.eps, self.tag)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * n / (n - 1), alpha=m)  # unbiased, as torch's
        return y


def sync_batch_norms(module: nn.Module, comm: Communicator, prefix: str) -> int:
    """Replace every BatchNorm layer inside ``module`` by a :class:`WorkerSyncBatchNorm` (same
    parameters, buffers and names); returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, WorkerSyncBatchNorm):
            setattr(module, name, WorkerSyncBatchNorm(child, comm, f"bn:{prefix}.{name}"))
            count += 1
        else:
            count += sync_batch_norms(child, comm, f"{prefix}.{name}")
    return count
