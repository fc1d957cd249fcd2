"""Closed-form bytes per step: what the ledger must record, derived from the layout alone.

Per worker ``k`` of ``K``, local batch ``b``, a width ``n`` cut into ``s = even_split(n, K)``,
forward + backward together (every move below sends and receives the same amount):

==================================  =========================  ===========================
move (forward / backward)           elements sent by worker k   even split
==================================  =========================  ===========================
gather_batch  (all-gather / RS)     2·(K-1)·b·n                 2(K-1)·b·n
scatter_batch (RS / all-gather)     2·(K-1)·b·n                 2(K-1)·b·n
reduce_scatter_features / gather    K·b·(n + (K-2)·s_k)         2(K-1)·b·n
batch_to_features / back (all-to-all) b·(n + (K-2)·s_k)         2(K-1)·b·n / K
trunk gradient all-reduce, P params P + (K-2)·c_k               2(K-1)·P / K
==================================  =========================  ===========================

plus one 9-int64 shape agreement per step ((K-1)·72 bytes). DDP over the whole model moves
the all-reduce of all parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from hybridpar.comm.base import even_split

AGREE_BYTES_PER_PEER = 9 * 8


def move_elements(kind: str, n: int, b: int, K: int, rank: int) -> int:
    """Elements worker ``rank`` sends (= receives) for one move, forward and backward."""
    s = even_split(n, K)[rank]
    if kind in ("gather_batch", "scatter_batch"):
        return 2 * (K - 1) * b * n
    if kind in ("reduce_scatter_features", "gather_features"):
        return K * b * (n + (K - 2) * s)
    if kind in ("batch_to_features", "features_to_batch"):
        return b * (n + (K - 2) * s)
    raise ValueError(f"unknown move {kind!r}")


def head_moves(widths: Sequence[tuple[int, int]], styles: Sequence[str]) -> list[tuple[str, int]]:
    """The activation moves of a head of Linear layers ``widths = [(in, out), ...]`` laid out as
    ``styles`` ('col' | 'row' per layer), as ``(move, width)`` pairs.

    Layouts between layers: B = own examples, F = all examples / own feature slice, P = partial
    sums. A column layer needs every feature of every example; a row layer needs F; a
    nonlinearity needs B or F (never P); the loss needs B.
    """
    moves: list[tuple[str, int]] = []
    state = "B"
    for i, ((n_in, n_out), style) in enumerate(zip(widths, styles)):
        last = i == len(widths) - 1
        if style == "col":
            moves.append(("gather_batch" if state == "B" else "gather_features", n_in))
            state = "F"
        elif style == "row":
            if state == "B":
                moves.append(("batch_to_features", n_in))
            moves.append(("scatter_batch" if last else "reduce_scatter_features", n_out))
            state = "B" if last else "F"
        else:
            raise ValueError(f"style must be 'col' or 'row', got {style!r}")
    if state == "F":
        moves.append(("features_to_batch", widths[-1][1]))
    return moves


def head_bytes(widths, styles, b: int, K: int, rank: int, itemsize: int = 4) -> int:
    if K == 1:
        return 0
    return itemsize * sum(move_elements(kind, n, b, K, rank) for kind, n in head_moves(widths, styles))


def allreduce_bytes(n_params: int, K: int, rank: int, itemsize: int = 4) -> int:
    if K == 1:
        return 0
    return itemsize * (n_params + (K - 2) * even_split(n_params, K)[rank])


def hybrid_step_bytes(widths, styles, trunk_params: int, b: int, K: int, rank: int, itemsize: int = 4) -> int:
    """Bytes worker ``rank`` sends (= receives) in one hybrid step: head moves, the trunk
    gradient all-reduce and the batch-shape agreement."""
    if K == 1:
        return 0
    return (
        head_bytes(widths, styles, b, K, rank, itemsize)
        + allreduce_bytes(trunk_params, K, rank, itemsize)
        + (K - 1) * AGREE_BYTES_PER_PEER
    )


def ddp_step_bytes(n_params: int, K: int, rank: int = 0, itemsize: int = 4) -> int:
    """Bytes per worker of a data-parallel step that all-reduces every gradient."""
    return allreduce_bytes(n_params, K, rank, itemsize)
