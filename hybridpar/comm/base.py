"""The one communication interface every parallel path uses.

A :class:`Communicator` is one worker's handle on its group of ``world_size`` workers. The
public methods validate their arguments, write the byte ledger, and hand the moving to a
backend (``_all_gather`` & co.): torch.distributed process groups (:mod:`.torchdist`) or K
workers emulated in one process (:mod:`.emulated`). The per-worker model code cannot tell them
apart, and both produce the same ledger.

All operations are plain (non-differentiable) tensor ops; :mod:`hybridpar.comm.regions` wraps
them in autograd Functions whose forward and backward are mirror images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from hybridpar.comm.ledger import ByteLedger
from hybridpar.errors import BatchMismatchError

# The shape agreement (``Communicator.agree``): a length prefix and up to 8 values, as int64, so
# the message has the same shape on every worker whatever it holds.
AGREE_WIDTH, AGREE_ITEMSIZE = 9, 8


def even_split(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` near-equal contiguous shards of ``n`` (the first ``n % parts`` get one more),
    the same rule as ``torch.tensor_split``."""
    q, r = divmod(n, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def _numel_without(shape: Sequence[int], dim: int) -> int:
    m = 1
    for i, s in enumerate(shape):
        if i != dim:
            m *= s
    return m


class Communicator(ABC):
    """One worker's view of its group. ``sizes`` arguments list every worker's part, in rank order."""

    def __init__(self, rank: int, world_size: int, ledger: ByteLedger | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.ledger = ledger if ledger is not None else ByteLedger()
        # Where the collectives' waits are timed: None, the host clock; a CUDA device (NCCL), by
        # CUDA events on its current stream (the host only launches them there).
        self.timing_device: torch.device | None = None

    # ---- public, ledgered operations ------------------------------------------------------

    def all_gather(self, x: torch.Tensor, dim: int, sizes: Sequence[int], tag: str = "") -> torch.Tensor:
        """Concatenate every worker's ``x`` along ``dim``; worker ``j`` contributes ``sizes[j]`` rows."""
        sizes = self._check_sizes(sizes, x.shape[dim], dim)
        k, m, e = self.world_size, _numel_without(x.shape, dim), x.element_size()
        self.ledger.record(
            "all_gather", tag, (k - 1) * sizes[self.rank] * m * e, (sum(sizes) - sizes[self.rank]) * m * e
        )
        return self._timed(self._all_gather, x, dim, sizes)

    def reduce_scatter(self, x: torch.Tensor, dim: int, sizes: Sequence[int], tag: str = "") -> torch.Tensor:
        """Sum ``x`` over workers and keep this worker's part along ``dim`` (``sizes[rank]`` rows)."""
        if sum(sizes) != x.shape[dim]:
            raise ValueError(f"reduce_scatter: sizes {list(sizes)} do not add up to dim {dim} of {tuple(x.shape)}")
        sizes = list(sizes)
        k, m, e = self.world_size, _numel_without(x.shape, dim), x.element_size()
        self.ledger.record(
            "reduce_scatter", tag, (sum(sizes) - sizes[self.rank]) * m * e, (k - 1) * sizes[self.rank] * m * e
        )
        return self._timed(self._reduce_scatter, x, dim, sizes)

    def all_to_all(
        self, chunks: Sequence[torch.Tensor], recv_shapes: Sequence[torch.Size], tag: str = ""
    ) -> list[torch.Tensor]:
        """Send ``chunks[j]`` to worker ``j``; return what each worker sent here, in rank order."""
        chunks, recv_shapes = self._count_all_to_all(chunks, recv_shapes, tag)
        return self._timed(self._all_to_all, chunks, recv_shapes)

    def all_to_all_async(
        self, chunks: Sequence[torch.Tensor], recv_shapes: Sequence[torch.Size], tag: str = ""
    ) -> Handle:
        """:meth:`all_to_all` that returns at once; ``handle.wait()`` gives the received chunks.

        Every worker must issue its async operations in the same order. The emulated backend
        moves the data inside ``wait()`` (workers wait in the same order too), so it runs the
        same schedule without real concurrency.
        """
        chunks, recv_shapes = self._count_all_to_all(chunks, recv_shapes, tag)
        return Handle(self, self._all_to_all_async(chunks, recv_shapes))

    def _count_all_to_all(self, chunks, recv_shapes, tag):
        if len(chunks) != self.world_size or len(recv_shapes) != self.world_size:
            raise ValueError("all_to_all needs one chunk and one receive shape per worker")
        e = chunks[0].element_size()
        sent = sum(c.numel() for j, c in enumerate(chunks) if j != self.rank) * e
        recv = sum(torch.Size(s).numel() for i, s in enumerate(recv_shapes) if i != self.rank) * e
        self.ledger.record("all_to_all", tag, sent, recv)
        return list(chunks), [torch.Size(s) for s in recv_shapes]

    def all_reduce(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        """Sum over workers (a new tensor). Counted as the bandwidth-optimal reduce-scatter +
        all-gather over an even split of the elements: ``n + (K-2)·c_rank`` elements each way."""
        self.count_all_reduce(x.numel(), x.element_size(), tag)
        return self._timed(self._all_reduce, x)

    def all_reduce_async(self, x: torch.Tensor, tag: str = "") -> Handle:
        """:meth:`all_reduce` that returns at once; ``handle.wait()`` gives the sum."""
        self.count_all_reduce(x.numel(), x.element_size(), tag)
        return Handle(self, self._all_reduce_async(x))

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        """The communicator of this worker's group, ``groups`` partitioning the ranks (every worker
        passes the same ``groups``, in the same order). It records into this one's ledger."""
        flat = sorted(r for g in groups for r in g)
        if flat != list(range(self.world_size)):
            raise ValueError(f"groups {[list(g) for g in groups]} do not partition ranks 0..{self.world_size - 1}")
        mine = next(list(g) for g in groups if self.rank in g)
        return self._split([list(g) for g in groups], mine)

    def _split(self, groups: list[list[int]], mine: list[int]) -> Communicator:
        raise NotImplementedError(f"{type(self).__name__} cannot form groups")

    def count_all_reduce(self, numel: int, itemsize: int, tag: str) -> None:
        """Ledger entry of an all-reduce issued elsewhere (e.g. by a DDP communication hook)."""
        c = even_split(numel, self.world_size)[self.rank]
        b = (numel + (self.world_size - 2) * c) * itemsize
        self.ledger.record("all_reduce", tag, b, b)

    def agree(self, what: str, values: Sequence[int]) -> None:
        """Check that every worker holds the same small tuple of ints (e.g. its local batch shape).

        Costs one tiny all-gather; every worker raises the same :class:`BatchMismatchError` on a
        mismatch, so no worker is left waiting in a later collective whose shapes disagree.
        """
        self.agree_async(what, values).wait()

    def agree_async(self, what: str, values: Sequence[int]) -> Agreement:
        """:meth:`agree` issued now and checked at ``wait()``: the worker computes while it travels.

        On a link that other traffic keeps busy (the pipelined trunk's sums) a tiny blocking
        collective waits behind that traffic's queue — tens of ms at 100 Mbit/s — so the step
        issues its batch-shape check at its start and waits for it only before its first collective
        whose shapes depend on it (the head's first move), after the trunk's forward.
        """
        if self.world_size == 1:  # nothing to compare (and no collective: on a GPU it would cost a host sync)
            return Agreement(None, lambda rows: None)
        t = torch.tensor([len(values), *values], dtype=torch.int64)
        # A length prefix plus fixed padding keeps the message the same shape on every worker
        # even when the tuples differ in length.
        width = AGREE_WIDTH
        if t.numel() > width:
            raise ValueError(f"agree() takes at most {width - 1} values")
        t = torch.nn.functional.pad(t, (0, width - t.numel()), value=-1)
        e = t.element_size()
        self.ledger.record("agree", what, (self.world_size - 1) * width * e, (self.world_size - 1) * width * e)

        def check(rows):
            seen = [tuple(int(v) for v in r[1 : 1 + int(r[0])]) for r in rows]
            if any(s != seen[0] for s in seen):
                listing = ", ".join(f"worker {i}: {s}" for i, s in enumerate(seen))
                raise BatchMismatchError(
                    f"workers disagree on {what} ({listing}); every worker must use the same {what}"
                )

        return Agreement(Handle(self, self._gather_ints_async(t)), check)

    def all_finite(self, finite: bool, what: str = "nonfinite_check") -> bool:
        """Whether ``finite`` holds on every worker (e.g. its loss is finite). One tiny all-gather;
        every worker gets the same verdict, so all of them skip, or stop, together."""
        return self.votes([finite], what)[0] == self.world_size

    def votes(self, flags: Sequence[bool], what: str = "step_votes") -> list[int]:
        """How many workers hold each of ``flags`` (one tiny all-gather for all of them; every
        worker gets the same counts): the step's non-finite check and stop request in one."""
        return self.votes_async(flags, what).wait()

    def votes_async(self, flags: Sequence[bool | torch.Tensor], what: str = "step_votes") -> Agreement:
        """:meth:`votes`, issued now; ``wait()`` gives the counts. A flag may be a 0-d tensor (a
        loss's ``isfinite``) on the collective's device: read there, it costs the host no sync."""
        if self.world_size == 1:
            return Agreement(None, lambda rows: [int(bool(f)) for f in flags])
        t = torch.tensor([0 if isinstance(f, torch.Tensor) else int(bool(f)) for f in flags], dtype=torch.int64)
        dev = next((f.device for f in flags if isinstance(f, torch.Tensor)), t.device)
        if dev.type != "cpu":  # the host's flags by an async copy from pinned memory: a plain one would sync
            t = t.pin_memory().to(dev, non_blocking=True)
        for i, f in enumerate(flags):
            if isinstance(f, torch.Tensor):
                t[i] = f.reshape(()).to(torch.int64)  # on the device, after what computes it
        e = t.element_size() * t.numel()
        self.ledger.record("agree", what, (self.world_size - 1) * e, (self.world_size - 1) * e)
        return Agreement(
            Handle(self, self._gather_ints_async(t)),
            lambda rows: [sum(int(r[i]) for r in rows) for i in range(t.numel())],
        )

    def max_int_async(self, value: int, what: str) -> Agreement:
        """The largest ``value`` over the workers (one tiny all-gather), issued now; ``wait()``
        gives it, the same on every worker."""
        if self.world_size == 1:
            return Agreement(None, lambda rows: value)
        t = torch.tensor([value], dtype=torch.int64)
        e = t.element_size()
        self.ledger.record("agree", what, (self.world_size - 1) * e, (self.world_size - 1) * e)
        return Agreement(Handle(self, self._gather_ints_async(t)), lambda rows: max(int(r[0]) for r in rows))

    def gather_objects(self, obj: object) -> list:
        """Every worker's picklable ``obj``, in rank order (setup-time control messages, e.g. errors).

        Counted in the ledger as kind ``objects`` with the pickled size.
        """
        import pickle

        n = len(pickle.dumps(obj))
        self.ledger.record("objects", "control", (self.world_size - 1) * n, 0)
        return self._timed(self._gather_objects, obj)

    # ---- helpers -------------------------------------------------------------------------

    def _timed(self, fn, *args, what: str | None = None):
        what = what or self._last_entry()
        self.ledger.waiting = what
        try:
            with self.ledger.timing(self.timing_device):
                return fn(*args)
        except RuntimeError as exc:
            lost = self._peer_lost(exc, what)
            if lost is None:
                raise
            raise lost from exc
        finally:
            self.ledger.waiting = None

    def _last_entry(self) -> str:
        e = self.ledger.entries[-1] if self.ledger.entries else None
        return f"{e.kind} '{e.tag}'" if e else "a collective"

    def _peer_lost(self, exc: RuntimeError, what: str) -> Exception | None:
        """The error to raise when the backend reports a lost peer; None: not a peer problem."""
        return None

    def _check_sizes(self, sizes: Sequence[int], mine: int, dim: int) -> list[int]:
        sizes = list(sizes)
        if len(sizes) != self.world_size:
            raise ValueError(f"need one size per worker ({self.world_size}), got {sizes}")
        if sizes[self.rank] != mine:
            raise ValueError(f"worker {self.rank} holds {mine} rows along dim {dim}, but sizes say {sizes[self.rank]}")
        return sizes

    # ---- backend ---------------------------------------------------------------------------

    @abstractmethod
    def _all_gather(self, x: torch.Tensor, dim: int, sizes: list[int]) -> torch.Tensor: ...

    @abstractmethod
    def _reduce_scatter(self, x: torch.Tensor, dim: int, sizes: list[int]) -> torch.Tensor: ...

    @abstractmethod
    def _all_to_all(self, chunks: list[torch.Tensor], recv_shapes: list[torch.Size]) -> list[torch.Tensor]: ...

    @abstractmethod
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    # Async backends return a zero-argument callable that blocks until the result is ready.
    @abstractmethod
    def _all_to_all_async(self, chunks: list[torch.Tensor], recv_shapes: list[torch.Size]): ...

    @abstractmethod
    def _all_reduce_async(self, x: torch.Tensor): ...

    @abstractmethod
    def _gather_objects(self, obj: object) -> list: ...

    @abstractmethod
    def _gather_ints(self, t: torch.Tensor) -> list[torch.Tensor]:
        """All workers' copies of a small CPU int64 tensor, in rank order."""

    @abstractmethod
    def _gather_ints_async(self, t: torch.Tensor):
        """:meth:`_gather_ints` returning at once, as the other async backends do."""


class Handle:
    """An operation in flight. ``wait()`` blocks until its result is ready and returns it; the
    time spent blocked is the *exposed* communication time, and goes to the ledger."""

    def __init__(self, comm: Communicator, finish):
        self._comm, self._finish, self._result, self._done = comm, finish, None, False
        self._what = comm._last_entry()  # named in the error if a peer is lost while it runs

    def ready(self) -> bool:
        """Whether ``wait()`` would return at once. A backend that moves the data inside
        ``wait()`` (the emulation) is never ready before it."""
        return self._done or bool(getattr(self._finish, "ready", lambda: False)())

    def wait(self):
        if not self._done:
            self._result = self._comm._timed(self._finish, what=self._what)
            self._done, self._finish = True, None
        return self._result


class Agreement:
    """A small agreement in flight (:meth:`Communicator.agree_async`, :meth:`~Communicator.max_int_async`):
    ``wait()`` blocks until every worker's values are in, then ``read`` checks or reduces them
    (raising the same error on every worker); ``handle`` None: a world of one, nothing to wait for.
    Waited for once; later calls return the same result."""

    def __init__(self, handle: Handle | None, read):
        self._handle, self._read = handle, read
        self._done, self._result = False, None

    def wait(self):
        if not self._done:
            rows = self._handle.wait() if self._handle is not None else None
            self._done = True  # a mismatch raises on every call after the first too
            self._result = self._read(rows)
        return self._result
