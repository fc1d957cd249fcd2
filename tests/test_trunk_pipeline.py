"""parallel.trunk_sync=pipelined: the trunk's sums and updates pipelined across the step boundary.

The serialised path (bucketed, every operation waited for at once) is the reference: after N steps
of SGD with momentum, weight decay and a rate that changes every step, the pipelined path must hold
the same bits in every parameter and momentum buffer, on every worker, for every scheme — with a
skipped step (the trainer's non-finite policy) and a state_dict read between steps. One more test
checks it against a torch-only single-device loop (tests/zoo.py) in float64.
"""

from __future__ import annotations

import pytest
import torch

from hybridpar import hybridize
from hybridpar.comm import run_emulated
from hybridpar.parallel import assemble
from hybridpar.parallel.trunk_pipeline import HOLD, _Piece, partitions, schedule
from tests import zoo
from tests.helpers import concurrently, results, run_gloo


def _train(
    comm,
    run: zoo.Run,
    model,
    trunk_sync: str,
    scheme: str,
    skip: int | None,
    peek: int | None,
    overlap: bool,
    defer_wgrad: bool = True,
):
    # Every worker wraps the same model (built once: the emulated workers are threads sharing
    # torch's global generator); hybridize copies what it keeps.
    hybrid = hybridize(model, comm, trunk_sync=trunk_sync, overlap=overlap, defer_wgrad=defer_wgrad)
    opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM, weight_decay=5e-4)
    lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
    for step, (x, y) in enumerate(run.batches()):
        opt.zero_grad(set_to_none=True)
        hybrid.train_step(x[lo:hi], y[lo:hi], scheme=scheme, optimizer=opt)
        if step != skip:  # the trainer's skip of a non-finite step: no update at all
            opt.step()
        for g in opt.param_groups:
            g["lr"] *= 0.7  # a schedule: every step's update must use that step's own rate
        if step == peek:
            hybrid.state_dict()  # a checkpoint between steps applies what is pending
    hybrid.flush()
    return {**zoo.trained_state(hybrid, opt), "specs": hybrid.shard_specs()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("scheme", ["a", "b", "c"])
def test_pipelined_is_bit_identical_to_the_serialised_path(K, scheme):
    run = zoo.Run("resnet18", workers=K, local_batch=2, steps=4, dtype=torch.float32)
    model = run.model()
    want = run_emulated(K, _train, run, model, "bucketed", scheme, 2, 1, False)
    got = run_emulated(K, _train, run, model, "pipelined", scheme, 2, 1, True)
    zoo.assert_bit_identical(got, want)
    # The reference did train (identical to an untouched model would prove nothing).
    moved = [
        n for n, p in model.named_parameters() if n in want[0]["params"] and not torch.equal(p, want[0]["params"][n])
    ]
    assert "conv1.weight" in moved and "layer4.1.conv2.weight" in moved


@pytest.mark.timeout(300)
def test_pipelined_over_gloo_is_bit_identical():
    """The serialised path with the head's weight gradients made by autograd against the pipelined
    one with them deferred (parallel.defer_wgrad, tests/test_defer_wgrad.py): the same bits."""
    run = zoo.Run("resnet18", workers=2, local_batch=2, steps=3, dtype=torch.float32)
    model = run.model()
    want = results(run_gloo(2, _train, run, model, "bucketed", "a", None, None, False, False))
    got = results(run_gloo(2, _train, run, model, "pipelined", "a", None, None, True, True))
    zoo.assert_bit_identical(got, want)


@pytest.mark.timeout(300)
def test_pipelined_equals_one_device():
    """float64, K = 3: the pipelined hybrid against the torch-only single-device loop."""
    run = zoo.Run("resnet18", workers=3, local_batch=2, steps=3)
    model = run.model()
    want = zoo.reference(run, run.model())

    def worker(comm):
        hybrid = hybridize(model, comm, trunk_sync="pipelined")
        opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM)
        lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
        for x, y in run.batches():
            opt.zero_grad(set_to_none=True)
            hybrid.train_step(x[lo:hi], y[lo:hi], optimizer=opt)
            opt.step()
        hybrid.flush()
        return {n: p.detach().clone() for n, p in hybrid.named_parameters()}, hybrid.shard_specs()

    workers = run_emulated(run.workers, worker)
    got = assemble([w[0] for w in workers], workers[0][1])
    assert got.keys() == want["params"].keys()
    scale = max(t.abs().max().item() for t in want["params"].values())
    for n, t in want["params"].items():
        torch.testing.assert_close(got[n], t, rtol=1e-7, atol=1e-7 * scale, msg=n)


