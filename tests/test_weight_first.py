"""The pipelined trunk's deepest conv makes its weight's gradient first (trunk_pipeline.weight_grads_first):
the step's first sums leave before that conv's input gradient is made, and nothing else changes.

The serialised path (bucketed, every operation waited for at once; its conv backward is autograd's)
is the reference, on torchvision's AlexNet (its trunk ends in a plain Conv2d, so the option is on;
tests/test_trunk_pipeline.py runs resnet18, whose trunk ends in a BatchNorm, where it is off):
after N steps with momentum, weight decay and a changing rate every parameter and momentum buffer
must hold the same bits, on every worker, every scheme, whole or micro-batched, fp32 and under
bf16 autocast; and against the torch-only single-device loop (tests/zoo.py) in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hybridpar import hybridize
from hybridpar.comm import run_emulated
from hybridpar.errors import ShardingError
from hybridpar.parallel import assemble
from tests import zoo
from tests.helpers import results, run_gloo


def _train(comm, run: zoo.Run, model, trunk_sync: str, scheme: str, micro_batches: int = 1, autocast: bool = False):
    serial = trunk_sync == "bucketed"
    hybrid = hybridize(model, comm, trunk_sync=trunk_sync, overlap=not serial, micro_batches=micro_batches)
    opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM, weight_decay=5e-4)
    lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch

    def mixed():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    for x, y in run.batches():
        opt.zero_grad(set_to_none=True)
        hybrid.train_step(x[lo:hi], y[lo:hi], scheme=scheme, optimizer=opt, autocast=mixed)
        opt.step()
        for g in opt.param_groups:
            g["lr"] *= 0.7
    hybrid.flush()
    return {**zoo.trained_state(hybrid, opt), "specs": hybrid.shard_specs()}


def _alexnet(K: int, dtype=torch.float32) -> tuple[zoo.Run, nn.Module]:
    run = zoo.Run("alexnet", workers=K, local_batch=2, steps=3, dtype=dtype)
    return run, run.model()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "K, scheme, micro_batches, autocast",
    [(2, "a", 1, False), (3, "b", 1, False), (4, "c", 1, False), (2, "a", 2, False), (2, "a", 1, True)],
    ids=["K2-a", "K3-b", "K4-c", "K2-a-micro-batches", "K2-a-bf16-autocast"],
)
def test_weight_first_is_bit_identical_to_the_serialised_path(K, scheme, micro_batches, autocast):
    run, model = _alexnet(K)
    want = run_emulated(K, _train, run, model, "bucketed", scheme, micro_batches, autocast)
    got = run_emulated(K, _train, run, model, "pipelined", scheme, micro_batches, autocast)
    zoo.assert_bit_identical(got, want)
    assert not torch.equal(model.features[10].weight, want[0]["params"]["features.10.weight"])  # it trained


@pytest.mark.timeout(300)
def test_weight_first_over_gloo_is_bit_identical():
    run, model = _alexnet(2)
    # Both paths in one launch: each worker trains the serialised path, then the pipelined one.
    workers = results(run_gloo(2, _both_paths, run, model))
    zoo.assert_bit_identical([w[1] for w in workers], [w[0] for w in workers])


def _both_paths(comm, run, model):
    return _train(comm, run, model, "bucketed", "a"), _train(comm, run, model, "pipelined", "a")


@pytest.mark.timeout(300)
def test_weight_first_equals_one_device():
    """float64, K = 3: the pipelined hybrid on AlexNet against the torch-only single-device loop (the
    run tests/test_chunk_trunk.py compares against: the loop runs once)."""
    run = zoo.Run("alexnet", workers=3, local_batch=3, steps=2)
    want = {"params": zoo.one_device_params(run)}

    def worker(comm, model):
        hybrid = hybridize(model, comm, trunk_sync="pipelined")
        opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM)
        lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
        for x, y in run.batches():
            opt.zero_grad(set_to_none=True)
            hybrid.train_step(x[lo:hi], y[lo:hi], optimizer=opt)
            opt.step()
        hybrid.flush()
        return {n: p.detach().clone() for n, p in hybrid.named_parameters()}, hybrid.shard_specs()

    workers = run_emulated(run.workers, worker, run.model())
    got = assemble([w[0] for w in workers], workers[0][1])
    assert got.keys() == want["params"].keys()
    scale = max(t.abs().max().item() for t in want["params"].values())
    for n, t in want["params"].items():
        torch.testing.assert_close(got[n], t, rtol=1e-7, atol=1e-7 * scale, msg=n)


class _ConvBackwards(TorchDispatchMode):
    """Each convolution backward this thread runs: which gradients it makes, and how many of the
    trunk's sums the worker had issued by then (its ledger)."""

    def __init__(self, ledger):
        super().__init__()
        self.ledger, self.seen = ledger, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            sums = sum(e.tag == "trunk_grads" for e in self.ledger.entries)
            self.seen.append((tuple(bool(m) for m in args[-1]), sums))
        return func(*args, **(kwargs or {}))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("trunk_sync", ["pipelined", "bucketed"])
