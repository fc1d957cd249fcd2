"""The hybrid equals the single-device model: logits, loss, every gradient, weights after 3 SGD steps.

fp32, rtol 1e-5 / atol 1e-6 (hybridpar.verify.RTOL / ATOL). The model is the small-input
AlexNet with narrow layers (144 → 50 → 50 → 10 in the head) so that K = 3 and K = 4 cut every
head layer unevenly; one case keeps the real 4096-wide hidden layers and 1000 classes.
"""

import pytest
import torch

from hybridpar.comm import run_emulated
from hybridpar.verify import Case, compare, hybrid_worker, reference
from tests.helpers import results, run_gloo


@pytest.mark.parametrize("plan", ["min_bytes", "paper"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_emulated_matches_single_device(K, plan):
    case = Case(K, plan=plan)
    compare(run_emulated(K, hybrid_worker, case), reference(case))


@pytest.mark.parametrize("plan", [("col", "col", "col"), ("row", "col", "col"), ("col", "col", "row")])
def test_every_move_matches_single_device(plan):
    # Layouts that the byte-minimal choice never picks for AlexNet still use the remaining
    # moves (gather_features, features_to_batch); they must be exact too.
    case = Case(3, plan=plan)
    compare(run_emulated(3, hybrid_worker, case), reference(case))


def test_uneven_4096_and_1000_wide_layers():
    case = Case(3, local_batch=2, hidden=4096, num_classes=1000, plan="paper")
    workers = run_emulated(3, hybrid_worker, case)
    assert [w["weights"]["classifier.4.weight"].shape[1] for w in workers] == [1366, 1365, 1365]
    assert [w["weights"]["classifier.6.bias"].shape[0] for w in workers] == [334, 333, 333]
    compare(workers, reference(case))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("plan", ["min_bytes", "paper"])
def test_gloo_two_processes_match_single_device(plan):
    case = Case(2, plan=plan)
    compare(results(run_gloo(2, hybrid_worker, case)), reference(case))


@pytest.mark.timeout(240)
def test_gloo_three_processes_uneven_shards():
    case = Case(3)
    compare(results(run_gloo(3, hybrid_worker, case)), reference(case))


def test_step0_model_is_the_same_for_every_K():
    # Initialisation cuts the full seeded model: re-assembled shards are the full model, bit for bit.
    case = Case(1)
    full = case.model().state_dict()
    for K in (2, 3, 4):
        from hybridpar.parallel import HybridModel

        def shards(comm, K=K):
            m = HybridModel(Case(K).model(), comm)
            return m.full_state_dict()

        for sd in run_emulated(K, shards):
            assert sd.keys() == full.keys()
            for name in full:
                assert torch.equal(sd[name], full[name]), name
