"""parallel.chunk_trunk (schemes b, c) and parallel.micro_batches (scheme a): the trunk run
round by round.

Where the trunk treats every example on its own (no BatchNorm), running it on each round's rows
apart gives the gradients of one pass: checked in float64 against the unchunked path (emulated
K = 2, 3, 4 with uneven rounds, and gloo K = 2) and against the torch-only single-device loop
(tests/zoo.py) on torchvision's AlexNet; BatchNorm and mismatched schemes are refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from hybridpar import hybridize
from hybridpar.comm import run_emulated
from hybridpar.errors import ShardingError
from hybridpar.parallel import assemble
from tests import zoo
from tests.helpers import results, run_gloo


def _train(comm, run: zoo.Run, model, scheme: str, chunk: bool, trunk_sync: str, fc_batch: str, micro: int = 1):
    hybrid = hybridize(model, comm, chunk_trunk=chunk, micro_batches=micro, trunk_sync=trunk_sync)
    opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM)
    lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
    losses = []
    for x, y in run.batches():
        opt.zero_grad(set_to_none=True)
        loss, _ = hybrid.train_step(x[lo:hi], y[lo:hi], scheme=scheme, fc_batch=fc_batch, optimizer=opt)
        losses.append(loss)
        opt.step()
    hybrid.flush()
    return {n: p.detach().clone() for n, p in hybrid.named_parameters()}, hybrid.shard_specs(), losses


def _assembled(workers):
    return assemble([w[0] for w in workers], workers[0][1])


def _small(run: zoo.Run):
    from hybridpar.models import alexnet_small

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = alexnet_small(zoo.NUM_CLASSES, 0.0, in_channels=3, channels=(8, 16, 24, 16, 16), hidden=48)
    return model.to(run.dtype)


def _close(got, want, tol=1e-10):
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=tol, atol=tol * 1e-2, msg=n)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("K, b", [(2, 5), (3, 4), (4, 6)])
@pytest.mark.parametrize("trunk_sync", ["bucketed", "pipelined"])
@pytest.mark.parametrize("scheme", ["b", "c"])
def test_chunked_trunk_equals_the_unchunked_step(K, b, trunk_sync, scheme):
    """float64, uneven rounds (b not a multiple of K)."""
    run = zoo.Run("alexnet", workers=K, local_batch=b, steps=3)
    model = _small(run)
    want = _assembled(run_emulated(K, _train, run, model, scheme, False, "bucketed", "full"))
    got = _assembled(run_emulated(K, _train, run, model, scheme, True, trunk_sync, "full"))
    _close(got, want)
    assert not torch.equal(got["features.0.weight"], model.features[0].weight)  # it trained


@pytest.mark.timeout(300)
@pytest.mark.parametrize("K, b, m", [(2, 5, 3), (3, 4, 2), (4, 6, 4)])
@pytest.mark.parametrize("trunk_sync", ["bucketed", "pipelined"])
def test_micro_batches_equal_one_pass(K, b, m, trunk_sync):
    """Scheme (a) in m micro-batches (uneven: b not a multiple of m) against (a) in one pass."""
    run = zoo.Run("alexnet", workers=K, local_batch=b, steps=3)
    model = _small(run)
    want = _assembled(run_emulated(K, _train, run, model, "a", False, "bucketed", "full"))
    got = _assembled(run_emulated(K, _train, run, model, "a", False, trunk_sync, "full", m))
    _close(got, want)
    assert not torch.equal(got["classifier.1.weight"], model.classifier[1].weight)  # it trained


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme, chunk, micro", [("a", False, 3), ("b", True, 1), ("c", True, 1)])
def test_chunked_trunk_equals_one_device(scheme, chunk, micro):
    """torchvision's AlexNet, float64, K = 3: against the torch-only single-device loop."""
    run = zoo.Run("alexnet", workers=3, local_batch=3, steps=2)
    model = run.model()
    got = _assembled(run_emulated(3, _train, run, model, scheme, chunk, "pipelined", "full", micro))
    one = zoo.one_device_params(run)  # the same loop for every scheme (and tests/test_weight_first.py)
    scale = max(t.abs().max().item() for t in one.values())
    for n, t in one.items():
        torch.testing.assert_close(got[n], t, rtol=1e-7, atol=1e-7 * scale, msg=n)


@pytest.mark.timeout(300)
def test_chunked_trunk_with_the_papers_fc_batch():
    """fc_batch=chunk (the head steps every round) is unchanged by running the trunk in chunks."""
    run = zoo.Run("alexnet", workers=2, local_batch=4, steps=2)
    model = _small(run)
    for scheme in ("b", "c"):
        want = _assembled(run_emulated(2, _train, run, model, scheme, False, "bucketed", "chunk"))
        got = _assembled(run_emulated(2, _train, run, model, scheme, True, "bucketed", "chunk"))
        _close(got, want)


def _every_scheme(comm, run, model):
    """On one gloo worker: each scheme unchunked and chunked (a: 3 micro-batches)."""
    out = {}
    for scheme, micro in (("a", 3), ("b", 1), ("c", 1)):
        out[scheme, False] = _train(comm, run, model, scheme, False, "bucketed", "full")
        out[scheme, True] = _train(comm, run, model, scheme, micro == 1, "pipelined", "full", micro)
    return out


@pytest.mark.timeout(300)
def test_chunked_trunk_over_gloo():
    """Two gloo processes, float64: every scheme's chunked step equals its one-pass step."""
    run = zoo.Run("alexnet", workers=2, local_batch=5, steps=2)
    model = _small(run)
    workers = results(run_gloo(2, _every_scheme, run, model))
    for scheme in "abc":
        want = _assembled([w[scheme, False] for w in workers])
        got = _assembled([w[scheme, True] for w in workers])
        _close(got, want)


def test_batchnorm_and_mismatched_schemes_are_refused():
    bn = zoo.Run("resnet18", workers=2, local_batch=2, steps=1, dtype=torch.float32).model()
    with pytest.raises(ShardingError, match=r"chunk_trunk .* bn1 is a BatchNorm"):
        run_emulated(2, lambda comm: hybridize(bn, comm, chunk_trunk=True))
    with pytest.raises(ShardingError, match=r"micro_batches .* bn1 is a BatchNorm"):
        run_emulated(2, lambda comm: hybridize(bn, comm, micro_batches=2))
    run = zoo.Run("alexnet", workers=2, local_batch=2, steps=1, dtype=torch.float32)
    plain = run.model()
    x, y = run.batches()[0]

    def step(comm, scheme, **kw):
        hybridize(plain, comm, **kw).train_step(x[:2], y[:2], scheme=scheme)

    with pytest.raises(ShardingError, match="scheme .a. has one round, its chunks are parallel.micro_batches"):
        run_emulated(2, step, "a", chunk_trunk=True)
    with pytest.raises(ShardingError, match="scheme 'c' has its own rounds"):
        run_emulated(2, step, "c", micro_batches=2)
    with pytest.raises(ShardingError, match="micro_batches=3 is more than the 2 examples per worker"):
        run_emulated(2, step, "a", micro_batches=3)