def test_the_first_sums_leave_before_the_deepest_convs_input_gradient(trunk_sync):
    """Pipelined: the backward's first convolution product is the deepest conv's weight gradient,
    and by the time its input gradient is made the step's first sums are issued. Serialised
    (autograd's one node for all three): none is, and the first product makes them all at once."""
    run, model = _alexnet(2)

    def worker(comm):
        hybrid = hybridize(model, comm, trunk_sync=trunk_sync, overlap=trunk_sync == "pipelined")
        opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR)
        x, y = run.batches()[0]
        lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
        with _ConvBackwards(comm.ledger) as mode:
            hybrid.train_step(x[lo:hi], y[lo:hi], optimizer=opt)
        return mode.seen

    for seen in run_emulated(2, worker):
        first_input_grad = next(sums for mask, sums in seen if mask[0])
        if trunk_sync == "pipelined":
            assert seen[0] == ((False, True, True), 0)  # the deepest conv's weight and bias, before any sum
            assert first_input_grad >= 1, seen
        else:
            assert seen[0][0] == (True, True, True) and first_input_grad == 0, seen


class _TiedConvs(nn.Module):
    """One conv run twice in the trunk's forward (tied weights), then a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(torch.relu(self.conv(x))), 1))


@pytest.mark.timeout(60)
def test_a_conv_run_twice_is_refused_in_one_line():
    """Its weight's gradient is whole only after both backwards: made first after the first, its
    sums would leave without the second's part (unguarded, the weights drift ~1e-2 from the single
    device's in three steps). Refused in the first forward, on every worker; ``weight_first=False``
    trains it, as the torch-only single-device loop does."""
    torch.manual_seed(0)
    model = _TiedConvs()  # built once: emulated workers share the process's random generator
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 4, 4, generator=g), torch.tensor([0, 1, 2, 3])) for _ in range(3)]

    def worker(comm, weight_first):
        hybrid = hybridize(model, comm, trunk_sync="pipelined", weight_first=weight_first)
        opt = torch.optim.SGD(hybrid.parameters(), lr=0.1, momentum=0.9)
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            try:
                hybrid.train_step(
                    x[2 * comm.rank : 2 * comm.rank + 2], y[2 * comm.rank : 2 * comm.rank + 2], optimizer=opt
                )
            except ShardingError as exc:
                return str(exc)
            opt.step()
        hybrid.flush()
        return hybrid.conv.weight.detach().clone()

    errors = run_emulated(2, worker, True)
    # The first line (what the training app prints; the trunk's graph interpreter appends the node below it).
    assert all(isinstance(e, str) and e.splitlines()[0].startswith("conv runs twice in one forward") for e in errors)

    one = copy.deepcopy(model)
    opt = torch.optim.SGD(one.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(one(x), y).backward()
        opt.step()
    for got in run_emulated(2, worker, False):
        torch.testing.assert_close(got, one.conv.weight.detach(), rtol=1e-6, atol=1e-6)
