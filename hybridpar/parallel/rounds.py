"""The paper's schemes (b) and (c): the head works through the global batch in K rounds.

Scheme (a) moves every example's features before the head starts. In (b), round j moves only
worker j's b examples, and in (c) every worker moves b/K of its examples in every round (so
every link carries traffic in every round). While the head computes round j, round j+1's
features are already in flight, and round j's feature gradients travel back to their owners
while round j+1 computes: the exchange hides behind the FC work.

The first move of the head (features to the shards) and its mirror (feature gradients back) are
issued here as async operations; the moves inside the head stay inside autograd, as in (a).
"""

from __future__ import annotations

import torch

from hybridpar.comm.base import Communicator, Handle, even_split
from hybridpar.comm.regions import columns_to_rows_chunks, rows_to_columns_chunks


def own_rows(sizes: list[list[int]], rank: int) -> list[slice]:
    """The rows of this worker's local batch that take part in each round."""
    out, lo = [], 0
    for row in sizes:
        out.append(slice(lo, lo + row[rank]))
        lo += row[rank]
    return out


def send_inputs(kind: str, h: torch.Tensor, comm: Communicator, sizes: list[int], tag: str) -> Handle:
    """Start moving this worker's round rows ``h`` (its ``sizes[rank]`` examples, all features)
    to the layout the head's first layer needs: every example of the round, with all features
    (``gather_batch``) or with this worker's feature slice (``batch_to_features``). What arrives
    is concatenated along dim 0."""
    K, n = comm.world_size, h.shape[1]
    if kind == "gather_batch":
        return comm.all_to_all_async([h] * K, [torch.Size((s, n)) for s in sizes], tag)
    return comm.all_to_all_async(*rows_to_columns_chunks(h, comm.rank, sizes, even_split(n, K)), tag)


def send_grads(kind: str, g: torch.Tensor, comm: Communicator, sizes: list[int], width: int, tag: str) -> Handle:
    """Start returning the gradient of the round's head input to the examples' owners: partial
    sums over the shards (``gather_batch``) or feature slices (``batch_to_features``)."""
    K, r = comm.world_size, comm.rank
    if kind == "gather_batch":
        chunks = [c.contiguous() for c in g.split(sizes, 0)]
        return comm.all_to_all_async(chunks, [torch.Size((sizes[r], width))] * K, tag)
    return comm.all_to_all_async(*columns_to_rows_chunks(g, r, sizes, even_split(width, K)), tag)


def grads_from(kind: str, received: list[torch.Tensor]) -> torch.Tensor:
    if kind == "gather_batch":
        out = received[0].clone()
        for t in received[1:]:
            out += t
        return out
    return torch.cat(received, 1)
