"""The head's activation moves as one data structure: which collectives a step runs, in what layout.

Every move kind is registered once, in :data:`MOVES`, with its differentiable function (what the
model runs), the async pair the rounds of schemes (b)/(c) start and finish, its element count per
direction (what the byte formula, the cost model and the ledger tests read) and its message
steps. :func:`head_layout` decides which moves a head of Linear layers needs for a choice of
column/row layers; ``shard_head`` (the model), ``cost.py`` (bytes), ``costmodel.py`` (time) and
``plan.py`` (layouts) all read it. A new move kind is added here and nowhere else.

Layouts between the head's layers, named after DTensor's placements where they match:
``Shard(0)`` — this worker's own examples, every feature (what the trunk gives and the loss takes);
``Shard(1)`` — every example of the group, this worker's slice of the features;
``Partial`` — every example, every feature, a partial sum (what a row-parallel layer gives);
``Replicate`` — every example, every feature (what a column-parallel layer takes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hybridpar.comm import regions
from hybridpar.comm.base import Communicator, Handle, even_split
from hybridpar.comm.regions import columns_to_rows_chunks, rows_to_columns_chunks

BATCH, FEATURES, PARTIAL, REPLICATE = "Shard(0)", "Shard(1)", "Partial", "Replicate"
SCHEMES = ("a", "b", "c")  # the hybrid's schedules (parallel.scheme also takes the "ddp" baseline)


def scheme_rounds(scheme: str, b: int, K: int, micro_batches: int = 1) -> list[list[int]]:
    """Examples per worker in each round: one round of ``[b] * K`` for (a), or with
    ``micro_batches = m`` m rounds of b/m of every worker's examples; K rounds for (b), (c)."""
    if scheme == "a":
        return [[s] * K for s in even_split(b, micro_batches)]
    if scheme == "b":  # round j: worker j's examples
        return [[b if k == j else 0 for k in range(K)] for j in range(K)]
    if scheme == "c":  # round j: the j-th slice of every worker's examples
        return [[s] * K for s in even_split(b, K)]
    raise ValueError(f"unknown scheme {scheme!r}, not one of {', '.join(SCHEMES)}")


@dataclass(frozen=True)
class MoveKind:
    """One pattern of moving activations, forward and (its mirror) backward."""

    name: str
    src: str  # layout in
    dst: str  # layout out
    collective: str  # the forward's collective; the backward runs its mirror
    # (x, comm, batch sizes, feature sizes, ledger tag) -> x in the new layout, differentiable
    apply: Callable[[torch.Tensor, Communicator, list[int], list[int], str], torch.Tensor]
    # (width n, examples per worker, rank) -> elements this rank sends and receives, forward
    sent_recv: Callable[[int, Sequence[int], int], tuple[int, int]]
    # The moves that can open the head: the rounds start them as async operations (rounds.py).
    send: Callable[[torch.Tensor, Communicator, list[int], str], Handle] | None = None
    send_back: Callable[[torch.Tensor, Communicator, list[int], int, str], Handle] | None = None
    collect_back: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    def steps(self, K: int) -> int:
        """Message steps of one direction: each of these collectives is one pass over K - 1 peers."""
        return K - 1 if K > 1 else 0

    def elements(self, n: int, betas: Sequence[int], rank: int) -> int:
        """Elements ``rank`` sends (= receives) for the move, forward and backward together."""
        sent, recv = self.sent_recv(n, betas, rank)
        return sent + recv


# ---- element counts: worker ``rank`` brings ``betas[rank]`` of ``B`` examples, width ``n`` cut in K


def _counts(n: int, betas: Sequence[int], rank: int) -> tuple[int, int, int, int]:
    K, B, beta = len(betas), sum(betas), betas[rank]
    return K, B, beta, even_split(n, K)[rank]


def _gather_rows(n, betas, rank):  # own rows to every peer
    K, B, beta, _ = _counts(n, betas, rank)
    return beta * n * (K - 1), (B - beta) * n


def _gather_columns(n, betas, rank):  # own feature slice of every example to every peer
    K, B, _, s = _counts(n, betas, rank)
    return B * s * (K - 1), B * (n - s)


def _rows_to_columns(n, betas, rank):  # own rows' other slices out, own slice of peers' rows in
    _, B, beta, s = _counts(n, betas, rank)
    return beta * (n - s), (B - beta) * s


def _mirror(count):
    return lambda n, betas, rank: tuple(reversed(count(n, betas, rank)))


# ---- the async pair of the moves that open the head (schemes b, c) ----------------------------


def _send_rows(h: torch.Tensor, comm: Communicator, sizes: list[int], tag: str) -> Handle:
    """This worker's round rows to every shard (all-to-all of copies); arrivals concatenate on dim 0."""
    return comm.all_to_all_async([h] * comm.world_size, [torch.Size((s, h.shape[1])) for s in sizes], tag)


def _send_row_grads(g: torch.Tensor, comm: Communicator, sizes: list[int], width: int, tag: str) -> Handle:
    """Each example's partial input gradient back to its owner, who sums them (:func:`_sum`)."""
    chunks = [c.contiguous() for c in g.split(sizes, 0)]
    return comm.all_to_all_async(chunks, [torch.Size((sizes[comm.rank], width))] * comm.world_size, tag)


