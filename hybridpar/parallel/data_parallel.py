"""Synchronisation of the replicated (data-parallel) trunk."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist

from hybridpar.comm.base import Communicator
from hybridpar.parallel.powersgd import PowerSGD

# The trunk's gradient buckets: 2^20 elements (4 MB of fp32; parallel.bucket_mb = 4). Small enough
# that the first bucket's all-reduce starts early in the backward, large enough to amortise alpha.
TRUNK_BUCKET_ELEMENTS = 1 << 20


def allreduce_gradients(params: Sequence[torch.nn.Parameter], comm: Communicator, tag: str) -> None:
    """SUM every gradient over the workers, in one coalesced all-reduce.

    A parameter without a gradient joins as zeros so that every worker sends the same buffer.
    """
    if comm.world_size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    _write_back(params, comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), tag))


def _write_back(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Copy a flat buffer of reduced gradients back into the parameters' ``.grad``."""
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
    buf = bucket.buffer()
    comm.count_all_reduce(buf.numel(), buf.element_size(), "ddp_grads")
    buf.div_(comm.world_size)
    start = comm.ledger.begin(comm.timing_device)
    fut = dist.all_reduce(buf, group=comm.group, async_op=True).get_future()

    def done(f):
        comm.ledger.end(start)  # on the GPU: recorded on the stream the result is ready on
        return f.value()[0]

    return fut.then(done)


def bucket_sizes(numels: Sequence[int], cap: int) -> list[list[int]]:
    """Group parameter indices into buckets of at most ``cap`` elements (a larger parameter gets
    a bucket of its own), last parameter first: backward produces gradients roughly in that order."""
    out: list[list[int]] = []
    size = 0
    for i in reversed(range(len(numels))):
        if not out or size + numels[i] > cap:
            out.append([])
            size = 0
        out[-1].append(i)
        size += numels[i]
    return out


class TrunkSync:
    """SUM the trunk replicas' gradients in buckets, each all-reduce issued as soon as its last
    gradient is accumulated, so the exchange overlaps the rest of the trunk's backward.

    Why not DDP: DDP needs a ProcessGroup (the emulation has none) and averages; this keeps
    one code path for both backends and the global-mean loss convention (SUM). ``overlap=False``
    waits for each bucket at once (for measuring how much the overlap hides).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        comm: Communicator,
        *,
        bucket_cap: int = TRUNK_BUCKET_ELEMENTS,
        overlap: bool = True,
        tag: str = "trunk_grads",
        wire: torch.dtype | None = None,
        compressor: PowerSGD | None = None,
    ):
        self.params, self.comm, self.overlap, self.tag = list(params), comm, overlap, tag
        self.wire = wire  # the dtype the sums travel and are added in (None: the gradients')
        self.armed = True  # False: a backward that only accumulates (a trunk chunk before the last)
        self.compressor = compressor  # PowerSGD (powersgd.py): each bucket's sums compressed
        self.buckets = bucket_sizes([p.numel() for p in self.params], bucket_cap)
        self._bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self._ready = [0] * len(self.buckets)
        self._inflight: list[tuple[int, object]] = []
        if comm.world_size > 1:
            # The hooks hold this object weakly: torch keeps a parameter's hooks on its C++ side,
            # out of the garbage collector's sight, so a strong reference back to these parameters
            # would be a cycle never collected — every model built in one process (a sweep, the
            # tests) would stay in memory.
            me = weakref.ref(self)
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(functools.partial(_on_grad_ready, me, i))

    def _ready_one(self, i: int) -> None:
        if not self.armed:
            return
        b = self._bucket_of[i]
        self._ready[b] += 1
        if self._ready[b] == len(self.buckets[b]):
            self._launch(b)

    def _launch(self, b: int) -> None:
        grads = [
            self.params[i].grad if self.params[i].grad is not None else torch.zeros_like(self.params[i])
            for i in self.buckets[b]
        ]
        if self.compressor is not None:
            handle = self.compressor.start(b, grads)  # its second all-reduce waits for finish()
        else:
            flat = torch.cat([g.reshape(-1) for g in grads])
            handle = self.comm.all_reduce_async(flat if self.wire is None else flat.to(self.wire), self.tag)
        if not self.overlap:
            (handle.first if self.compressor is not None else handle).wait()
        self._inflight.append((b, handle))
        self._ready[b] = -1  # launched

    def finish(self) -> None:
        """Wait for every bucket (launching any whose gradients never arrived, as zeros, in bucket
        order on every worker) and write the sums into ``.grad``."""
        if self.comm.world_size == 1:
            return
        for b, r in enumerate(self._ready):
            if r != -1:
                self._launch(b)
        if self.compressor is not None:
            # Every bucket's second all-reduce is issued in bucket order, after all first ones.
            for _, pending in self._inflight:
                self.compressor.middle(pending)
            for b, pending in self._inflight:
                sums = self.compressor.finish(pending)
                _write_back([self.params[i] for i in self.buckets[b]], torch.cat([t.reshape(-1) for t in sums]))
        for b, handle in [] if self.compressor is not None else self._inflight:
            params = [self.params[i] for i in self.buckets[b]]
            _write_back(params, handle.wait().to(params[0].dtype))
        self._inflight.clear()
        self._ready = [0] * len(self.buckets)


def _on_grad_ready(sync: weakref.ref, i: int, _p: torch.nn.Parameter) -> None:
    owner = sync()
    if owner is not None:
        owner._ready_one(i)


def trunk_bucket_numels(numels: Sequence[int], cap: int = TRUNK_BUCKET_ELEMENTS) -> list[int]:
    """The element count of each bucket :class:`TrunkSync` all-reduces (for the byte formula)."""
    return [sum(numels[i] for i in bucket) for bucket in bucket_sizes(numels, cap)]
