"""The model-parallel head: which Linear is column- or row-parallel, and the moves between them.

A layout ("plan") is a style per Linear layer, ``'col'`` or ``'row'``. From it follow the
activation moves (the step program: :func:`hybridpar.parallel.program.head_layout`). ``plan='min_bytes'`` picks
the styles that move the fewest bytes; ``'paper'`` is the paper's chain (gather the features,
then column, row, row, ...); an explicit tuple is taken as given.

For AlexNet (9216 → 4096 → 4096 → C) at K ≥ 2 the fewest bytes come from *row, row, row*:
an all-to-all hands each worker its 1/K slice of every example's 9216 features
(2(K-1)·b·9216/K elements) instead of all of them (2(K-1)·b·9216), and the row layers reduce-
scatter their 4096- and 4096-wide outputs. At K = 8 that is 28% fewer bytes than the paper's
chain (2(K-1)·b·(1152 + 4096 + 4096 + 1000) vs 2(K-1)·b·(9216 + 4096 + 1000) elements).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from hybridpar.errors import ShardingError
from hybridpar.models.split import ELEMENTWISE_MODULES, Elementwise, split_model
from hybridpar.parallel.cost import head_bytes, two_d_step_bytes
from hybridpar.parallel.data_parallel import TRUNK_BUCKET_ELEMENTS, trunk_bucket_numels
from hybridpar.parallel.linear import ColumnParallelLinear, RowParallelLinear, WorkerDropout
from hybridpar.parallel.program import Move, head_layout

# Layers that act on each activation independently: they may run on any part of a tensor.
ELEMENTWISE = (*ELEMENTWISE_MODULES, Elementwise)


def linear_widths(head: Sequence[nn.Module], names: Sequence[str], world_size: int) -> list[tuple[int, int, int]]:
    """``(index, in, out)`` of each Linear in ``head`` (its layers, named ``names``); raises
    :class:`ShardingError` on any layer the hybrid cannot shard, or a width smaller than the
    number of workers."""
    found = []
    for i, (m, name) in enumerate(zip(head, names, strict=True)):
        if isinstance(m, nn.Linear):
            for what, n in (("input", m.in_features), ("output", m.out_features)):
                if n < world_size:
                    raise ShardingError(
                        f"cannot shard {name} (Linear {m.in_features}->{m.out_features}) over {world_size} workers: "
                        f"its {what} width {n} is smaller than the number of workers"
                    )
            found.append((i, m.in_features, m.out_features))
        elif not isinstance(m, ELEMENTWISE):
            raise ShardingError(
                f"cannot shard {name} ({type(m).__name__}): the head may hold only Linear layers and "
                f"elementwise layers ({', '.join(t.__name__ for t in ELEMENTWISE)}); move it into the trunk"
            )
    if not found:
        raise ShardingError(f"the head ({', '.join(names)}) has no Linear layer to shard")
    return found


def choose_styles(
    widths: Sequence[tuple[int, int]], world_size: int, plan: str | Sequence[str] = "min_bytes"
) -> tuple[str, ...]:
    paper = ("col",) + ("row",) * (len(widths) - 1)
    if plan == "paper":
        return paper
    if plan == "min_bytes":
        # Bytes are linear in b, so b = 1 ranks the layouts for every batch. Ties go to the
        # paper's chain (e.g. K = 1), then to the layout with fewer column layers.
        others = sorted(itertools.product(("col", "row"), repeat=len(widths)), key=lambda s: s.count("col"))
        candidates = [paper] + [s for s in others if s != paper]

        def total(styles):
            return sum(head_bytes(widths, styles, 1, world_size, r) for r in range(world_size))

        return min(candidates, key=total)
    styles = tuple(plan)
    if len(styles) != len(widths) or any(s not in ("col", "row") for s in styles):
        raise ShardingError(f"plan {list(styles)} must give 'col' or 'row' for each of the {len(widths)} Linear layers")
    return styles


def shard_head(
    head: Sequence[nn.Module],
    names: Sequence[str],
    rank: int,
    world_size: int,
    plan: str | Sequence[str],
    dropout_seed: int,
) -> tuple[list[nn.Module], list[int | Move], tuple[str, ...]]:
    """This worker's copy of the ``head`` layers (named ``names``: ledger tags, messages) with its
    Linear layers sharded, and the program that runs it: layer indices and :class:`Move` s, in order."""
    found = linear_widths(head, names, world_size)
    widths = [(n_in, n_out) for _, n_in, n_out in found]
    styles = choose_styles(widths, world_size, plan)
    per_linear, tail = head_layout(widths, styles)
    linear_of = {i: k for k, (i, _, _) in enumerate(found)}

    layers: list[nn.Module] = []
    program: list[int | Move] = []
    for i, m in enumerate(head):
        if i in linear_of:
            k = linear_of[i]
            before, after = per_linear[k]
            program += [Move(kind, width, f"{names[i]}.in") for kind, width in before]
            layers.append((ColumnParallelLinear if styles[k] == "col" else RowParallelLinear)(m, rank, world_size))
            program += [i, *(Move(kind, width, f"{names[i]}.out") for kind, width in after)]
        else:
            # Dropout draws from the worker's own generator, one stream per layer.
            layers.append(WorkerDropout(m.p, dropout_seed + i) if isinstance(m, nn.Dropout) else m)
            program.append(i)
    # A final column layer hands each example's logits to its owner.
    program += [Move(kind, width, f"{names[found[-1][0]]}.out") for kind, width in tail]
    return layers, program, styles


def fewest_bytes_group(
    model: nn.Module, K: int, b: int, plan="min_bytes", head: str | None = None, bucket_cap: int = TRUNK_BUCKET_ELEMENTS
) -> int:
    """The FC group size G (dividing K) whose 2-D layout sends the fewest bytes per worker and step
    (``parallel.fc_group_size=auto``); ties go to the larger G (fewer head-gradient all-reduces)."""
    split = split_model(model, head)
    widths, trunk = split.head_widths(model), trunk_bucket_numels(split.trunk_numels(model), bucket_cap)
    options = [g for g in range(1, K + 1) if K % g == 0]
    return min(options, key=lambda g: (two_d_step_bytes(widths, choose_styles(widths, g, plan), trunk, b, K, g), -g))
