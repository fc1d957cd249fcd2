"""K workers in one process: one thread per worker, collectives through shared memory.

Why threads and not torch's gloo: one process may hold only one default process group, and
torch's in-process ("threaded") process group is a private testing API. A thread per worker
runs exactly the per-worker code a torchrun process runs (autograd runs CPU backward on the
calling thread, so a collective inside ``backward`` meets its peers as it would across
processes), and the numbers are real. Reductions sum in rank order, so every replica gets
bit-identical results and runs are reproducible.

A worker that raises aborts the rendezvous: its peers stop waiting and :func:`run_emulated`
re-raises the first real error, so a bug never turns into a hang.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from hybridpar.comm.base import Communicator
from hybridpar.comm.ledger import ByteLedger
from hybridpar.errors import PeerAbortedError


class EmulatedWorld:
    """The shared state of K emulated workers."""

    def __init__(self, world_size: int, timeout_s: float = 300.0):
        if world_size < 1:
            raise ValueError(f"world size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._slots: list[Any] = [None] * world_size
        self._children: dict[tuple[int, ...], EmulatedWorld] = {}
        self._lock = threading.Lock()

    def child(self, ranks: tuple[int, ...]) -> EmulatedWorld:
        """The shared state of the group ``ranks`` (made by the first of its workers to ask)."""
        with self._lock:
            if ranks not in self._children:
                self._children[ranks] = EmulatedWorld(len(ranks), self.timeout_s)
            return self._children[ranks]

    def communicators(self) -> list[EmulatedCommunicator]:
        return [EmulatedCommunicator(self, r) for r in range(self.world_size)]

    def abort(self) -> None:
        self._barrier.abort()
        with self._lock:
            children = list(self._children.values())
        for c in children:  # a failed worker also releases peers waiting inside its groups
            c.abort()

    def exchange(self, rank: int, obj: Any, reader: Callable[[list[Any]], Any]) -> Any:
        """Post ``obj``, wait for every worker's, compute ``reader(all objects)``, and wait until
        every worker has read before anyone may post again."""
        self._slots[rank] = obj
        self._wait()
        try:
            return reader(list(self._slots))
        finally:
            self._wait()

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise PeerAbortedError(f"an emulated peer failed or did not arrive within {self.timeout_s:.0f} s") from None


class EmulatedCommunicator(Communicator):
    def __init__(self, world: EmulatedWorld, rank: int, ledger: ByteLedger | None = None):
        super().__init__(rank, world.world_size, ledger if ledger is not None else ByteLedger())
        self.world = world

    def _split(self, groups, mine):
        return EmulatedCommunicator(self.world.child(tuple(mine)), mine.index(self.rank), self.ledger)

    def _all_gather(self, x, dim, sizes):
        return self.world.exchange(self.rank, x, lambda xs: torch.cat(xs, dim))

    def _reduce_scatter(self, x, dim, sizes):
        r = self.rank
        return self.world.exchange(self.rank, x, lambda xs: _sum([t.split(sizes, dim)[r] for t in xs]))

    def _all_to_all(self, chunks, recv_shapes):
        r = self.rank

        def read(all_chunks):
            got = [c[r].clone() for c in all_chunks]
            for g, s in zip(got, recv_shapes):
                if g.shape != s:
                    raise ValueError(f"all_to_all: expected {tuple(s)}, a peer sent {tuple(g.shape)}")
            return got

        return self.world.exchange(self.rank, chunks, read)

    def _all_reduce(self, x):
        return self.world.exchange(self.rank, x, _sum)

    # Deferred: the exchange happens in wait(), which every worker reaches in the same order.
    def _all_to_all_async(self, chunks, recv_shapes):
        return lambda: self._all_to_all(chunks, recv_shapes)

    def _all_reduce_async(self, x):
        return lambda: self._all_reduce(x)

    def _gather_objects(self, obj):
        return self.world.exchange(self.rank, obj, list)

    def _gather_ints(self, t):
        return self.world.exchange(self.rank, t, lambda ts: [u.clone() for u in ts])

    def _gather_ints_async(self, t):
        return lambda: self._gather_ints(t)


def _sum(ts: list[torch.Tensor]) -> torch.Tensor:
    # Fixed rank order: the same bits on every worker.
    out = ts[0].clone()
    for t in ts[1:]:
        out += t
    return out


def run_emulated(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 300.0, **kwargs: Any
) -> list[Any]:
    """Run ``fn(comm, *args, **kwargs)`` once per emulated worker; return the results in rank order.

    If any worker raises, the others are released and the first real error is re-raised here.
    """
    world = EmulatedWorld(world_size, timeout_s)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def work(comm: EmulatedCommunicator) -> None:
        try:
            results[comm.rank] = fn(comm, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors[comm.rank] = exc
            world.abort()

    comms = world.communicators()
    if world_size == 1:
        work(comms[0])
    else:
        threads = [threading.Thread(target=work, args=(c,), name=f"hybridpar-worker-{c.rank}") for c in comms]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    real = [e for e in errors if e is not None and not isinstance(e, PeerAbortedError)]
    if real:
        raise real[0]
    aborted = [e for e in errors if e is not None]
    if aborted:
        raise aborted[0]
    return results