def test_the_next_forward_waits_for_each_layer_only():
    """Between steps nothing is applied; the forward applies conv1's update before conv1 runs and
    the last block's only when it gets there."""

    run = zoo.Run("resnet18", workers=2, local_batch=2, steps=1, dtype=torch.float32)
    model = run.model()

    def worker(comm):
        hybrid = hybridize(model, comm, trunk_sync="pipelined")
        opt = torch.optim.SGD(hybrid.parameters(), lr=0.1)
        x, y = run.batches()[0]
        hybrid.train_step(x[:2], y[:2], optimizer=opt)
        opt.step()
        before = {n: p.detach().clone() for n, p in hybrid.named_parameters()}
        seen = {}

        def probe(name, module):
            def hook(*_):
                seen[name] = {n: not torch.equal(p, before[f"{name}.{n}"]) for n, p in module.named_parameters()}

            return hook

        for name in ("conv1", "layer4.1.conv2"):
            hybrid.get_submodule(name).register_forward_pre_hook(probe(name, hybrid.get_submodule(name)))
        unchanged_between_steps = all(torch.equal(p, before[n]) for n, p in hybrid.named_parameters())
        hybrid.train_step(x[:2], y[:2], optimizer=opt)
        return unchanged_between_steps, seen

    for unchanged, seen in run_emulated(2, worker):
        assert unchanged  # the update of step 1 is still pending after opt.step()
        assert seen["conv1"] == {"weight": True}  # applied right before conv1 ran
        assert seen["layer4.1.conv2"] == {"weight": True}


def test_partitions_cut_the_flat_gradients_into_equal_pieces():
    numels = [10, 5, 20, 100, 30]
    parts = partitions(numels, cap=40)
    assert [sum(p.hi - p.lo for p in part) for part in parts] == [40, 40, 40, 40, 5]
    # Every element of every parameter once, in order; a parameter spans partitions.
    flat = [(p.param, k) for part in parts for p in part for k in range(p.lo, p.hi)]
    assert flat == [(i, k) for i, n in enumerate(numels) for k in range(n)]
    assert [(p.param, p.lo, p.hi) for p in parts[0]] == [(0, 0, 10), (1, 0, 5), (2, 0, 20), (3, 0, 5)]
    assert [(p.param, p.lo, p.hi) for p in parts[1]] == [(3, 5, 45)]
    assert partitions([3], cap=40) == [[_Piece(0, 0, 3)]]


def test_the_deepest_partitions_go_last_when_that_costs_nothing():
    """The backward issues deepest first but holds back the deepest partitions (HOLD of them) of
    the deepest parameter spanning several, leaving its first to the backward (ready at the same
    moment); the end of the backward sends the rest in forward order, the held ones last. Two
    parameters of one partition each: nothing is held."""
    assert HOLD == 2
    parts = partitions([10, 5, 20, 100, 30], cap=40)  # the last parameter spans partitions 3 and 4
    assert schedule(parts) == ([3, 2, 1, 0], [4])
    parts = partitions([10, 200], cap=40)  # the last parameter spans all six: its two deepest held
    assert schedule(parts) == ([3, 2, 1, 0], [4, 5])
    assert schedule(parts, hold=1) == ([4, 3, 2, 1, 0], [5])
    assert schedule(parts, hold=9) == ([0], [1, 2, 3, 4, 5])  # the first always left to the backward
    assert schedule(partitions([40, 40], cap=40)) == ([1, 0], [])
    assert schedule(partitions([7], cap=40)) == ([0], [])

    # The code's own order: the last sum issued in a step is the deepest partition's.
    run = zoo.Run("resnet18", workers=2, local_batch=2, steps=1, dtype=torch.float32)
    model = run.model()

    def worker(comm):
        hybrid = hybridize(model, comm, trunk_sync="pipelined")
        sync = hybrid.trunk_sync
        order, issue = [], sync._issue
        sync._issue = lambda j: (order.append(j), issue(j))
        opt = torch.optim.SGD(hybrid.parameters(), lr=0.1)
        x, y = run.batches()[0]
        hybrid.train_step(x[2 * comm.rank : 2 * comm.rank + 2], y[2 * comm.rank : 2 * comm.rank + 2], optimizer=opt)
        opt.step()
        hybrid.flush()
        return order, len(sync.parts), sync._held

    orders = run_emulated(2, worker)
    assert orders[0][0] == orders[1][0]  # one sequence on every worker
    order, n, held = orders[0]
    assert sorted(order) == list(range(n)) and held == [n - 2, n - 1] and order[-2:] == held


def test_pipelined_needs_the_optimizer():
    from hybridpar.errors import ConfigError

    run = zoo.Run("resnet18", workers=2, local_batch=2, steps=1, dtype=torch.float32)
    model = run.model()

    def worker(comm):
        hybrid = hybridize(model, comm, trunk_sync="pipelined")
        x, y = run.batches()[0]
        hybrid.train_step(x[:2], y[:2])

    with pytest.raises(ConfigError, match="trunk_sync=pipelined applies the trunk's update itself"):
        run_emulated(2, worker)


