"""PowerSGD for the trunk's gradient sums (``parallel.trunk_powersgd_rank=r``): rank-r compression
with error feedback and warm start (Vogels, Karimireddy & Jaggi, NeurIPS 2019), opt-in and lossy.

Each matrix-shaped gradient M_k of a bucket (worker k's, flattened to n × m) is summed as
P = Σ_k M_k·Q (one all-reduce of n × r), P orthonormalised, Q' = Σ_k M_kᵀ·P (one of m × r), and
the sum approximated as P·Q'ᵀ — exact when r covers the matrices' rank, because Q is the same on
every worker and both products are linear in M_k. Vectors (biases) and matrices too small to
gain go uncompressed in the first all-reduce. Each worker keeps what its gradient lost
(e_k = M_k + e_k − P·Q'ᵀ / K) and adds it to the next step's; Q is kept between steps.

Why not torch's ``powerSGD_hook``: it needs a process group (the emulated workers have none), its
bytes would bypass the ledger, and it issues its second and third all-reduce from future
callbacks, so two buckets in flight can issue them in different orders on different workers —
this module issues every all-reduce from the trainer's thread, in bucket order. The arithmetic
is the hook's (same orthonormalisation by Gram-Schmidt with torch's epsilon convention, warm start,
error feedback), summing instead of averaging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridpar.comm.base import Communicator, Handle


def compressible(shape: torch.Size, rank: int) -> bool:
    """Whether a gradient of ``shape`` goes as P and Q: a matrix (2-D or more) for which they
    are smaller than the matrix itself."""
    if len(shape) < 2:
        return False
    n, m = shape[0], shape.numel() // shape[0]
    r = min(n, m, rank)
    return r * (n + m) < n * m


def step_elements(shapes: list[torch.Size], rank: int) -> int:
    """Elements one worker all-reduces per step for gradients of ``shapes`` (for the byte formula)."""
    total = 0
    for s in shapes:
        if compressible(s, rank):
            n, m = s[0], s.numel() // s[0]
            total += min(n, m, rank) * (n + m)
        else:
            total += s.numel()
    return total


@dataclass
class _Pending:
    key: int
    grads: list[torch.Tensor]  # this worker's gradients (error added), as they were sent
    first: Handle | None = None  # P's and the uncompressed tensors' all-reduce
    second: Handle | None = None  # Q's
    ps: list[torch.Tensor] | None = None
    plain: dict[int, torch.Tensor] | None = None  # the uncompressed sums, by gradient index


class PowerSGD:
    """One worker's compressor; ``key`` names a bucket (the same on every worker)."""

    def __init__(self, comm: Communicator, rank: int, *, seed: int = 0, tag: str = "trunk_grads"):
        if rank < 1:
            raise ValueError(f"PowerSGD needs a rank of at least 1, got {rank}")
        self.comm, self.rank, self.seed, self.tag = comm, rank, seed, tag
        self.errors: dict[tuple[int, int], torch.Tensor] = {}
        self.qs: dict[tuple[int, int], torch.Tensor] = {}

    def start(self, key: int, grads: list[torch.Tensor]) -> _Pending:
        """Add the kept error, form P = M·Q for each matrix, issue one all-reduce of the Ps and the
        uncompressed tensors."""
        grads = [self._with_error(key, i, g) for i, g in enumerate(grads)]
        pending = _Pending(key, grads)
        flat, ps = [], []
        for i, g in enumerate(grads):
            if compressible(g.shape, self.rank):
                p = self._matrix(g) @ self._q(key, i, g)
                ps.append(p)
                flat.append(p.reshape(-1))
            else:
                flat.append(g.reshape(-1))
        pending.ps = ps
        pending.first = self.comm.all_reduce_async(torch.cat(flat), self.tag)
        return pending

    def middle(self, pending: _Pending) -> None:
        """P summed: orthonormalise it, issue the all-reduce of Q' = Mᵀ·P."""
        summed = pending.first.wait()
        at, qs, ps = 0, [], []
        pending.plain = {}
        for i, g in enumerate(pending.grads):
            if compressible(g.shape, self.rank):
                n, r = g.shape[0], self.qs[(pending.key, i)].shape[1]
                p = _orthonormal(summed[at : at + n * r].view(n, r).clone())
                at += n * r
                ps.append(p)
                qs.append((self._matrix(g).t() @ p).reshape(-1))
            else:
                pending.plain[i] = summed[at : at + g.numel()].view_as(g)
                at += g.numel()
        pending.ps = ps
        pending.second = self.comm.all_reduce_async(torch.cat(qs), self.tag) if qs else None

    def finish(self, pending: _Pending) -> list[torch.Tensor]:
        """The approximate sums, one per gradient; keeps each worker's error and Q'."""
        summed = pending.second.wait() if pending.second is not None else None
        out, at, j = [], 0, 0
        K = self.comm.world_size
        for i, g in enumerate(pending.grads):
            if i in pending.plain:
                out.append(pending.plain[i])
                continue
            m = g.numel() // g.shape[0]
            r = pending.ps[j].shape[1]
            q = summed[at : at + m * r].view(m, r)
            at += m * r
            approx = (pending.ps[j] @ q.t()).view_as(g)
            self.errors[(pending.key, i)] = g - approx / K
            self.qs[(pending.key, i)] = q.clone()  # warm start: next step's Q
            out.append(approx)
            j += 1
        return out

    # ---- helpers -----------------------------------------------------------------------------

    def _with_error(self, key: int, i: int, g: torch.Tensor) -> torch.Tensor:
        e = self.errors.get((key, i))
        return g.detach().clone() if e is None else g.detach() + e

    @staticmethod
    def _matrix(g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1)

    def _q(self, key: int, i: int, g: torch.Tensor) -> torch.Tensor:
        """The bucket's Q for gradient i: the last step's Q' (warm start), or random from a seed
        every worker shares."""
        if (key, i) not in self.qs:
            n, m = g.shape[0], g.numel() // g.shape[0]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + key * 1009 + i)
            q = torch.randn(m, min(n, m, self.rank), generator=gen, dtype=g.dtype).to(g.device)
            self.qs[(key, i)] = _orthonormal(q)
        return self.qs[(key, i)]


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``m``, in place (torch's PowerSGD hook does the same); a
    zero column (a zero gradient) stays zero instead of dividing by zero."""
    for i in range(m.shape[1]):
        col = m[:, i : i + 1]
        col /= col.norm().clamp_min(1e-30)
        if i + 1 < m.shape[1]:
            rest = m[:, i + 1 :]
            rest -= (col.t() @ rest) * col
    return m
