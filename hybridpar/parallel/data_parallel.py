"""Synchronisation of the replicated (data-parallel) trunk."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybridpar.comm.base import Communicator


def allreduce_gradients(params: Sequence[torch.nn.Parameter], comm: Communicator, tag: str) -> None:
    """SUM every gradient over the workers, in one coalesced all-reduce.

    A parameter without a gradient joins as zeros so that every worker sends the same buffer.
    """
    if comm.world_size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), tag)
    for p, g in zip(params, flat.split([q.numel() for q in params])):
        if p.grad is None:
            p.grad = g.view_as(p).clone()
        else:
            p.grad.copy_(g.view_as(p))
