"""hybridpar/parallel/powersgd.py against its definition, written here from torch alone: the sum
of the workers' gradients (exact where the rank covers the matrices), error feedback that loses
nothing over steps, identical results on every worker, and the elements each step moves."""

from __future__ import annotations

import pytest
import torch

from hybridpar.comm import run_emulated
from hybridpar.parallel.powersgd import PowerSGD, compressible, step_elements
from tests.helpers import results, run_gloo

SHAPES = [torch.Size([6, 3, 2, 2]), torch.Size([6]), torch.Size([5, 7]), torch.Size([2, 2])]


def _grads(rank: int, step: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _reduce(comm, r: int, steps: int, dtype=torch.float64):
    psgd = PowerSGD(comm, r)
    out = []
    for t in range(steps):
        pending = psgd.start(0, _grads(comm.rank, t, dtype))
        psgd.middle(pending)
        out.append(psgd.finish(pending))
    return out, {k: e.clone() for k, e in psgd.errors.items()}


@pytest.mark.parametrize("K", [2, 3])
def test_a_rank_covering_the_matrices_gives_the_exact_sum(K):
    for t, summed in enumerate(run_emulated(K, _reduce, 12, 2)[0][0]):
        want = [sum(_grads(k, t)[i] for k in range(K)) for i in range(len(SHAPES))]
        for got, w in zip(summed, want, strict=True):
            torch.testing.assert_close(got, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("K", [2, 3])
def test_rank_one_error_feedback_loses_nothing_over_the_steps(K):
    """Σ_t applied_t + Σ_k e_k(T) = Σ_t Σ_k G_k,t: what compression held back is still owed."""
    steps = 4
    runs = run_emulated(K, _reduce, 1, steps)
    for i in range(len(SHAPES)):
        applied = sum(runs[0][0][t][i] for t in range(steps))
        owed = sum(run[1].get((0, i), torch.zeros(SHAPES[i], dtype=torch.float64)) for run in runs)
        truth = sum(_grads(k, t)[i] for k in range(K) for t in range(steps))
        torch.testing.assert_close(applied + owed, truth, rtol=1e-9, atol=1e-9)
    # Rank 1 is lossy on the 5 × 7 matrix: one step's sum differs from the truth.
    truth0 = sum(_grads(k, 0)[2] for k in range(K))
    assert (runs[0][0][0][2] - truth0).abs().max() > 1e-3
    # Every worker holds the same sums.
    for run in runs[1:]:
        for a, b in zip(run[0][-1], runs[0][0][-1], strict=True):
            assert torch.equal(a, b)


def test_what_goes_compressed_and_the_elements_moved():
    assert compressible(torch.Size([6, 3, 2, 2]), 2)  # 2·(6 + 12) = 36 < 72
    assert not compressible(torch.Size([6]), 2)
    assert not compressible(torch.Size([2, 2]), 2)  # no gain
    assert step_elements(SHAPES, 2) == 2 * (6 + 12) + 6 + 2 * (5 + 7) + 4

    def worker(comm):
        comm.ledger.reset()
        _reduce(comm, 2, 1, torch.float32)
        return comm.ledger.sent

    # K = 2: an all-reduce of n elements sends n (the ledger's ring count).
    assert run_emulated(2, worker) == [4 * step_elements(SHAPES, 2)] * 2


@pytest.mark.timeout(120)
def test_gloo_matches_the_emulation():
    want = run_emulated(2, _reduce, 1, 3)
    got = results(run_gloo(2, _reduce, 1, 3))
    for k in range(2):
        for t in range(3):
            for a, b in zip(got[k][0][t], want[k][0][t], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _hybrid_run(comm, model, rank: int, steps: int):
    from hybridpar import hybridize

    hybrid = hybridize(model, comm, trunk_powersgd_rank=rank)
    opt = torch.optim.SGD(hybrid.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(comm.rank)
    comm.ledger.reset()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x, y = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (3,), generator=g)
        hybrid.train_step(x, y, optimizer=opt)
        opt.step()
    trunk = sum(e.sent for e in comm.ledger.entries if e.tag == "trunk_grads") // steps
    return (
        {n: p.detach().clone() for n, p in hybrid.named_parameters()},
        trunk,
        [p.shape for p in hybrid.trunk_parameters()],
    )


@pytest.mark.parametrize("K", [2, 3])
def test_the_hybrid_with_full_rank_powersgd_is_the_exact_step(K):
    """Rank 64 covers every conv matrix of this trunk: the steps equal the uncompressed ones
    (float64, to the orthonormalisation's rounding); rank 1 moves fewer bytes and differs."""
    from hybridpar.models import alexnet_small

    model = alexnet_small(10, 0.0, in_channels=3, channels=(8, 16, 24, 16, 16), hidden=32).double()
    exact = run_emulated(K, _hybrid_run, model, 0, 3)
    full = run_emulated(K, _hybrid_run, model, 64, 3)
    low = run_emulated(K, _hybrid_run, model, 1, 3)
    for n, want in exact[0][0].items():
        torch.testing.assert_close(full[0][0][n], want, rtol=1e-8, atol=1e-10, msg=n)
    assert not torch.allclose(low[0][0]["features.3.weight"], exact[0][0]["features.3.weight"])
    assert torch.equal(low[0][0]["features.0.weight"], low[-1][0]["features.0.weight"])  # replicas agree
    assert low[0][1] < exact[0][1] / 2


def test_powersgd_is_refused_with_the_pipelined_sync_or_bf16():
    from hybridpar import hybridize
    from hybridpar.errors import ShardingError
    from hybridpar.models import alexnet_small

    model = alexnet_small(10, 0.0, in_channels=3, channels=(8, 16, 24, 16, 16), hidden=32)
    for kw in ({"trunk_sync": "pipelined"}, {"trunk_comm_dtype": torch.bfloat16}):
        with pytest.raises(ShardingError, match="trunk_powersgd_rank compresses whole parameters"):
            run_emulated(2, lambda comm, kw=kw: hybridize(model, comm, trunk_powersgd_rank=2, **kw))