@pytest.mark.timeout(400)
def test_the_training_app_pipelined_equals_bucketed_through_a_kill_and_resume(tmp_path):
    """End to end (emulated K = 2, warm-up changing the rate every step, dropout on): a pipelined
    run killed after step 5 and resumed from its step-3 checkpoint ends with the same bits as an
    uninterrupted bucketed run — the checkpoint holds every update of its step."""
    from hybridpar import checkpoint
    from tests.test_checkpoint import EXACT, _final, _train

    exact = [*EXACT, "optim.warmup_steps=6"]
    ref, killed = concurrently(  # independent: launched together
        lambda: _train(tmp_path / "ref", *exact),
        lambda: _train(tmp_path / "run", *exact, "parallel.trunk_sync=pipelined", fault="kill@5"),
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    resumed = _train(tmp_path / "run", *exact, "parallel.trunk_sync=pipelined")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _final(tmp_path / "ref"), _final(tmp_path / "run")
    step3 = checkpoint.full_state_dict(tmp_path / "run" / "checkpoints" / "step-00000003")
    ref3 = checkpoint.full_state_dict(tmp_path / "ref" / "checkpoints" / "step-00000003")
    for n in want:
        assert torch.equal(step3[n], ref3[n]), f"step 3 checkpoint: {n}"
        assert torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("K", [2, 3])
def test_the_ledger_counts_what_the_formula_says(K):
    from hybridpar.models import alexnet_small
    from hybridpar.parallel.cost import hybrid_step_bytes

    model = alexnet_small(10, 0.0, in_channels=3, channels=(8, 16, 24, 16, 16), hidden=64)
    widths = [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, torch.nn.Linear)]
    b = 3

    def worker(comm):
        hybrid = hybridize(model, comm, trunk_sync="pipelined", partition_cap=2000)
        opt = torch.optim.SGD(hybrid.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(comm.rank)
        comm.ledger.reset()
        hybrid.train_step(
            torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g), optimizer=opt
        )
        opt.step()
        sync = hybrid.trunk_sync
        parts = [sum(p.hi - p.lo for p in part) for part in sync.parts]
        return comm.ledger.sent, parts, hybrid.styles

    for rank, (sent, parts, styles) in enumerate(run_emulated(K, worker)):
        assert len(parts) > 1
        assert sent == hybrid_step_bytes(widths, styles, parts, b, K, rank, trunk_sync="pipelined")


@pytest.mark.parametrize("trunk_sync", ["bucketed", "pipelined"])
def test_bf16_trunk_sums_halve_the_trunk_bytes_and_stay_close(trunk_sync):
    """parallel.trunk_comm_dtype=bf16: the trunk's sums travel (and are added) in bf16 — half the
    ledger's trunk bytes, gradients within bf16 rounding of the fp32 sums, replicas identical."""
    from hybridpar.models import alexnet_small

    model = alexnet_small(10, 0.0, in_channels=3, channels=(8, 16, 24, 16, 16), hidden=64)

    def worker(comm, wire):
        hybrid = hybridize(model, comm, trunk_sync=trunk_sync, trunk_comm_dtype=wire)
        opt = torch.optim.SGD(hybrid.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(comm.rank)
        comm.ledger.reset()
        hybrid.train_step(
            torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g), optimizer=opt
        )
        trunk_bytes = sum(e.sent for e in comm.ledger.entries if e.tag == "trunk_grads")
        opt.step()
        hybrid.flush()
        return trunk_bytes, {n: p.detach().clone() for n, p in hybrid.named_parameters()}

    fp32, bf16 = run_emulated(2, worker, None), run_emulated(2, worker, torch.bfloat16)
    assert bf16[0][0] * 2 == fp32[0][0] > 0
    assert torch.equal(bf16[0][1]["features.0.weight"], bf16[1][1]["features.0.weight"])  # replicas agree
    for n, want in fp32[0][1].items():
        got = bf16[0][1][n]
        torch.testing.assert_close(got, want, rtol=0, atol=0.1 * 2**-7 * 4, msg=n)  # lr 0.1 × bf16 rounding
    assert any(not torch.equal(bf16[0][1][n], fp32[0][1][n]) for n in fp32[0][1])  # it did round


def test_pipelined_in_the_2d_layout_is_bit_identical():
    """K = 4 workers, the head sharded inside groups of 2 (its shards' gradients summed over the
    groups, blocking, as before): the pipelined trunk changes nothing but the timing."""
    from hybridpar.models import alexnet_small

    model = alexnet_small(10, 0.5, in_channels=3, channels=(8, 16, 24, 16, 16), hidden=32)

    def worker(comm, trunk_sync):
        hybrid = hybridize(model, comm, trunk_sync=trunk_sync, fc_group_size=2, partition_cap=3000)
        opt = torch.optim.SGD(hybrid.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(comm.rank)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            x, y = torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 10, (3,), generator=g)
            hybrid.train_step(x, y, optimizer=opt)
            opt.step()
        hybrid.flush()
        return {n: p.detach().clone() for n, p in hybrid.named_parameters()}

    want, got = run_emulated(4, worker, "bucketed"), run_emulated(4, worker, "pipelined")
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys() and all(torch.equal(w[n], g[n]) for n in w)
