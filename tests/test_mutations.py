"""The equivalence check must catch the classic bugs of a hybrid engine.

Each test breaks the engine in one way and asserts that comparing with the single device fails.
"""

import pytest

from hybridpar.comm import EmulatedCommunicator, regions, run_emulated
from hybridpar.comm.emulated import _sum
from hybridpar.parallel.data_parallel import TrunkSync
from hybridpar.verify import Case, compare, hybrid_worker, reference


def _fails(case):
    workers = run_emulated(case.world_size, hybrid_worker, case)
    with pytest.raises(AssertionError):
        compare(workers, reference(case))


@pytest.mark.parametrize("K", [2, 3])
def test_averaging_trunk_gradients_is_caught(monkeypatch, K):
    original = TrunkSync.finish

    def averaged(self):
        original(self)
        for p in self.params:
            p.grad /= self.comm.world_size  # DDP's AVG: wrong for a global-mean loss

    monkeypatch.setattr(TrunkSync, "finish", averaged)
    _fails(Case(K))


@pytest.mark.parametrize("plan", ["min_bytes", "paper"])
def test_dropped_shard_is_caught(monkeypatch, plan):
    def drop_last_shard(self, x, dim, sizes):
        r = self.rank
        return self.world.exchange(r, x, lambda xs: _sum([t.split(sizes, dim)[r] for t in xs[:-1]]))

    monkeypatch.setattr(EmulatedCommunicator, "_reduce_scatter", drop_last_shard)
    _fails(Case(3, plan=plan))


@pytest.mark.parametrize("plan, function", [("paper", regions._GatherBatch), ("min_bytes", regions._BatchToFeatures)])
def test_feature_gradient_to_wrong_worker_is_caught(monkeypatch, plan, function):
    original = function.backward

    def misrouted(ctx, g):
        grads = original(ctx, g)
        comm = ctx.comm
        r, k = comm.rank, comm.world_size
        # Worker r receives the feature gradient that belongs to worker r + 1.
        wrong = comm.world.exchange(r, grads[0], lambda xs: xs[(r + 1) % k].clone())
        return (wrong, *grads[1:])

    monkeypatch.setattr(function, "backward", staticmethod(misrouted))
    _fails(Case(3, plan=plan))


def test_unbroken_engine_passes():
    # The same comparison as above, without a break: the failures above are the breaks' doing.
    case = Case(3)
    compare(run_emulated(3, hybrid_worker, case), reference(case))
