"""Schemes (b) and (c): with fc_batch=full they equal (a) and the single device; with
fc_batch=chunk they equal a plain reference that performs the same updates; their bytes equal
the closed forms; emulated = gloo; bf16 communication halves the activation bytes."""

import pytest
import torch
import torch.nn.functional as F

from hybridpar.comm import run_emulated
from hybridpar.parallel.cost import hybrid_step_bytes
from hybridpar.verify import Case, compare, hybrid_worker, reference
from tests.helpers import results, run_gloo


@pytest.mark.parametrize("plan", ["min_bytes", "paper"])
@pytest.mark.parametrize("scheme", ["b", "c"])
@pytest.mark.parametrize("K", [2, 3, 4])
def test_rounds_with_full_fc_batch_match_single_device(K, scheme, plan):
    case = Case(K, scheme=scheme, plan=plan, local_batch=5)  # b = 5: uneven rounds in (c) for K = 2, 3, 4
    compare(run_emulated(K, hybrid_worker, case), reference(case))


@pytest.mark.parametrize("scheme", ["b", "c"])
def test_rounds_without_overlap_match_too(scheme):
    case = Case(3, scheme=scheme, overlap=False)
    compare(run_emulated(3, hybrid_worker, case), reference(case))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scheme", ["b", "c"])
def test_gloo_rounds_match_single_device(scheme):
    case = Case(2, scheme=scheme, local_batch=3)
    compare(results(run_gloo(2, hybrid_worker, case)), reference(case))


def chunk_reference(case: Case) -> dict:
    """fc_batch=chunk from its definition, on one device: the trunk runs once per step with the
    step's weights; the head takes an SGD step after each round on the mean loss over that round's
    examples; the trunk then takes one step on the mean over all K·b examples."""
    model = case.model()
    trunk = [p for n, p in model.named_parameters() if not n.startswith("classifier")]
    head = list(model.classifier.parameters())
    opt_trunk, opt_head = case.optimizer(trunk), case.optimizer(head)
    K, b = case.world_size, case.local_batch
    for x, y in case.batches():
        opt_trunk.zero_grad(set_to_none=True)
        feats = torch.flatten(model.avgpool(model.features(x)), 1)
        held = feats.detach().requires_grad_()
        grad = torch.zeros_like(feats)
        for j in range(K):
            if case.scheme == "b":  # round j: worker j's examples
                idx = torch.arange(j * b, (j + 1) * b)
            else:  # round j: the j-th slice of every worker's examples
                lo = sum(torch.tensor_split(torch.arange(b), K)[i].numel() for i in range(j))
                n = torch.tensor_split(torch.arange(b), K)[j].numel()
                idx = torch.cat([torch.arange(k * b + lo, k * b + lo + n) for k in range(K)])
            opt_head.zero_grad(set_to_none=True)
            part = held[idx].detach().requires_grad_()
            F.cross_entropy(model.classifier(part), y[idx]).backward()
            grad[idx] += part.grad * (len(idx) / (K * b))
            opt_head.step()
        feats.backward(grad)
        opt_trunk.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scheme", ["b", "c"])
@pytest.mark.parametrize("K", [2, 3])
def test_chunk_fc_batch_matches_its_definition(K, scheme):
    case = Case(K, scheme=scheme, fc_batch="chunk", local_batch=4)
    workers = run_emulated(K, hybrid_worker, case)
    expected = chunk_reference(case)
    from hybridpar.parallel import assemble

    got = assemble([w["weights"] for w in workers], workers[0]["specs"])
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # ... and differs from fc_batch=full, so the test can tell them apart.
    full = assemble(
        [w["weights"] for w in run_emulated(K, hybrid_worker, Case(K, scheme=scheme, local_batch=4))],
        workers[0]["specs"],
    )
    assert not torch.allclose(full["classifier.1.weight"], got["classifier.1.weight"], rtol=1e-5, atol=1e-6)


def _widths_and_trunk(case):
    model = case.model()
    widths = [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, torch.nn.Linear)]
    return widths, sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))


