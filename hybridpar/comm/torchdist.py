"""The communicator over a torch.distributed process group (NCCL on GPU, gloo on CPU).

Even splits use the backends' native bandwidth-optimal collectives (``all_gather_single``, and
``reduce_scatter_single`` on NCCL). Uneven splits (K ∤ width), and every reduce-scatter on gloo
(whose reduce-scatter is an all-reduce underneath: twice the bytes), go through
``all_to_all_single`` with split sizes and a local sum: padding to the largest part would put bytes
on the wire that the ledger does not count, and would make the real traffic depend on padding.

On gloo, a move larger than ``piece_bytes`` per peer travels as several collectives of at most that
size, issued together: gloo hands each peer its whole message at once, and on a rate-limited link
(a token-bucket shaper, as cloud instances and bench/twohost.sh have) one 8-17 MB message per
direction moved at 60-70% of the rate the same bytes reach in 1 MB pieces (bench/link_sizes.py:
100 Mbit/s and 1 Gbit/s). NCCL cuts its own messages into pipelined chunks; it is left alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hybridpar.comm.base import Communicator
from hybridpar.comm.ledger import ByteLedger
from hybridpar.errors import PeerLostError

MOVE_PIECE_BYTES = 2**20  # parallel.move_piece_mb's default


class DistCommunicator(Communicator):
    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        ledger: ByteLedger | None = None,
        piece_bytes: int | None = MOVE_PIECE_BYTES,
    ):
        self.group = group if group is not None else dist.group.WORLD
        super().__init__(dist.get_rank(self.group), dist.get_world_size(self.group), ledger or ByteLedger())
        dev = _group_device(self.group)
        self.timing_device = dev if dev.type == "cuda" else None
        # None: every move whole (NCCL always: it pipelines its own chunks).
        gloo = dist.get_backend(self.group) == "gloo"
        self.piece_bytes = int(piece_bytes) if gloo and piece_bytes else None

    def _split(self, groups, mine):
        # Every rank must create every group, in the same order (torch.distributed's rule); the
        # groups' ranks are global ranks, so translate from this communicator's.
        to_global = dist.get_process_group_ranks(self.group)
        made = None
        for g in groups:
            pg = dist.new_group([to_global[r] for r in g])
            if g == mine:
                made = pg
        return DistCommunicator(made, self.ledger, self.piece_bytes)

    def _peer_lost(self, exc, what):
        # gloo and NCCL report a peer that stopped responding (the process group's timeout) or
        # left (a closed connection) as RuntimeError (DistBackendError); say which collective.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return PeerLostError(
            f"worker {self.rank}: {what} did not complete: a peer stopped responding (parallel.timeout_s) "
            f"or left [{first[:200]}]"
        )

    def _pieces(self, n: int, itemsize: int) -> list[tuple[int, int]]:
        """[lo, hi) ranges of at most ``piece_bytes`` over ``n`` elements per peer; one range: whole."""
        step = max(1, self.piece_bytes // itemsize) if self.piece_bytes else n
        return [(lo, min(n, lo + step)) for lo in range(0, n, step)] or [(0, 0)]

    def _all_gather(self, x, dim, sizes):
        if len(set(sizes)) == 1:
            xt = _to_front(x, dim)
            out = xt.new_empty((self.world_size * xt.shape[0], *xt.shape[1:]))
            pieces = self._pieces(xt.numel(), xt.element_size())
            if len(pieces) == 1:
                dist.all_gather_single(out, xt, group=self.group)
            else:
                flat, rows = xt.view(-1), out.view(self.world_size, -1)
                parts = [(lo, hi, flat.new_empty(self.world_size * (hi - lo))) for lo, hi in pieces]
                works = [
                    dist.all_gather_single(buf, flat[lo:hi], group=self.group, async_op=True) for lo, hi, buf in parts
                ]
                for work, (lo, hi, buf) in zip(works, parts, strict=True):
                    work.wait()
                    rows[:, lo:hi].copy_(buf.view(self.world_size, -1))
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
        counts = {c.numel() for c in chunks} | set(recv_counts)
        if len(counts) == 1:
            # Equal parts here mean equal parts on every worker (what one sends each, it receives from
            # each), so all cut the same pieces; uneven exchanges go whole.
            pieces = self._pieces(counts.pop(), send.element_size())
            if len(pieces) > 1:
                return self._all_to_all_pieces(send, out, pieces, recv_shapes)
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

    def _all_to_all_pieces(self, send, out, pieces, recv_shapes):
        k = self.world_size
        sends, recvs = send.view(k, -1), out.view(k, -1)
        parts = []
        for lo, hi in pieces:
            piece = sends[:, lo:hi].contiguous().view(-1)
            buf = torch.empty_like(piece)
            parts.append((lo, hi, buf, dist.all_to_all_single(buf, piece, group=self.group, async_op=True)))

        def finish():
            for lo, hi, buf, work in parts:
                work.wait()
                recvs[:, lo:hi].copy_(buf.view(k, -1))
            return [p.view(s) for p, s in zip(out.split(recvs.shape[1]), recv_shapes)]

        finish.ready = lambda: all(work.is_completed() for *_, work in parts)
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
        return self._gather_ints_async(t)()

    def _gather_ints_async(self, t):
        # Metadata travels on the tensors' own device (NCCL needs CUDA tensors).
        dev = _group_device(self.group)
        t = t.to(dev)
        out = t.new_empty(self.world_size * t.numel())
        work = dist.all_gather_single(out, t, group=self.group, async_op=True)

        def finish():
            work.wait()
            return list(out.view(self.world_size, -1).cpu())

        finish.ready = work.is_completed
        return finish


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
