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

plus one 9-int64 shape agreement per step ((K-1)·72 bytes), and with ``trunk_sync=pipelined``
one int64 more (how far the backward got, agreed at its end). DDP over the whole model moves
the all-reduce of all parameters. Which moves a head runs, and each move's element count, are
the step program's (``program.py``); this module only adds them up.
"""

from __future__ import annotations

from collections.abc import Sequence

from hybridpar.comm.base import AGREE_ITEMSIZE, AGREE_WIDTH, even_split
from hybridpar.parallel.program import MOVES, head_moves, scheme_rounds

AGREE_BYTES_PER_PEER = AGREE_WIDTH * AGREE_ITEMSIZE


def head_bytes(widths, styles, b: int, K: int, rank: int, itemsize: int = 4, scheme: str = "a") -> int:
    if K == 1:
        return 0
    moves = head_moves(widths, styles)
    return itemsize * sum(
        MOVES[kind].elements(n, betas, rank) for betas in scheme_rounds(scheme, b, K) for kind, n in moves
    )


def allreduce_bytes(n_params: int | Sequence[int], K: int, rank: int, itemsize: int = 4) -> int:
    """One all-reduce of ``n_params`` elements, or one per bucket when given a list of sizes."""
    if K == 1:
        return 0
    sizes = [n_params] if isinstance(n_params, int) else list(n_params)
    return itemsize * sum(n + (K - 2) * even_split(n, K)[rank] for n in sizes)


def allreduce_steps(K: int) -> int:
    """Message steps of a ring all-reduce: a reduce-scatter and an all-gather pass, K - 1 each."""
    return 2 * (K - 1)


def hybrid_step_bytes(
    widths,
    styles,
    trunk_params,
    b: int,
    K: int,
    rank: int,
    itemsize: int = 4,
    scheme: str = "a",
    trunk_sync: str = "bucketed",
) -> int:
    """Bytes worker ``rank`` sends (= receives) in one hybrid step: head moves, the trunk
    gradient all-reduce (``trunk_params``: a count, or the bucket / partition sizes) and the
    batch-shape agreement; ``trunk_sync="pipelined"`` adds its end-of-backward agreement (one int64)."""
    if K == 1:
        return 0
    return (
        head_bytes(widths, styles, b, K, rank, itemsize, scheme)
        + allreduce_bytes(trunk_params, K, rank, itemsize)
        + (K - 1) * (AGREE_BYTES_PER_PEER + (AGREE_ITEMSIZE if trunk_sync == "pipelined" else 0))
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