@pytest.mark.parametrize("plan", ["min_bytes", "paper"])
@pytest.mark.parametrize("scheme", ["a", "b", "c"])
@pytest.mark.parametrize("K", [2, 3, 4])
def test_bytes_per_scheme_match_formula(K, scheme, plan):
    case = Case(K, scheme=scheme, plan=plan, local_batch=5)
    widths, trunk = _widths_and_trunk(case)
    for rank, w in enumerate(run_emulated(K, hybrid_worker, case)):
        expected = hybrid_step_bytes(widths, w["styles"], trunk, case.local_batch, K, rank, scheme=scheme)
        assert w["sent"] == expected == w["received"], (rank, w["by_tag"])


@pytest.mark.timeout(240)
def test_bytes_per_scheme_emulated_equal_gloo():
    for scheme in ("b", "c"):
        case = Case(2, scheme=scheme, local_batch=3)
        emulated = run_emulated(2, hybrid_worker, case)
        real = results(run_gloo(2, hybrid_worker, case))
        assert [w["by_tag"] for w in emulated] == [w["by_tag"] for w in real]


@pytest.mark.parametrize("scheme", ["a", "b", "c"])
def test_bf16_communication_halves_feature_bytes_and_stays_close(scheme):
    fp32, bf16 = (Case(2, scheme=scheme, comm_dtype=d, local_batch=4) for d in ("fp32", "bf16"))
    w32, w16 = run_emulated(2, hybrid_worker, fp32), run_emulated(2, hybrid_worker, bf16)
    tag = "classifier.1.in"  # the feature exchange (and its gradient)
    assert w16[0]["by_tag"][tag][0] * 2 == w32[0]["by_tag"][tag][0]
    assert w16[0]["by_tag"][tag + ".grad"][0] * 2 == w32[0]["by_tag"][tag + ".grad"][0]
    ref = reference(fp32)
    errors = compare(w16, ref, check=False)
    assert 0 < errors["logits"] < 5e-2  # bf16 rounding, not a broken exchange


def _chunk_steps_with_nan(comm, bad_rank: int, K: int):
    """Two clean chunk-mode steps, then a third whose ``bad_rank`` feeds NaN images; returns the
    head before and after that step, the step's loss, and the momentum before and after."""
    from hybridpar.parallel import HybridModel

    case = Case(K, scheme="b", fc_batch="chunk", local_batch=2)
    model = HybridModel(case.model(), comm)
    opt = case.optimizer(model.parameters())
    lo, hi = comm.rank * 2, (comm.rank + 1) * 2
    batches = case.batches()
    for x, y in batches[:2]:
        opt.zero_grad(set_to_none=True)
        model.train_step(x[lo:hi], y[lo:hi], scheme="b", fc_batch="chunk", optimizer=opt)
        opt.step()

    def head():
        return {n: p.detach().clone() for n, p in model.named_parameters() if model.split.is_head_parameter(n)}

    def momentum():
        return [opt.state[p]["momentum_buffer"].clone() for p in model.head_parameters()]

    before, m_before = head(), momentum()
    x, y = batches[2]
    x = x[lo:hi].clone()
    if comm.rank == bad_rank:
        x.fill_(float("nan"))
    opt.zero_grad(set_to_none=True)
    loss, _ = model.train_step(x, y[lo:hi], scheme="b", fc_batch="chunk", optimizer=opt)
    return before, head(), m_before, momentum(), comm.all_finite(bool(torch.isfinite(loss)))


@pytest.mark.parametrize("bad_rank", [0, 1, 2])  # scheme (b): round j holds worker j's examples
def test_chunk_rounds_leave_the_head_as_it_was_when_a_round_is_not_finite(bad_rank):
    """A NaN in round j: rounds before it have updated the head, and must be undone; no round
    after it may update. The head and its momentum end as they were before the step."""
    for before, after, m_before, m_after, finite in run_emulated(3, _chunk_steps_with_nan, bad_rank, 3):
        assert not finite
        for n in before:
            assert torch.equal(before[n], after[n]), n
        for a, b in zip(m_before, m_after, strict=True):
            assert torch.equal(a, b)
