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


def move_sent_recv(kind: str, n: int, betas: Sequence[int], rank: int) -> tuple[int, int]:
    """Elements worker ``rank`` sends and receives in the *forward* direction of one move, when
    worker k brings ``betas[k]`` examples (``[b] * K`` in scheme (a); one round in (b)/(c)).
    The backward move is the mirror image: it sends what the forward received, and vice versa."""
    K, B, beta = len(betas), sum(betas), betas[rank]
    s = even_split(n, K)[rank]
    if kind == "gather_batch":  # all-gather of rows: own rows to every peer
        return beta * n * (K - 1), (B - beta) * n
    if kind == "scatter_batch":  # reduce-scatter of rows: partial sums of the peers' rows out
        return (B - beta) * n, beta * n * (K - 1)
    if kind == "gather_features":  # all-gather of feature slices, every example
        return B * s * (K - 1), B * (n - s)
    if kind == "reduce_scatter_features":  # reduce-scatter of feature slices, every example
        return B * (n - s), B * s * (K - 1)
    if kind == "batch_to_features":  # all-to-all: own rows' other slices out, own slice of peers' rows in
        return beta * (n - s), (B - beta) * s
    if kind == "features_to_batch":
        return (B - beta) * s, beta * (n - s)
    raise ValueError(f"unknown move {kind!r}")


def move_elements(kind: str, n: int, betas: Sequence[int], rank: int) -> int:
    """Elements worker ``rank`` sends (= receives) for one move, forward and backward together."""
    sent, recv = move_sent_recv(kind, n, betas, rank)
    return sent + recv


def scheme_rounds(scheme: str, b: int, K: int) -> list[list[int]]:
    """Examples per worker in each round: one round of ``[b] * K`` for (a); K rounds for (b), (c)."""
    if scheme == "a":
        return [[b] * K]
    if scheme == "b":
        return [[b if k == j else 0 for k in range(K)] for j in range(K)]
    if scheme == "c":
        return [[s] * K for s in even_split(b, K)]
    raise ValueError(f"unknown scheme {scheme!r}")


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


def head_bytes(widths, styles, b: int, K: int, rank: int, itemsize: int = 4, scheme: str = "a") -> int:
    if K == 1:
        return 0
    moves = head_moves(widths, styles)
    return itemsize * sum(
        move_elements(kind, n, betas, rank) for betas in scheme_rounds(scheme, b, K) for kind, n in moves
    )


def allreduce_bytes(n_params: int | Sequence[int], K: int, rank: int, itemsize: int = 4) -> int:
    """One all-reduce of ``n_params`` elements, or one per bucket when given a list of sizes."""
    if K == 1:
        return 0
    sizes = [n_params] if isinstance(n_params, int) else list(n_params)
    return itemsize * sum(n + (K - 2) * even_split(n, K)[rank] for n in sizes)


def hybrid_step_bytes(
    widths, styles, trunk_params, b: int, K: int, rank: int, itemsize: int = 4, scheme: str = "a"
) -> int:
    """Bytes worker ``rank`` sends (= receives) in one hybrid step: head moves, the trunk
    gradient all-reduce (``trunk_params``: a count, or the bucket sizes) and the batch-shape agreement."""
    if K == 1:
        return 0
    return (
        head_bytes(widths, styles, b, K, rank, itemsize, scheme)
        + allreduce_bytes(trunk_params, K, rank, itemsize)
        + (K - 1) * AGREE_BYTES_PER_PEER
    )


def ddp_step_bytes(n_params: int, K: int, rank: int = 0, itemsize: int = 4) -> int:
    """Bytes per worker of a data-parallel step that all-reduces every gradient."""
    return allreduce_bytes(n_params, K, rank, itemsize)


def head_shard_params(widths: Sequence[tuple[int, int]], styles: Sequence[str], G: int, rank: int) -> int:
    """Parameters of worker ``rank``'s head shard when the head is cut over ``G`` workers (weights
    by rows or columns, biases by output slice)."""
    total = 0
    for (n_in, n_out), style in zip(widths, styles):
        s_out = even_split(n_out, G)[rank]
        total += (n_in * s_out if style == "col" else even_split(n_in, G)[rank] * n_out) + s_out
    return total


def two_d_step_bytes(
    widths, styles, trunk_params, b: int, K: int, G: int, rank: int = 0, itemsize: int = 4, scheme: str = "a"
) -> int:
    """Bytes per worker of the 2-D hybrid: the head sharded inside groups of ``G`` workers (its
    activations move only inside the group), each shard's gradient all-reduced over the ``K/G``
    workers holding the same shard, the trunk's over all ``K``. ``G = K`` is the 1-D hybrid
    (:func:`hybrid_step_bytes`); ``G = 1`` moves the trunk's and the whole head's gradients, as DDP."""
    if K % G:
        raise ValueError(f"the group size {G} must divide the number of workers {K}")
    r = rank % G
    return (
        head_bytes(widths, styles, b, G, r, itemsize, scheme)
        + allreduce_bytes(head_shard_params(widths, styles, G, r), K // G, rank // G, itemsize)
        + allreduce_bytes(trunk_params, K, rank, itemsize)
        + (G - 1) * AGREE_BYTES_PER_PEER
    )