def _send_columns(h: torch.Tensor, comm: Communicator, sizes: list[int], tag: str) -> Handle:
    """Slice j of this worker's round rows to worker j; arrivals concatenate on dim 0."""
    fs = even_split(h.shape[1], comm.world_size)
    return comm.all_to_all_async(*rows_to_columns_chunks(h, comm.rank, sizes, fs), tag)


def _send_column_grads(g: torch.Tensor, comm: Communicator, sizes: list[int], width: int, tag: str) -> Handle:
    """The gradient's feature slices back to the examples' owners, who concatenate them on dim 1."""
    fs = even_split(width, comm.world_size)
    return comm.all_to_all_async(*columns_to_rows_chunks(g, comm.rank, sizes, fs), tag)


def _sum(received: list[torch.Tensor]) -> torch.Tensor:
    out = received[0].clone()
    for t in received[1:]:
        out += t
    return out


def _by_rows(fn):  # the regions functions that cut only the batch: gather_batch, scatter_batch
    return lambda x, comm, batch_sizes, feature_sizes, tag: fn(x, comm, batch_sizes, tag)


def _by_columns(fn):  # ... and those that cut only the features
    return lambda x, comm, batch_sizes, feature_sizes, tag: fn(x, comm, feature_sizes, tag)


MOVES: dict[str, MoveKind] = {
    m.name: m
    for m in (
        MoveKind(
            "gather_batch",
            BATCH,
            REPLICATE,
            "all_gather",
            _by_rows(regions.gather_batch),
            _gather_rows,
            send=_send_rows,
            send_back=_send_row_grads,
            collect_back=_sum,
        ),
        MoveKind(
            "scatter_batch", PARTIAL, BATCH, "reduce_scatter", _by_rows(regions.scatter_batch), _mirror(_gather_rows)
        ),
        MoveKind(
            "gather_features",
            FEATURES,
            REPLICATE,
            "all_gather",
            _by_columns(regions.gather_features),
            _gather_columns,
        ),
        MoveKind(
            "reduce_scatter_features",
            PARTIAL,
            FEATURES,
            "reduce_scatter",
            _by_columns(regions.reduce_scatter_features),
            _mirror(_gather_columns),
        ),
        MoveKind(
            "batch_to_features",
            BATCH,
            FEATURES,
            "all_to_all",
            regions.batch_to_features,
            _rows_to_columns,
            send=_send_columns,
            send_back=_send_column_grads,
            collect_back=lambda received: torch.cat(received, 1),
        ),
        MoveKind(
            "features_to_batch", FEATURES, BATCH, "all_to_all", regions.features_to_batch, _mirror(_rows_to_columns)
        ),
    )
}


@dataclass(frozen=True)
class Move:
    """One move of a head's program: its kind, the feature width it moves, its ledger tag."""

    kind: str
    width: int
    tag: str

    @property
    def spec(self) -> MoveKind:
        return MOVES[self.kind]


def head_layout(
    widths: Sequence[tuple[int, int]], styles: Sequence[str]
) -> tuple[list[tuple[list[tuple[str, int]], list[tuple[str, int]]]], list[tuple[str, int]]]:
    """The moves a head of Linear layers ``widths = [(in, out), ...]`` laid out as ``styles``
    ('col' | 'row' per layer) needs: for each Linear, ``(moves before it, moves after it)``, and
    the moves after the last layer; each a ``(kind, width)`` pair.

    A column layer needs every feature of every example; a row layer needs ``Shard(1)`` and
    gives ``Partial``; an elementwise layer needs ``Shard(0)`` or ``Shard(1)`` (never
    ``Partial``), so it runs after the moves that follow the previous Linear; the loss needs
    ``Shard(0)``."""
    per_layer, state = [], BATCH
    for i, ((n_in, n_out), style) in enumerate(zip(widths, styles, strict=True)):
        last = i == len(widths) - 1
        if style == "col":
            per_layer.append(([("gather_batch" if state == BATCH else "gather_features", n_in)], []))
            state = FEATURES
        elif style == "row":
            before = [("batch_to_features", n_in)] if state == BATCH else []
            per_layer.append((before, [("scatter_batch" if last else "reduce_scatter_features", n_out)]))
            state = BATCH if last else FEATURES
        else:
            raise ValueError(f"style must be 'col' or 'row', got {style!r}")
    return per_layer, ([("features_to_batch", widths[-1][1])] if state == FEATURES else [])


def head_moves(widths: Sequence[tuple[int, int]], styles: Sequence[str]) -> list[tuple[str, int]]:
    """Every move of the head, in order (see :func:`head_layout`)."""
    per_layer, tail = head_layout(widths, styles)
    return [m for before, after in per_layer for m in (*before, *after)] + tail


def head_message_steps(widths: Sequence[tuple[int, int]], styles: Sequence[str], K: int) -> int:
    """Message steps of the head's moves over K workers, forward and backward."""
    return sum(2 * MOVES[kind].steps(K) for kind, _ in head_moves(widths, styles))
