"""The paper's schemes (b) and (c), and (a) in micro-batches: the head works through the global
batch in rounds.

Scheme (a) moves every example's features before the head starts. In (b), round j moves only
worker j's b examples, and in (c) every worker moves b/K of its examples in every round (so
every link carries traffic in every round). While the head computes round j, round j+1's
features are already in flight, and round j's feature gradients travel back to their owners
while round j+1 computes: the exchange hides behind the FC work. Scheme (a) with
``micro_batches = m`` runs as m rounds of b/m of every worker's examples (the shape of (c), with
m rounds), so that the trunk can run micro-batch by micro-batch (:func:`_train_chunked`).

The first move of the head (features to the shards) and its mirror (feature gradients back) are
issued here as async operations — each move kind's async pair is registered with it in
``program.py``; the moves inside the head stay inside autograd, as in (a).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.comm.base import Agreement
from hybridpar.parallel.program import scheme_rounds


def own_rows(sizes: list[list[int]], rank: int) -> list[slice]:
    """The rows of this worker's local batch that take part in each round."""
    out, lo = [], 0
    for row in sizes:
        out.append(slice(lo, lo + row[rank]))
        lo += row[rank]
    return out


def loss_input(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the loss takes them: bf16/fp16 ones in fp32, fp32 and fp64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def train_rounds(
    model, x, y, scheme: str, fc_batch: str, optimizer, autocast, on_loss=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step in rounds on ``model`` (a :class:`HybridModel`): scheme (b) or (c), or (a) in
    micro-batches; forward and backward of every round, the trunk's backward, the trunk's
    gradient sum. Returns this worker's share of the global-mean loss and its examples' logits
    (both detached); ``on_loss`` gets the share once every round has run, before the trunk's
    (last) backward starts the sums."""
    # Checked before the first move leaves (issued now: it travels while the trunk computes).
    shape = model.comm.agree_async("local batch shape", tuple(x.shape))
    loop = _Rounds(model, scheme, x.shape[0], fc_batch, optimizer, shape)
    if model.chunked(scheme):
        return _train_chunked(model, loop, x, y, autocast, on_loss)
    first = model.first_move
    with autocast():
        h0 = model.run_program(model.program[:first], model.forward_trunk(x), [])
    loop.start([h0[r] for r in loop.rows])
    for j in range(loop.count):
        loop.round(j, y, autocast)
    if on_loss is not None:
        on_loss(loop.loss_share)
    h0.backward(loop.input_grad(h0))
    model.sync_gradients()
    return loop.loss_share, torch.cat(loop.logits)


def _train_chunked(model, loop: _Rounds, x, y, autocast, on_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk chunk by chunk (``parallel.chunk_trunk`` for (b)/(c), ``parallel.micro_batches``
    for (a)): each round's rows go through the trunk on their own. Round j's features travel while
    round j+1's rows go through the convolutions, and round j's trunk backward runs as soon as its
    feature gradients are back, while later rounds compute. The same gradients as one pass where
    the trunk is per-example (no BatchNorm: refused at build); the trunk's gradient sync counts a
    parameter ready only on this worker's last chunk's backward."""
    first, R = model.first_move, loop.count
    chunks = []
    for j in range(R):
        with autocast():
            chunks.append(model.run_program(model.program[:first], model.forward_trunk(x[loop.rows[j]]), []))
        loop.start_round(j, chunks[j])  # travels while the next chunk computes
    last = max((j for j in range(R) if chunks[j].shape[0]), default=-1)  # (b): one chunk per worker
    for j in range(R):
        loop.round(j, y, autocast)
        if j > 0:
            _chunk_backward(model, chunks[j - 1], loop.returned(j - 1), last=j - 1 == last)
    if on_loss is not None:
        on_loss(loop.loss_share)
    _chunk_backward(model, chunks[-1], loop.returned(R - 1), last=R - 1 == last)
    model.sync_gradients()
    return loop.loss_share, torch.cat(loop.logits)


def _chunk_backward(model, h: torch.Tensor, grad: torch.Tensor, last: bool) -> None:
    if h.shape[0] == 0:
        return
    model.trunk_sync.armed = last  # earlier chunks only accumulate: the sums start after the last
    try:
        h.backward(grad.to(h.dtype))
    finally:
        model.trunk_sync.armed = True


class _Rounds:
    """The state of one step's rounds: features in flight, gradients on their way back."""

    def __init__(self, model, scheme: str, local_batch: int, fc_batch: str, optimizer, shape: Agreement):
        self.model, self.move, self.fc_batch, self.optimizer = (
            model,
            model.program[model.first_move],
            fc_batch,
            optimizer,
        )
        self.comm, self.shape = model.comm, shape  # shape: the batch-shape agreement, waited before any move
        self.total = model.world.world_size * local_batch  # the global batch: every group's rounds
        self.sizes = scheme_rounds(scheme, local_batch, self.comm.world_size, model.micro_batches)
        self.count = len(self.sizes)
        self.rows = own_rows(self.sizes, self.comm.rank)
        self.sent: dict[int, torch.Tensor] = {}
        self.pending: dict[int, object] = {}
        self.returns: dict[int, object] = {}
        self.logits: list[torch.Tensor] = []
        self.loss_share, self.snapshot, self.finite, self.dtype = 0.0, None, True, None

    def start(self, parts: Sequence[torch.Tensor]) -> None:
        """This worker's rows of every round, known at once; round 0's leave now."""
        for j, part in enumerate(parts):
            self._keep(j, part)
        self._issue(0)

    def start_round(self, j: int, part: torch.Tensor) -> None:
        """Round ``j``'s rows, as soon as they exist; they leave at once."""
        self._keep(j, part)
        self._issue(j)

    def _keep(self, j: int, part: torch.Tensor) -> None:
        self.dtype = part.dtype
        self.sent[j] = part.detach().to(self.model.comm_dtype or part.dtype)

    def _issue(self, j: int):
        self.shape.wait()
        self.pending[j] = self.move.spec.send(self.sent[j], self.comm, self.sizes[j], self.move.tag)

    def _issue_next(self, j: int) -> None:
        """Round ``j + 1``'s features leave, if they exist and have not left yet."""
        if j + 1 < self.count and j + 1 not in self.pending and j + 1 in self.sent:
            self._issue(j + 1)

    def round(self, j: int, y: torch.Tensor, autocast) -> None:
        overlap = self.model.overlap
        if overlap:
            self._issue_next(j)  # next round's features travel while this one computes
        inp = torch.cat(self.pending.pop(j).wait(), 0).to(self.dtype).requires_grad_()
        with autocast():
            logits = self.model.run_program(self.model.program[self.model.first_move + 1 :], inp, self.sizes[j])
        ce = F.cross_entropy(loss_input(logits), y[self.rows[j]], reduction="sum")
        n_j = sum(self.sizes[j])
        (ce / (self.total if self.fc_batch == "full" else n_j)).backward()
        self.loss_share = self.loss_share + ce.detach() / self.total
        self.logits.append(logits.detach())
        g = inp.grad
        if self.fc_batch == "chunk":
            self._update_head(ce)
            g = g * (n_j / self.total)  # the trunk still sees the mean over all K·b examples
        wire = self.model.comm_dtype or self.dtype
        self.returns[j] = self.move.spec.send_back(
            g.to(wire), self.comm, self.sizes[j], self.move.width, self.move.tag + ".grad"
        )
        if not overlap:
            self.returns[j].wait()
            self._issue_next(j)

    def returned(self, j: int) -> torch.Tensor:
        """The gradient of this worker's rows of round ``j`` (waits for it)."""
        return self.move.spec.collect_back(self.returns.pop(j).wait())

    def _update_head(self, ce: torch.Tensor) -> None:
        """fc_batch=chunk: the head takes a step after this round. It updates inside the step,
        before the trainer can check the step's loss: every round's loss is checked (all workers
        agree) before its update, and a bad round puts the head back as it was before the step,
        so the trainer's "stop before the update" / "skip the step" hold for the head too. Later
        rounds still run (their moves are collectives every worker must join) without updating."""
        head = self.model.head_parameters()
        self.finite = self.finite and self.model.world.all_finite(math.isfinite(ce.item()), "round_nonfinite_check")
        self.model.head_weight_grads()  # deferred ones (defer_wgrad): the update reads them
        if self.finite:
            self.snapshot = self.snapshot or _HeadState(head, self.optimizer)
            self.optimizer.step()  # only the head has gradients yet: the trunk's come after the rounds
        elif self.snapshot is not None:
            self.snapshot.restore()
            self.snapshot = None
        for p in head:
            p.grad = None

    def input_grad(self, h0: torch.Tensor) -> torch.Tensor:
        """The gradient of this worker's head input, every round's part back in its rows."""
        grad = torch.zeros_like(h0)
        for j in sorted(self.returns):
            grad[self.rows[j]] += self.returned(j).to(grad.dtype)
        return grad


class _HeadState:
    """A copy of the head shards and their optimizer state, to put back."""

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [(p, p.detach().clone()) for p in params]
        self.state = {p: copy.deepcopy(optimizer.state[p]) for p, _ in self.params if p in optimizer.state}

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in self.params:
                p.copy_(saved)
                if p in self.state:
                    self.optimizer.state[p] = self.state[p]
                else:
                    self.optimizer.state.pop(p, None)
