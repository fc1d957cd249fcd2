"""BatchNorm in the replicated trunk normalises by the global batch: VGG-11-BN as a hybrid equals
the single device, running statistics included; per-worker statistics would not."""

from __future__ import annotations

import functools

import pytest
import torch

from hybridpar.comm import run_emulated
from hybridpar.models import vgg
from hybridpar.parallel import HybridModel
from hybridpar.verify import Case, compare, hybrid_worker, reference
from tests.helpers import results, run_gloo, seeded_model


def _small_vgg_bn():
    return vgg("vgg11", 10, 0.0, batch_norm=True, width=16, hidden=48, pool_size=1)


def _vgg_bn():
    return seeded_model(_small_vgg_bn)


def _buffers_after_steps(comm, case: Case, sync_bn: bool):
    hybrid = HybridModel(_vgg_bn(), comm, fc_group_size=case.fc_group_size, sync_bn=sync_bn)
    opt = case.optimizer(hybrid.parameters())
    lo, hi = comm.rank * case.local_batch, (comm.rank + 1) * case.local_batch
    for x, y in case.batches():
        opt.zero_grad(set_to_none=True)
        hybrid.train_step(x[lo:hi], y[lo:hi], optimizer=opt)
        opt.step()
    return {n: b.clone() for n, b in hybrid.named_buffers() if "running" in n}


@functools.cache
def _reference(K: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The single device on ``Case(K, local_batch=3)``'s batches and its running statistics after
    them, run once per K (a case's fc_group_size shapes the hybrid only)."""
    model = _vgg_bn()
    ref = reference(Case(K, local_batch=3), model)  # trains it in place
    return ref, {n: b for n, b in model.named_buffers() if "running" in n}


@pytest.mark.parametrize("K, G", [(2, 2), (4, 2), (4, 4)])
def test_vgg_bn_hybrid_equals_the_single_device(K, G):
    case = Case(K, local_batch=3, fc_group_size=G)
    ref, want = _reference(K)
    compare(run_emulated(K, hybrid_worker, case, _vgg_bn()), ref)
    for got in run_emulated(K, _buffers_after_steps, case, True):
        for n, b in want.items():
            torch.testing.assert_close(got[n], b, rtol=1e-5, atol=1e-6, msg=n)


def test_per_worker_statistics_would_differ():
    case = Case(2, local_batch=3)
    got = run_emulated(2, _buffers_after_steps, case, False)[0]
    want = _reference(case.world_size)[1]
    assert max((got[n] - want[n]).abs().max().item() for n in want) > 1e-3


@pytest.mark.timeout(180)
def test_vgg_bn_over_gloo():
    case = Case(2, local_batch=3)
    workers = results(run_gloo(2, _gloo_worker))
    compare(workers, _reference(case.world_size)[0])


def _gloo_worker(comm):
    return hybrid_worker(comm, Case(2, local_batch=3), _vgg_bn())


def _weak_refs_after_a_step(comm):
    import weakref

    case = Case(2, local_batch=3)
    hybrid = HybridModel(_vgg_bn(), comm)
    opt = case.optimizer(hybrid.parameters())
    x, y = case.batches()[0]
    hybrid.train_step(x[comm.rank * 3 : (comm.rank + 1) * 3], y[comm.rank * 3 : (comm.rank + 1) * 3])
    opt.step()
    return [weakref.ref(hybrid), *(weakref.ref(p) for p in hybrid.parameters())]


def test_a_hybrid_model_is_freed_once_dropped():
    """Nothing keeps a trained hybrid alive through autograd's C++ side (gradient hooks, a
    BatchNorm backward node): a sweep or a test suite that builds many models does not leak them."""
    import gc

    refs = [r for worker in run_emulated(2, _weak_refs_after_a_step) for r in worker]
    gc.collect()
    assert [r for r in refs if r() is not None] == []
