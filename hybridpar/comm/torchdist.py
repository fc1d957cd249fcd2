"""The communicator over a torch.distributed process group (NCCL on GPU, gloo on CPU).

Even splits use the backends' native bandwidth-optimal collectives (``all_gather_single``, and
``reduce_scatter_single`` on NCCL). Uneven splits (K ∤ width), and every reduce-scatter on gloo
(whose reduce-scatter is an all-reduce underneath: twice the bytes), go through
``all_to_all_single`` with split sizes and a local sum: padding to the largest part would put bytes
on the wire that the ledger does not count, and would make the real traffic depend on padding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hybridpar.comm.base import Communicator
from hybridpar.comm.ledger import ByteLedger
from hybridpar.errors import PeerLostError


class DistCommunicator(Communicator):
    def __init__(self, group: dist.ProcessGroup | None = None, ledger: ByteLedger | None = None):
        self.group = group if group is not None else dist.group.WORLD
        super().__init__(dist.get_rank(self.group), dist.get_world_size(self.group), ledger or ByteLedger())
        dev = _group_device(self.group)
        self.timing_device = dev if dev.type == "cuda" else None

    def _split(self, groups, mine):
        # Every rank must create every group, in the same order (torch.distributed's rule); the
        # groups' ranks are global ranks, so translate from this communicator's.
        to_global = dist.get_process_group_ranks(self.group)
        made = None
        for g in groups:
            pg = dist.new_group([to_global[r] for r in g])
            if g == mine:
                made = pg
        return DistCommunicator(made, self.ledger)

    def _peer_lost(self, exc, what):
        # gloo and NCCL report a peer that stopped responding (the process group's timeout) or
        # left (a closed connection) as RuntimeError (DistBackendError); say which collective.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return PeerLostError(
            f"worker {self.rank}: {what} did not complete: a peer stopped responding (parallel.timeout_s) "
            f"or left [{first[:200]}]"
        )

    def _all_gather(self, x, dim, sizes):
        if len(set(sizes)) == 1:
            xt = _to_front(x, dim)
            out = xt.new_empty((self.world_size * xt.shape[0], *xt.shape[1:]))
            dist.all_gather_single(out, xt, group=self.group)
            return _from_front(out, dim)
        shapes = [_with(x.shape, dim, s) for s in sizes]
        return torch.cat(self._all_to_all([x] * self.world_size, shapes), dim)

    def _reduce_scatter(self, x, dim, sizes):
        # gloo's reduce-scatter runs a full all-reduce underneath (2× the bytes, measured on the
        # link); an all-to-all of the parts and a local sum moves exactly (K-1)/K of the tensor.
        if len(set(sizes)) == 1 and dist.get_backend(self.group) != "gloo":
            xt = _to_front(x, dim)
            out = xt.new_empty((sizes[0], *xt.shape[1:]))
            dist.reduce_scatter_single(out, xt, group=self.group)
            return _from_front(out, dim)
        mine = _with(x.shape, dim, sizes[self.rank])
        parts = self._all_to_all(list(x.split(sizes, dim)), [mine] * self.world_size)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def _all_to_all(self, chunks, recv_shapes):
        return self._all_to_all_async(chunks, recv_shapes)()

    def _all_to_all_async(self, chunks, recv_shapes):
        send = torch.cat([c.reshape(-1) for c in chunks])
        recv_counts = [s.numel() for s in recv_shapes]
        out = send.new_empty(sum(recv_counts))
        work = dist.all_to_all_single(
            out,
            send,
            output_split_sizes=recv_counts,
            input_split_sizes=[c.numel() for c in chunks],
            group=self.group,
            async_op=True,
        )

        def finish():
            work.wait()
            return [p.view(s) for p, s in zip(out.split(recv_counts), recv_shapes)]

        finish.ready = work.is_completed
        return finish

    def _all_reduce_async(self, x):
        y = x.clone()
        work = dist.all_reduce(y, group=self.group, async_op=True)

        def finish():
            work.wait()
            return y

        finish.ready = work.is_completed
        return finish

    def _all_reduce(self, x):
        y = x.clone()
        dist.all_reduce(y, group=self.group)
        return y

    def _gather_objects(self, obj):
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _gather_ints(self, t):
        # Metadata travels on the tensors' own device (NCCL needs CUDA tensors).
        dev = _group_device(self.group)
        t = t.to(dev)
        out = t.new_empty(self.world_size * t.numel())
        dist.all_gather_single(out, t, group=self.group)
        return list(out.view(self.world_size, -1).cpu())


def _to_front(x: torch.Tensor, dim: int) -> torch.Tensor:
    # The native collectives cut along dim 0 of a contiguous buffer.
    return x.movedim(dim, 0).contiguous()


def _from_front(x: torch.Tensor, dim: int) -> torch.Tensor:
    # A fresh tensor, not a view: later layers (e.g. an in-place ReLU) may write into it.
    return x if dim == 0 else x.movedim(0, dim).contiguous()


def _with(shape: torch.Size, dim: int, size: int) -> torch.Size:
    s = list(shape)
    s[dim] = size
    return torch.Size(s)


def _group_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
