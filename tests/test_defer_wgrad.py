"""parallel.defer_wgrad: the head's weight gradients made after the trunk's backward.

The head's backward makes only the input gradients the trunk waits for; the weight gradients
follow once the trunk's sums are issued. Exact: where each weight has one product per step
(scheme (a), fc_batch=chunk, bf16 autocast) the weights and momenta after N steps hold the same
bits as with the weight gradients made inline (autograd's own). Over gloo:
tests/test_trunk_pipeline.py (bucketed and inline against pipelined and deferred). Where a weight
has several products per step (the rounds of (b)/(c), micro-batches) they become one product over
the stacked rows; the default is deferred, so tests/test_schemes.py and tests/test_chunk_trunk.py
check those against the torch-only single-device loop.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from hybridpar import hybridize
from hybridpar.comm import run_emulated
from tests import zoo


def _train(comm, run: zoo.Run, model, defer: bool, scheme: str, trunk_sync: str, fc_batch: str = "full", bf16=False):
    hybrid = hybridize(model, comm, defer_wgrad=defer, trunk_sync=trunk_sync)
    opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM, weight_decay=5e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
    for x, y in run.batches():
        opt.zero_grad(set_to_none=True)
        hybrid.train_step(x[lo:hi], y[lo:hi], scheme=scheme, fc_batch=fc_batch, optimizer=opt, autocast=autocast)
        opt.step()
    hybrid.flush()
    return zoo.trained_state(hybrid, opt)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("K", "scheme", "trunk_sync", "fc_batch", "bf16"),
    [
        (2, "a", "bucketed", "full", False),
        (3, "a", "pipelined", "full", False),
        (4, "a", "pipelined", "full", False),
        (2, "c", "bucketed", "chunk", False),
        (2, "a", "pipelined", "full", True),
    ],
)
def test_deferred_weight_gradients_are_bit_identical_to_autograds(K, scheme, trunk_sync, fc_batch, bf16):
    """torchvision's MobileNetV3-small (two sharded Linear layers, a move between them), fp32."""
    run = zoo.Run("mobilenet_v3_small", workers=K, local_batch=2, steps=3, dtype=torch.float32)
    model = run.model()
    want = run_emulated(K, _train, run, model, False, scheme, trunk_sync, fc_batch, bf16)
    got = run_emulated(K, _train, run, model, True, scheme, trunk_sync, fc_batch, bf16)
    zoo.assert_bit_identical(got, want)
    # The head did train (equal to an untouched head would prove nothing).
    assert not torch.equal(want[0]["params"]["classifier.3.bias"], model.classifier[3].bias)


@pytest.mark.parametrize("defer", [True, False])
def test_the_weight_gradients_come_after_the_trunks_backward(defer):
    """When the trunk's first layer gets its gradient (the end of the trunk's backward), the head's
    weights have none yet — only when deferred — and after the step every one has its gradient."""
    run = zoo.Run("alexnet", workers=2, local_batch=2, steps=1, dtype=torch.float32)
    model = run.model()

    def worker(comm):
        hybrid = hybridize(model, comm, defer_wgrad=defer)
        head = [p for n, p in hybrid.named_parameters() if n.startswith("classifier") and n.endswith("weight")]
        seen = []
        hybrid.features[0].weight.register_post_accumulate_grad_hook(
            lambda _p: seen.append([p.grad is None for p in head])
        )
        x, y = run.batches()[0]
        hybrid.train_step(x[2 * comm.rank : 2 * comm.rank + 2], y[2 * comm.rank : 2 * comm.rank + 2])
        return seen, [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in head]

    for seen, after in run_emulated(2, worker):
        assert seen == [[defer] * 3]
        assert after == [True] * 3


def test_the_training_app_passes_the_option(tmp_path):
    from hybridpar.trainer import _hybrid
    from tests.helpers import compose_train

    comm_model = zoo.Run("alexnet", workers=2, local_batch=2, steps=1, dtype=torch.float32).model()
    for value, expect in (("true", True), ("false", False)):
        cfg = compose_train(f"parallel.defer_wgrad={value}")

        def worker(comm, cfg=cfg):
            return _hybrid(cfg, comm_model, comm, torch.device("cpu"), 2).wgrad is not None

        assert run_emulated(2, worker) == [expect, expect]
