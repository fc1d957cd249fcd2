"""Each differentiable move of ``comm/regions.py`` and each model-parallel Linear on its own, forward
and backward, against its unsharded definition written with torch alone (torchtitan's shape of
test): the full tensors on one device, the loss ``Σ_r <G_r, out_r>`` with a different upstream
gradient ``G_r`` on every worker, and the gradients autograd gives for the full tensors, cut as
the workers hold them. K = 1..4 emulated with uneven row and column splits, K = 2 over gloo.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.comm import regions, run_emulated
from hybridpar.comm.base import even_split
from hybridpar.parallel import ColumnParallelLinear, RowParallelLinear
from tests.helpers import results, run_gloo

TOL = {"rtol": 1e-6, "atol": 1e-6}
WIDTH = 7  # features: uneven over 2, 3 and 4 workers


def _rows(K: int) -> list[int]:
    return [2 + r for r in range(K)]  # every worker a different number of examples


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cut(t: torch.Tensor, sizes: list[int], dim: int) -> list[torch.Tensor]:
    return list(t.split(sizes, dim))


# Each move: (input of worker r from the full tensors, the reference outputs of all workers from
# the full inputs). Inputs are made from full tensors so the reference sees the same numbers.
def _inputs(kind: str, K: int) -> list[torch.Tensor]:
    rows, cols, n = _rows(K), even_split(WIDTH, K), sum(_rows(K))
    if kind in ("gather_batch", "batch_to_features"):  # own examples, all features
        return _cut(_randn(n, WIDTH, seed=1), rows, 0)
    if kind in ("gather_features", "features_to_batch"):  # all examples, own feature slice
        return _cut(_randn(n, WIDTH, seed=2), cols, 1)
    # partial sums (all examples, all features), a different one on every worker
    return [_randn(n, WIDTH, seed=10 + r) for r in range(K)]


def _reference(kind: str, xs: list[torch.Tensor], K: int) -> list[torch.Tensor]:
    rows, cols = _rows(K), even_split(WIDTH, K)
    if kind == "gather_batch":
        return [torch.cat(xs, 0)] * K
    if kind == "gather_features":
        return [torch.cat(xs, 1)] * K
    if kind == "scatter_batch":
        return _cut(sum(xs), rows, 0)
    if kind == "reduce_scatter_features":
        return _cut(sum(xs), cols, 1)
    if kind == "batch_to_features":
        return _cut(torch.cat(xs, 0), cols, 1)
    if kind == "features_to_batch":
        return _cut(torch.cat(xs, 1), rows, 0)
    raise ValueError(kind)


def _move(kind: str, x: torch.Tensor, comm) -> torch.Tensor:
    rows, cols = _rows(comm.world_size), even_split(WIDTH, comm.world_size)
    if kind in ("gather_batch", "scatter_batch"):
        return getattr(regions, kind)(x, comm, rows)
    if kind in ("gather_features", "reduce_scatter_features"):
        return getattr(regions, kind)(x, comm, cols)
    return getattr(regions, kind)(x, comm, rows, cols)


def _upstream(shape, rank: int) -> torch.Tensor:
    return _randn(*shape, seed=1000 + rank)


def _worker(comm, kind: str):
    x = _inputs(kind, comm.world_size)[comm.rank].clone().requires_grad_()
    out = _move(kind, x, comm)
    (out * _upstream(out.shape, comm.rank)).sum().backward()
    return out.detach(), x.grad


KINDS = [
    "gather_batch",
    "scatter_batch",
    "gather_features",
    "reduce_scatter_features",
    "batch_to_features",
    "features_to_batch",
]


def _check(kind: str, K: int, got: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    xs = [x.clone().requires_grad_() for x in _inputs(kind, K)]
    outs = _reference(kind, xs, K)
    sum((o * _upstream(o.shape, r)).sum() for r, o in enumerate(outs)).backward()
    for r, (out, grad) in enumerate(got):
        torch.testing.assert_close(
            out, outs[r].detach(), **TOL, msg=lambda m, r=r: f"{kind} K={K} worker {r} forward: {m}"
        )
        torch.testing.assert_close(grad, xs[r].grad, **TOL, msg=lambda m, r=r: f"{kind} K={K} worker {r} backward: {m}")


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_each_move_forward_and_backward_equals_its_definition(kind, K):
    _check(kind, K, run_emulated(K, _worker, kind))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["gather_batch", "reduce_scatter_features", "batch_to_features"])
def test_moves_over_gloo(kind):
    _check(kind, 2, results(run_gloo(2, _worker, kind)))


def test_the_move_check_can_fail():
    """A move with a wrong backward (the gradient not summed over the workers) is caught."""

    def wrong(comm):
        x = _inputs("gather_batch", 2)[comm.rank].clone().requires_grad_()
        out = regions._GatherBatch.apply(x, comm, _rows(2), "t")
        out.register_hook(lambda g: g * (comm.rank + 1))  # as if the gradient were not reduced
        (out * _upstream(out.shape, comm.rank)).sum().backward()
        return out.detach(), x.grad

    with pytest.raises(AssertionError, match="backward"):
        _check("gather_batch", 2, run_emulated(2, wrong))


# ---- the model-parallel Linear layers ---------------------------------------------------------


def _full_linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)
    with torch.no_grad():  # from a generator of its own: emulated workers share torch's global one
        layer.weight.copy_(_randn(n_out, n_in, seed=5))
        if bias:
            layer.bias.copy_(_randn(n_out, seed=6))
    return layer


def _linear_worker(comm, style: str, bias: bool):
    K, r = comm.world_size, comm.rank
    full = _full_linear(WIDTH, 5, bias)
    x_full = _randn(4, WIDTH, seed=3)
    if style == "col":
        layer, x = ColumnParallelLinear(full, r, K), x_full.clone()  # every example, every feature
    else:
        layer, x = RowParallelLinear(full, r, K), _cut(x_full, even_split(WIDTH, K), 1)[r].clone()
    x.requires_grad_()
    y = layer(x)
    # Column: this worker's output columns. Row: a partial sum of every output (summed by a move).
    (y * (_upstream(y.shape, r) if style == "col" else _upstream(y.shape, 0))).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("style", ["col", "row"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_parallel_linear_forward_and_backward_equal_nn_linear(K, style, bias):
    got = run_emulated(K, _linear_worker, style, bias)
    full = _full_linear(WIDTH, 5, bias)
    x = _randn(4, WIDTH, seed=3).requires_grad_()
    y = F.linear(x, full.weight, full.bias)
    outs, ins = even_split(5, K), even_split(WIDTH, K)
    if style == "col":
        upstream = torch.cat([_upstream((4, outs[r]), r) for r in range(K)], 1)
    else:
        upstream = _upstream((4, 5), 0)
    (y * upstream).sum().backward()
    if style == "col":
        for r, (y_r, _, g) in enumerate(got):
            torch.testing.assert_close(y_r, _cut(y.detach(), outs, 1)[r], **TOL)
            torch.testing.assert_close(g["weight"], _cut(full.weight.grad, outs, 0)[r], **TOL)
            if bias:
                torch.testing.assert_close(g["bias"], _cut(full.bias.grad, outs, 0)[r], **TOL)
        # The input is replicated: each worker's gradient is its shard's part, they sum to the whole.
        torch.testing.assert_close(sum(x_grad for _, x_grad, _ in got), x.grad, **TOL)
    else:
        torch.testing.assert_close(sum(y_r for y_r, _, _ in got), y.detach(), **TOL)  # partial sums add up
        for r, (_, x_grad, g) in enumerate(got):
            torch.testing.assert_close(x_grad, _cut(x.grad, ins, 1)[r], **TOL)
            torch.testing.assert_close(g["weight"], _cut(full.weight.grad, ins, 1)[r], **TOL)
            if bias:  # each bias entry is added (and gets its gradient) on exactly one worker
                torch.testing.assert_close(g["bias"], _cut(full.bias.grad, outs, 0)[r], **TOL)
