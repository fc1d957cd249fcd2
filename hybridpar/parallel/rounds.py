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
from hybridpar.parallel.cost import scheme_rounds

SCHEMES = ("a", "b", "c")


def round_sizes(scheme: str, b: int, K: int) -> list[list[int]]:
    """``sizes[j][k]``: how many of worker k's examples take part in round j."""
    if scheme not in ("b", "c"):
        raise ValueError(f"scheme {scheme!r} has no rounds")
    return scheme_rounds(scheme, b, K)


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
    (``gather_batch``) or with this worker's feature slice (``batch_to_features``)."""
    K, n = comm.world_size, h.shape[1]
    if kind == "gather_batch":
        return comm.all_to_all_async([h] * K, [torch.Size((s, n)) for s in sizes], tag)
    fs = even_split(n, K)
    chunks = [c.contiguous() for c in h.split(fs, 1)]
    return comm.all_to_all_async(chunks, [torch.Size((s, fs[comm.rank])) for s in sizes], tag)


def inputs_from(kind: str, received: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(received, 0)


def send_grads(kind: str, g: torch.Tensor, comm: Communicator, sizes: list[int], width: int, tag: str) -> Handle:
    """Start returning the gradient of the round's head input to the examples' owners: partial
    sums over the shards (``gather_batch``) or feature slices (``batch_to_features``)."""
    K, r = comm.world_size, comm.rank
    chunks = [c.contiguous() for c in g.split(sizes, 0)]
    if kind == "gather_batch":
        return comm.all_to_all_async(chunks, [torch.Size((sizes[r], width))] * K, tag)
    fs = even_split(width, K)
    return comm.all_to_all_async(chunks, [torch.Size((sizes[r], f)) for f in fs], tag)


def grads_from(kind: str, received: list[torch.Tensor]) -> torch.Tensor:
    if kind == "gather_batch":
        out = received[0].clone()
        for t in received[1:]:
            out += t
        return out
    return torch.cat(received, 1)
