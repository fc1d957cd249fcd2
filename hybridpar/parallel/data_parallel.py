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


def ledger_allreduce_hook(comm, bucket):
    """DDP communication hook: DDP's own average all-reduce, written to ``comm``'s ledger.

    The same as ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook``,
    plus the byte count and the time each bucket's all-reduce is in flight, so that the DDP
    baseline reports bytes and communication time the same way the hybrid does.
    """
    import time

    import torch.distributed as dist

    buf = bucket.buffer()
    comm.count_all_reduce(buf.numel(), buf.element_size(), "ddp_grads")
    buf.div_(comm.world_size)
    t0 = time.perf_counter()
    fut = dist.all_reduce(buf, group=comm.group, async_op=True).get_future()

    def done(f):
        comm.ledger.seconds += time.perf_counter() - t0
        return f.value()[0]

    return fut.then(done)
