"""The step's small agreements do not stall it: the batch-shape check travels while the trunk
computes, and the pipelined trunk's end-of-backward proposal is waited for a step later.

On a link the trunk's sums keep busy, a tiny blocking collective waits behind their queue (tens of
ms at 100 Mbit/s); these tests check that no worker waits for its peers at those two points, that
a mismatch still raises on every worker before any activation moves, and that workers proposing
different partition counts still issue one sequence of collectives and train the same bits.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from hybridpar import hybridize
from hybridpar.comm import Handle, run_emulated
from hybridpar.errors import BatchMismatchError
from hybridpar.models import alexnet_small, build_seeded
from hybridpar.parallel import HybridModel
from hybridpar.parallel.trunk_pipeline import WINDOW, propose_cap
from tests import zoo
from tests.helpers import results, run_gloo

LATE_S = 0.6  # how late one worker comes to the agreement


def _late_agreements(comm):
    """Worker 1 comes LATE_S late; worker 0 times how long issuing took and how long waiting."""
    if comm.rank == 1:
        time.sleep(LATE_S)
    t0 = time.perf_counter()
    shape = comm.agree_async("local batch shape", (4, 3))
    biggest = comm.max_int_async(10 + comm.rank, "count")
    issued = time.perf_counter() - t0
    shape.wait()
    got = biggest.wait()
    waited = time.perf_counter() - t0
    bad = comm.agree_async("local batch shape", (4,) if comm.rank == 0 else (3,))
    try:
        bad.wait()
        message = None
    except BatchMismatchError as exc:
        message = str(exc)
    return issued, waited, got, message


@pytest.mark.timeout(120)
def test_agreements_return_at_once_and_a_mismatch_raises_on_every_worker():
    out = results(run_gloo(2, _late_agreements, timeout_s=90))
    issued, waited, _, _ = out[0]
    assert issued < LATE_S / 3, f"issuing the agreements waited {issued:.2f} s for the late peer"
    assert waited > LATE_S / 2  # the wait does wait for it (the test's timing works)
    for _, _, got, message in out:
        assert got == 11
        assert message is not None and "worker 0: (4,), worker 1: (3,)" in message


def _order_of_events(comm, scheme):
    model = HybridModel(build_seeded(lambda: alexnet_small(10, 0.0, channels=(8, 16, 24, 16, 16), hidden=48), 0), comm)
    events = []
    forward_trunk = model.forward_trunk

    def trunk(x):
        h = forward_trunk(x)
        events.append("trunk")
        return h

    model.forward_trunk = trunk
    gather = comm._gather_ints_async

    def agreement(t):
        finish = gather(t)

        def logged():  # the emulation exchanges the values here, when the worker waits
            events.append("agreement waited")
            return finish()

        return logged

    comm._gather_ints_async = agreement
    ledger = comm.ledger
    g = torch.Generator().manual_seed(comm.rank)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    model.train_step(x, y, scheme=scheme)
    kinds = [e.kind for e in ledger.entries]
    return events, kinds


@pytest.mark.parametrize("scheme", ["a", "c"])
def test_the_batch_shape_is_waited_for_after_the_trunk_and_before_the_first_move(scheme):
    for events, kinds in run_emulated(2, _order_of_events, scheme):
        assert events[:2] == ["trunk", "agreement waited"]
        assert kinds[0] == "agree" and "all_reduce" not in kinds[:1]


def _uneven_step(comm, scheme):
    model = HybridModel(build_seeded(lambda: alexnet_small(10, 0.0, channels=(8, 16, 24, 16, 16), hidden=48), 0), comm)
    b = 4 if comm.rank == 0 else 2
    try:
        model.train_step(torch.randn(b, 3, 32, 32), torch.zeros(b, dtype=torch.long), scheme=scheme)
    except BatchMismatchError as exc:
        return str(exc), [e.kind for e in comm.ledger.entries]
    return None, [e.kind for e in comm.ledger.entries]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["a", "b"])
def test_uneven_batches_still_stop_every_worker_before_any_move(scheme):
    for message, kinds in results(run_gloo(2, _uneven_step, scheme, timeout_s=90)):
        assert message is not None and "local batch shape" in message
        assert kinds == ["agree"]


def _late_to_the_end_of_the_backward(comm):
    """Pipelined trunk over gloo; worker 1 reaches the end of each backward LATE_S late. Worker 0
    times its own end of the backward (where the old blocking agreement sat)."""
    model = build_seeded(lambda: alexnet_small(10, 0.0, channels=(8, 16, 24, 16, 16), hidden=48), 0)
    hybrid = hybridize(model, comm, trunk_sync="pipelined")
    opt = torch.optim.SGD(hybrid.parameters(), lr=0.01, momentum=0.9)
    finish, spent = hybrid.trunk_sync.finish, []

    def timed_finish():
        if comm.rank == 1:
            time.sleep(LATE_S)
        t0 = time.perf_counter()
        finish()
        spent.append(time.perf_counter() - t0)

    hybrid.trunk_sync.finish = timed_finish
    g = torch.Generator().manual_seed(comm.rank)
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad(set_to_none=True)
        hybrid.train_step(x, y, optimizer=opt)
        opt.step()
    hybrid.flush()
    return spent


@pytest.mark.timeout(120)
def test_a_late_peer_does_not_hold_up_the_end_of_the_backward():
    spent = results(run_gloo(2, _late_to_the_end_of_the_backward, timeout_s=90))[0]
    assert len(spent) == 3
    assert max(spent) < LATE_S / 3, f"the end of the backward waited for the late peer: {spent}"


def _train(comm, run: zoo.Run, model, trunk_sync: str, scheme: str):
    hybrid = hybridize(model, comm, trunk_sync=trunk_sync)
    opt = torch.optim.SGD(hybrid.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM, weight_decay=5e-4)
    lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
    caps = []
    for x, y in run.batches():
        caps.append(getattr(hybrid.trunk_sync, "cap", None))  # what this step's backward issues as ready
        opt.zero_grad(set_to_none=True)
        hybrid.train_step(x[lo:hi], y[lo:hi], scheme=scheme, optimizer=opt)
        opt.step()
    hybrid.flush()
    sequence = [(e.kind, e.tag) for e in comm.ledger.entries]  # bytes differ by rank where K does not divide
    n = len(getattr(hybrid.trunk_sync, "_backward", ()))
    return {n: p.detach().clone() for n, p in hybrid.named_parameters()}, sequence, caps, n


@functools.cache
def _serialised(K: int) -> tuple[zoo.Run, list]:
    """ResNet-18 on K workers, scheme c, and its serialised path's run: the same for both cases of
    the test below (a fast link changes the pipelined side only), so run once per K."""
    run = zoo.Run("resnet18", workers=K, local_batch=2, steps=4, dtype=torch.float32)
    return run, run_emulated(K, _train, run, run.model(), "bucketed", "c")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("fast_worker_0", [False, True])
def test_workers_proposing_different_caps_issue_one_sequence_and_train_the_same_bits(K, fast_worker_0, monkeypatch):
    """The first two backwards issue every partition as it is ready; then each step takes the
    largest of the workers' proposals of two steps before. In the emulation no sum is done before
    it is waited for, so every worker proposes the window (2); with ``fast_worker_0`` worker 0 sees
    every sum done at the end of its backward (a fast link) and proposes them all. Either way
    every worker issues the same collectives in the same order and ends with the serialised
    path's bits."""
    run, want = _serialised(K)
    if fast_worker_0:
        ready = Handle.ready
        monkeypatch.setattr(Handle, "ready", lambda self: self._comm.rank == 0 or ready(self))
    got = run_emulated(K, _train, run, run.model(), "pipelined", "c")
    for k, (params, sequence, caps, n) in enumerate(got):
        assert sequence == got[0][1], f"worker {k} issued a different sequence of collectives"
        later = n if fast_worker_0 else WINDOW  # the largest proposal wins, also on the workers that made a smaller one
        assert n > WINDOW and caps == [n, n, later, later], (caps, n)
        differ = [name for name in want[k][0] if not torch.equal(params[name], want[k][0][name])]
        assert not differ, f"worker {k} differs from the serialised path: {differ[:5]}"


@pytest.mark.parametrize(
    "done, cap, window, n, want",
    [
        (5, 9, 2, 20, 7),  # 4 still in flight at the end: what finished, plus the window
        (9, 9, 2, 20, 18),  # all finished: the link stood idle, twice as many
        (1, 1, 2, 20, 3),  # ... and at least the window more
        (20, 20, 2, 20, 20),  # never more than there are
        (7, 9, 2, 8, 8),
        (0, 0, 0, 20, 0),  # no window (the serialised path): none during the backward
    ],
)
def test_the_cap_proposal(done, cap, window, n, want):
    assert propose_cap(done, cap, window, n) == want
