"""parallel.chunk_trunk: scheme (c) with the trunk run round by round.

Where the trunk treats every example on its own (no BatchNorm), running it on each round's rows
apart gives the gradients of one pass: checked in float64 against the unchunked path and against
the torch-only single-device loop (tests/zoo.py), on torchvision models, K = 2, 3, 4, with uneven
rounds; BatchNorm and schemes other than (c) are refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from hybridpar import hybridize
from hybridpar.comm import run_emulated
from hybridpar.errors import ShardingError
from hybridpar.parallel import assemble
from tests import zoo


def _train(comm, run: zoo.Run, model, chunk: bool, trunk_sync: str, fc_batch: str):
    hybrid = hybridize(model, comm, chunk_trunk=chunk, trunk_sync=trunk_sync)
    opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM)
    lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
    losses = []
    for x, y in run.batches():
        opt.zero_grad(set_to_none=True)
        loss, _ = hybrid.train_step(x[lo:hi], y[lo:hi], scheme="c", fc_batch=fc_batch, optimizer=opt)
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("K, b", [(2, 5), (3, 4), (4, 6)])
@pytest.mark.parametrize("trunk_sync", ["bucketed", "pipelined"])
def test_chunked_trunk_equals_the_unchunked_step(K, b, trunk_sync):
    """float64, uneven rounds (b not a multiple of K)."""
    run = zoo.Run("alexnet", workers=K, local_batch=b, steps=3)
    model = _small(run)
    want = _assembled(run_emulated(K, _train, run, model, False, "bucketed", "full"))
    got = _assembled(run_emulated(K, _train, run, model, True, trunk_sync, "full"))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)
    assert not torch.equal(got["features.0.weight"], model.features[0].weight)  # it trained


@pytest.mark.timeout(300)
def test_chunked_trunk_equals_one_device():
    """torchvision's AlexNet, float64, K = 3: against the torch-only single-device loop."""
    run = zoo.Run("alexnet", workers=3, local_batch=3, steps=2)
    model = run.model()
    got = _assembled(run_emulated(3, _train, run, model, True, "pipelined", "full"))
    one = zoo.reference(run, run.model())["params"]
    scale = max(t.abs().max().item() for t in one.values())
    for n, t in one.items():
        torch.testing.assert_close(got[n], t, rtol=1e-7, atol=1e-7 * scale, msg=n)


@pytest.mark.timeout(300)
def test_chunked_trunk_with_the_papers_fc_batch():
    """fc_batch=chunk (the head steps every round) is unchanged by running the trunk in chunks."""
    run = zoo.Run("alexnet", workers=2, local_batch=4, steps=2)
    model = _small(run)
    want = _assembled(run_emulated(2, _train, run, model, False, "bucketed", "chunk"))
    got = _assembled(run_emulated(2, _train, run, model, True, "bucketed", "chunk"))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


def test_batchnorm_and_other_schemes_are_refused():
    bn = zoo.Run("resnet18", workers=2, local_batch=2, steps=1, dtype=torch.float32).model()
    with pytest.raises(ShardingError, match=r"chunk_trunk .* bn1 is a BatchNorm"):
        run_emulated(2, lambda comm: hybridize(bn, comm, chunk_trunk=True))
    run = zoo.Run("alexnet", workers=2, local_batch=2, steps=1, dtype=torch.float32)
    plain = run.model()

    def worker(comm):
        x, y = run.batches()[0]
        hybridize(plain, comm, chunk_trunk=True).train_step(x[:2], y[:2], scheme="a")

    with pytest.raises(ShardingError, match="scheme c, not 'a'"):
        run_emulated(2, worker)
