"""The cost model: per-direction byte formulas against the ledger, the timeline's invariants,
a hand-computed step, profiles, the CLI."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from hybridpar import costmodel as cm
from hybridpar.comm import run_emulated
from hybridpar.models import alexnet_small, build_seeded
from hybridpar.parallel import HybridModel
from hybridpar.parallel.cost import ddp_step_bytes, hybrid_step_bytes
from hybridpar.parallel.data_parallel import trunk_bucket_numels
from hybridpar.parallel.head import choose_styles
from hybridpar.parallel.program import MOVES, Move, scheme_rounds
from hybridpar.verify import Case
from tests.helpers import concurrently


@pytest.mark.parametrize("kind", sorted(MOVES))
def test_every_element_sent_is_received(kind):
    for K, n, betas in ((2, 10, [3, 3]), (3, 7, [2, 0, 5]), (4, 9, [1, 2, 3, 4]), (5, 12, [0, 0, 6, 0, 0])):
        flows = [MOVES[kind].sent_recv(n, betas, r) for r in range(K)]
        assert sum(s for s, _ in flows) == sum(r for _, r in flows) > 0, (kind, K, flows)


def _direction_worker(comm, case: Case):
    hybrid = HybridModel(case.model(), comm, plan=case.plan)
    opt = torch.optim.SGD(hybrid.parameters(), lr=0.01)
    x, y = case.batches()[0]
    lo, hi = comm.rank * case.local_batch, (comm.rank + 1) * case.local_batch
    comm.ledger.reset()
    hybrid.train_step(x[lo:hi], y[lo:hi], scheme=case.scheme, optimizer=opt)
    return [op for op in hybrid.program if isinstance(op, Move)], comm.ledger.by_tag()


@pytest.mark.parametrize("scheme", ["a", "b", "c"])
@pytest.mark.parametrize("plan", ["min_bytes", "paper"])
@pytest.mark.parametrize("K", [2, 3])
def test_per_direction_formula_matches_the_ledger(K, plan, scheme):
    """What each move sends and receives forward, and its mirror backward, per worker and tag."""
    case = Case(K, plan=plan, local_batch=5, scheme=scheme)
    rounds = scheme_rounds(scheme, case.local_batch, K)  # every move runs once per round
    for rank, (moves, by_tag) in enumerate(run_emulated(K, _direction_worker, case)):
        for move in moves:
            flows = [move.spec.sent_recv(move.width, betas, rank) for betas in rounds]
            sent, recv = 4 * sum(s for s, _ in flows), 4 * sum(r for _, r in flows)
            assert by_tag[move.tag] == (sent, recv), (rank, move, by_tag)
            assert by_tag[move.tag + ".grad"] == (recv, sent), (rank, move, by_tag)


def _toy_profile(**kw) -> cm.Profile:
    base = {
        "device": "toy",
        "dtype": "float32",
        "batch": 1,
        "trunk": (cm.Stage("c1", 1e-3, 2e-3, (1000, 10)), cm.Stage("c2", 2e-3, 4e-3, (3000, 30))),
        "head": ((100, 50), (50, 10)),
        "fc_rates": ((1, 1e9, 1e9),),
        "opt_s_per_param": 1e-8,
    }
    return cm.Profile(**(base | kw))


def test_one_device_step_is_its_compute():
    prof = _toy_profile()
    b = 4
    fwd = b * 3e-3 + 2 * b * (100 * 50 + 50 * 10) / 1e9
    bwd = b * 6e-3 + 4 * b * (100 * 50 + 50 * 10) / 1e9
    opt = (4040 + 100 * 50 + 50 + 50 * 10 + 10) * 1e-8
    for scheme in cm.SCHEMES:
        t = cm.step_time(prof, cm.Link(1e-3, 1e6), scheme, 1, b)
        assert t.step_s == pytest.approx(fwd + bwd + opt, rel=1e-12), scheme
        assert t.comm_s == 0 and t.bytes_sent == 0
    assert cm.speedup(prof, cm.Link(1e-3, 1e6), "a", 1, b) == pytest.approx(1.0)


def test_ddp_step_by_hand():
    """K = 2, everything in one bucket: forward, backward, then the whole all-reduce, optimizer."""
    prof = _toy_profile()
    b, link = 4, cm.Link(1e-4, 1e5)
    n = 4040 + 5050 + 510
    compute = b * 9e-3 + 6 * b * 5500 / 1e9 + n * 1e-8
    comm = 2 * 1e-4 + n * 4 / 1e5  # K = 2: 2 ring steps, n elements each way
    t = cm.step_time(prof, link, "ddp", 2, b)
    assert t.comm_s == pytest.approx(comm)
    assert t.step_s == pytest.approx(compute + comm)  # the single bucket is ready only at the end
    assert t.bytes_sent == ddp_step_bytes(n, 2)


def test_a_bf16_sum_costs_its_casts_on_the_processor():
    """DDP with torch's bf16 hook, K = 2, one bucket: the casts of all n gradients run before the
    sum is issued (half the bytes of fp32); the hybrid's bf16 trunk sums cast the trunk's only."""
    cast = 3e-9
    prof, b, link = _toy_profile(cast_s_per_elem=cast), 4, cm.Link(1e-4, 1e5)
    n = 4040 + 5050 + 510
    compute = b * 9e-3 + 6 * b * 5500 / 1e9 + n * 1e-8 + n * cast
    t = cm.step_time(prof, link, "ddp", 2, b, grad_itemsize=2)
    assert t.compute_s == pytest.approx(compute)
    assert t.step_s == pytest.approx(compute + 2 * 1e-4 + n * 2 / 1e5)
    assert cm.step_time(prof, link, "ddp", 2, b).step_s == pytest.approx(compute - n * cast + 2e-4 + n * 4 / 1e5)
    for sync in ("bucketed", "pipelined"):
        with_casts = cm.step_time(prof, link, "a", 2, b, grad_itemsize=2, trunk_sync=sync).compute_s
        without = cm.step_time(_toy_profile(), link, "a", 2, b, grad_itemsize=2, trunk_sync=sync).compute_s
        assert with_casts - without == pytest.approx(4040 * cast), sync


@pytest.mark.parametrize("scheme", ["a", "b", "c"])
@pytest.mark.parametrize("K", [2, 3, 4, 8])
def test_timeline_invariants_and_bytes(scheme, K):
    prof = _toy_profile()
    b = 6
    for link in (cm.Link(1e-5, 1e6), cm.Link(1e-3, 1e9), cm.Link(0.0, 1e4)):
        over = cm.step_time(prof, link, scheme, K, b)
        serial = cm.step_time(prof, link, scheme, K, b, overlap=False)
        # Everything issued is waited for; compute and the link each run one thing at a time.
        assert over.step_s >= max(over.compute_s, over.comm_s) - 1e-12
        assert serial.step_s >= over.step_s - 1e-12
        if scheme == "a":
            assert serial.step_s == pytest.approx(serial.compute_s + serial.comm_s)  # nothing overlaps
        widths = list(prof.head)
        expected = hybrid_step_bytes(
            widths, choose_styles(widths, K), trunk_bucket_numels(prof.trunk_params), b, K, 0, scheme=scheme
        )
        assert over.bytes_sent == expected
    # No link cost: the hybrid step is its compute.
    free = cm.step_time(prof, cm.Link(0.0, float("inf")), scheme, K, b)
    assert free.step_s == pytest.approx(free.compute_s)


def test_overlap_hides_the_trunk_allreduce_behind_backward():
    """Two trunk buckets: the later layer's gradients travel while the first layer's backward runs."""
    prof = _toy_profile(
        trunk=(cm.Stage("c1", 0.0, 1.0, (1 << 20,)), cm.Stage("c2", 0.0, 1.0, (1 << 20,))),
        head=((8, 4),),
        fc_rates=((1, 1e30, 1e30),),
        opt_s_per_param=0.0,
    )
    link = cm.Link(0.0, 4 * (1 << 20))  # one bucket (2^20 fp32 elements, K = 2) per second
    t = cm.step_time(prof, link, "a", 2, 1)
    # c2 backward [0, 1] → its bucket [1, 2] while c1 backward [1, 2] → c1's bucket [2, 3].
    assert t.step_s == pytest.approx(3.0, rel=1e-3)
    assert cm.step_time(prof, link, "a", 2, 1, overlap=False).step_s == pytest.approx(4.0, rel=1e-3)


def test_transport_processor_time_bounds_the_step():
    """Where the transport shares the cores, the step is at least compute + its processor time."""
    prof = _toy_profile()
    fast = cm.Link(1e-6, 1e12)
    busy = cm.Link(1e-6, 1e12, cpu_s_per_byte=1e-6)
    t0, t1 = cm.step_time(prof, fast, "ddp", 2, 4), cm.step_time(prof, busy, "ddp", 2, 4)
    assert t1.step_s == pytest.approx(t1.compute_s + 2 * t1.bytes_sent * 1e-6)
    assert t1.step_s > t0.step_s


def test_bf16_sums_cost_the_transport_their_own_rate_per_byte():
    """A bf16 sum's bytes take ``cpu_s_per_bf16_byte`` of the processor each, every other byte
    ``cpu_s_per_byte``: DDP's bf16 hook (all its bytes are sums), the hybrid's bf16 trunk sums."""
    prof, K, b = _toy_profile(), 2, 4
    link = cm.Link(1e-6, 1e12, cpu_s_per_byte=1e-6, cpu_s_per_bf16_byte=3e-6)
    t = cm.step_time(prof, link, "ddp", K, b, grad_itemsize=2)
    assert t.step_s == pytest.approx(t.compute_s + 2 * t.bytes_sent * 3e-6)
    for sync in ("bucketed", "pipelined"):
        t = cm.step_time(prof, link, "a", K, b, grad_itemsize=2, trunk_sync=sync)
        sums = ddp_step_bytes(sum(prof.trunk_params), K) // 2  # the trunk's, one bucket or partition here
        assert t.step_s == pytest.approx(t.compute_s + 2 * (1e-6 * (t.bytes_sent - sums) + 3e-6 * sums)), sync
    # Unmeasured (0): a bf16 byte costs what an fp32 one does.
    same = cm.Link(1e-6, 1e12, cpu_s_per_byte=1e-6)
    t = cm.step_time(prof, same, "ddp", K, b, grad_itemsize=2)
    assert t.step_s == pytest.approx(t.compute_s + 2 * t.bytes_sent * 1e-6)


def test_a_measured_steal_replaces_the_busy_time_per_byte():
    """``steal_s_per_byte`` (measured beside compute) is the per-byte cost where set, fp32 and bf16
    sums scaled alike; unset, the busy time's."""
    prof, K, b = _toy_profile(), 2, 4
    link = cm.Link(1e-6, 1e12, cpu_s_per_byte=1e-6, cpu_s_per_bf16_byte=3e-6, steal_s_per_byte=4e-6)
    t = cm.step_time(prof, link, "ddp", K, b)
    assert t.step_s == pytest.approx(t.compute_s + 2 * t.bytes_sent * 4e-6)
    t = cm.step_time(prof, link, "ddp", K, b, grad_itemsize=2)
    assert t.step_s == pytest.approx(t.compute_s + 2 * t.bytes_sent * 12e-6)
    unset = cm.step_time(prof, cm.Link(1e-6, 1e12, cpu_s_per_byte=1e-6), "ddp", K, b)
    assert unset.step_s == pytest.approx(unset.compute_s + 2 * unset.bytes_sent * 1e-6)


@pytest.mark.parametrize("scheme", ["a", "b", "c"])
def test_each_collective_costs_its_issuer_the_call_time(scheme):
    """On a free link every collective issued delays the issuing thread by ``cpu_s_per_call``:
    the step is its compute + calls × that, bucketed, pipelined and round by round."""
    prof, K, b, call = _toy_profile(), 3, 6, 1e-3
    chunks = {"micro_batches": 3} if scheme == "a" else {"chunk_trunk": True}
    for kw in ({}, {"trunk_sync": "pipelined"}, chunks):
        free = cm.step_time(prof, cm.Link(0.0, float("inf")), scheme, K, b, **kw)
        busy = cm.step_time(prof, cm.Link(0.0, float("inf"), cpu_s_per_call=call), scheme, K, b, **kw)
        assert busy.calls == free.calls > 0
        assert busy.step_s == pytest.approx(free.compute_s + busy.calls * call), kw
        assert busy.compute_s == pytest.approx(free.compute_s)
        # With the transport's bytes on the processor too, the step is at least both on top of compute.
        both = cm.step_time(prof, cm.Link(0.0, float("inf"), 1e-6, cpu_s_per_call=call), scheme, K, b, **kw)
        assert both.step_s == pytest.approx(free.compute_s + both.calls * call + 2 * both.bytes_sent * 1e-6), kw


def _collectives_worker(comm, case: Case, kw: dict):
    hybrid = HybridModel(case.model(), comm, plan=case.plan, **kw)
    opt = torch.optim.SGD(hybrid.parameters(), lr=0.01)
    x, y = case.batches()[0]
    lo, hi = comm.rank * case.local_batch, (comm.rank + 1) * case.local_batch
    for _ in range(2):  # the second step: a pipelined trunk's sums span the step boundary
        comm.ledger.reset()
        hybrid.train_step(x[lo:hi], y[lo:hi], scheme=case.scheme, optimizer=opt)
    return len(comm.ledger.entries), comm.ledger.sent


@pytest.mark.parametrize("scheme", ["a", "b", "c"])
@pytest.mark.parametrize("K", [2, 3])
def test_the_model_issues_the_collectives_and_bytes_the_code_does(K, scheme):
    """Per step, worker 0: as many collectives as the ledger has entries (each costs the processor
    ``cpu_s_per_call``) and as many bytes, for every trunk variant and bf16 features."""
    case = Case(K, local_batch=6, scheme=scheme)
    prof = cm.measure_profile(case.model(), case.image_size, case.local_batch, reps=1, warmup=0)
    chunks = ({"micro_batches": 3}, {"micro_batches": 3}) if scheme == "a" else ({"chunk_trunk": True},) * 2
    for code_kw, model_kw in (
        ({}, {}),
        ({"trunk_sync": "pipelined"}, {"trunk_sync": "pipelined"}),
        chunks,
        ({"comm_dtype": torch.bfloat16}, {"comm_itemsize": 2}),
    ):
        calls, sent = run_emulated(K, _collectives_worker, case, code_kw)[0]
        t = cm.step_time(prof, cm.Link(1e-4, 1e8), scheme, K, case.local_batch, **model_kw)
        assert (t.calls, t.bytes_sent) == (calls, sent), code_kw


def test_fc_rate_interpolates_and_clamps():
    prof = _toy_profile(fc_rates=((2, 1.0, 10.0), (8, 3.0, 30.0)))
    assert prof.fc_rate(1, False) == 1.0 and prof.fc_rate(100, True) == 30.0
    assert prof.fc_rate(4, False) == pytest.approx(2.0)  # halfway in log(rows)
    assert prof.scaled(2.0).fc_rate(4, True) == pytest.approx(40.0)


def test_measured_profile_round_trips_and_predicts():
    model = build_seeded(lambda: alexnet_small(10, dropout=0.0, channels=(8, 16, 24, 16, 16), hidden=32), 0)
    prof = cm.measure_profile(model, 32, 4, reps=1, warmup=1, trunk_rows=[2, 1, 4, 0])
    assert [r[0] for r in prof.trunk_scale] == [1, 2]  # below the batch only, ascending
    assert all(f > 0 and b > 0 for _, f, b in prof.trunk_scale)
    assert [s.name for s in prof.trunk] == ["features.0", "features.3", "features.6", "features.8", "features.10"]
    assert all(s.fwd_s > 0 and s.bwd_s >= 0 for s in prof.trunk)
    assert sum(prof.trunk_params) == sum(p.numel() for n, p in model.named_parameters() if n.startswith("features"))
    assert prof.head == ((16 * 3 * 3, 32), (32, 32), (32, 10))
    again = cm.Profile.from_json(prof.to_json())
    assert again == prof
    assert cm.step_time(again, cm.Link(1e-4, 1e8), "c", 3, 4).step_s > 0


def test_a_trunk_in_chunks_runs_at_its_measured_rate_per_image():
    """Chunks of 2 rows measured at half the per-image time of the batch of 4: each chunk's trunk
    costs half as much as ``rows × per-image`` says; unmeasured sizes interpolate in log(rows)."""
    stage = cm.Stage("c1", 1.0, 2.0, (10,))
    linear = _toy_profile(batch=4, trunk=(stage,), fc_rates=((1, 1e30, 1e30),), opt_s_per_param=0.0)
    scaled = replace(linear, trunk_scale=((2, 0.5, 0.5),))
    assert scaled.trunk_factor(2, False) == 0.5 and scaled.trunk_factor(4, True) == 1.0
    assert scaled.trunk_factor(1, True) == 0.5  # clamped below the smallest measured size
    assert scaled.trunk_factor(2 * 2**0.5, False) == pytest.approx(0.75)  # halfway in log(rows)
    assert scaled.trunk_s(2, True) == [2.0 * 2 * 0.5]
    free = cm.Link(0.0, float("inf"))
    one, chunked = (cm.step_time(p, free, "c", 2, 4, chunk_trunk=True) for p in (linear, scaled))
    assert one.compute_s == pytest.approx(4 * 3.0)  # 4 images, 1 s forward + 2 s backward each
    assert chunked.compute_s == pytest.approx(4 * 3.0 * 0.5)
    assert cm.step_time(scaled, free, "c", 2, 4).compute_s == pytest.approx(one.compute_s)  # one pass: as measured


def test_parse_rate():
    assert cm.parse_rate("100mbit") == pytest.approx(12.5e6)
    assert cm.parse_rate("1gbit") == pytest.approx(125e6)
    assert cm.parse_rate("10Gbit") == pytest.approx(1.25e9)
    assert cm.parse_rate("6GB") == pytest.approx(6e9)
    with pytest.raises(ValueError, match="cannot read the rate"):
        cm.parse_rate("fast")


def test_cli_predict_and_bad_input(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(_toy_profile().to_json())

    def costmodel(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hybridpar.costmodel", *args]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)

    # Independent, launched together.
    out, bad = concurrently(
        lambda: costmodel("predict", "--profile", str(path), "--rate", "1gbit", "--workers", "3", "--batch", "6"),
        lambda: costmodel("project", "--profile", str(path), "--rate", "fast"),
    )
    assert out.returncode == 0, out.stderr
    schemes, options = out.stdout.split("\n\n")
    rows = [line for line in schemes.splitlines() if line.startswith("| ") and not line.startswith("| scheme")]
    assert [r.split("|")[1].strip() for r in rows] == ["ddp", "a", "b", "c"]
    expected = cm.step_time(_toy_profile(), cm.Link(50e-6, 125e6), "a", 3, 6).step_s
    assert float(rows[1].split("|")[2]) == pytest.approx(expected, abs=1e-3)
    # Then the trunk options, fastest first, exact only without --lossy, and the fastest named.
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in options.splitlines()[2:] if line.startswith("| ")]
    steps = [float(c[1]) for c in cells]
    assert steps == sorted(steps) and {c[2] for c in cells} == {"yes"}
    assert "parallel.scheme=a parallel.trunk_sync=pipelined parallel.micro_batches=4" in [c[0] for c in cells]
    assert options.splitlines()[-1] == f"fastest exact: {cells[0][0]} ({cells[0][1]} s predicted)"
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "hybridpar.costmodel: error: cannot read the rate 'fast': use e.g. 100mbit, 1gbit, 10gbit or 6GB"
    ]
    assert json.loads(path.read_text())["device"] == "toy"


def test_predicted_trunk_options_are_what_the_app_runs():
    """Each option row is the step the model predicts for those settings, and its overrides are
    ones the training app accepts (composed and validated as the command line does)."""
    from hybridpar.trainer import validate
    from tests.helpers import compose_train

    prof, link = _toy_profile(), cm.Link(1e-4, 2e6)
    rows = cm.option_rows(prof, link, cm.SCHEMES, 2, 8, lossy=True)
    assert [r[1].step_s for r in rows] == sorted(r[1].step_s for r in rows)
    got = {overrides: (t.step_s, exact) for overrides, t, exact in rows}
    assert len(got) == len(rows) == 2 * (5 + 3 + 3)  # a: 3 micro-batch counts; b, c: chunked; each in bf16 too

    def predicted(scheme, **kw):
        return cm.step_time(prof, link, scheme, 2, 8, **kw).step_s

    assert got["parallel.scheme=a"] == (predicted("a"), True)
    assert got["parallel.scheme=c parallel.trunk_sync=pipelined parallel.chunk_trunk=true"] == (
        predicted("c", trunk_sync="pipelined", chunk_trunk=True),
        True,
    )
    assert got["parallel.scheme=a parallel.trunk_sync=pipelined parallel.micro_batches=8"][0] == predicted(
        "a", trunk_sync="pipelined", micro_batches=8
    )
    bf16 = got["parallel.scheme=b parallel.trunk_sync=pipelined parallel.trunk_comm_dtype=bf16"]
    assert bf16 == (predicted("b", trunk_sync="pipelined", grad_itemsize=2), False)
    assert bf16[0] < got["parallel.scheme=b parallel.trunk_sync=pipelined"][0]  # half the trunk's bytes
    paper = [r[0] for r in cm.option_rows(prof, link, ["a"], 2, 8, plan="paper")]  # a layout of the user's
    assert len(paper) == 5 and all(r.endswith(" parallel.plan=paper") for r in paper)
    for overrides in [*got, *paper]:
        validate(compose_train("model=alexnet", "data=synthetic", "data.batch_size=8", *overrides.split()))


@pytest.mark.parametrize("K, G", [(4, 1), (4, 2), (4, 4), (8, 2), (6, 3)])
def test_two_d_layout_bytes_and_limits(K, G):
    """The 2-D step moves what the 2-D byte formula says; G = K is the 1-D hybrid, G = 1 moves the
    whole model's gradients like DDP (plus nothing else)."""
    from hybridpar.parallel.cost import two_d_step_bytes

    prof = _toy_profile()
    link = cm.Link(1e-5, 1e7)
    t = cm.step_time(prof, link, "a", K, 6, fc_group_size=G)
    widths = list(prof.head)
    assert t.bytes_sent == two_d_step_bytes(
        widths, choose_styles(widths, G), trunk_bucket_numels(prof.trunk_params), 6, K, G
    )
    if G == K:
        assert t == cm.step_time(prof, link, "a", K, 6)
    if G == 1:
        n = sum(prof.trunk_params) + sum(prof.head_params)
        assert t.bytes_sent == ddp_step_bytes(n, K)
    with pytest.raises(ValueError, match="must divide"):
        cm.step_time(prof, link, "a", 8, 6, fc_group_size=3)


def test_pipelined_trunk_sync_by_hand():
    """Two stages of one 512 KB partition each, 1 s per stage each way, one partition per second on
    the link. Bucketed: forward 2, backward 2, then both sums 2 → 6 s. Pipelined (steady state):
    c2's sum leaves as its backward ends and c1's one second later; the next forward waits for
    c1's sum (1 s), runs c1 while c2's is long in → a period of 5 s."""
    n = cm.PARTITION_ELEMENTS
    prof = _toy_profile(
        trunk=(cm.Stage("c1", 1.0, 1.0, (n,)), cm.Stage("c2", 1.0, 1.0, (n,))),
        head=((8, 4),),
        fc_rates=((1, 1e30, 1e30),),
        opt_s_per_param=0.0,
    )
    link = cm.Link(0.0, 4 * n)
    assert cm.step_time(prof, link, "a", 2, 1).step_s == pytest.approx(6.0, rel=1e-3)
    pipelined = cm.step_time(prof, link, "a", 2, 1, trunk_sync="pipelined")
    assert pipelined.step_s == pytest.approx(5.0, rel=1e-3)
    widths = list(prof.head)
    assert pipelined.bytes_sent == hybrid_step_bytes(
        widths, choose_styles(widths, 2), [n, n], 1, 2, 0, trunk_sync="pipelined"
    )


def test_deferred_weight_gradients_by_hand():
    """The pipelined case above with a head whose forward takes 0.5 s and backward 2 s (input
    gradient 0.5 s, as the forward; weight gradient 1.5 s). Inline: forward 2 + head 2.5, c2's
    backward ends at 5.5, its sum [5.5, 6.5], c1's [6.5, 7.5] → a period of 7.5 s. Deferred: the
    head's chain is 1 s, c2's sum [4, 5], c1's [5, 6], the weight gradient [5, 6.5] while c1's sum
    travels → 6.5 s, its compute (the link no longer shows)."""
    n = cm.PARTITION_ELEMENTS
    prof = _toy_profile(
        trunk=(cm.Stage("c1", 1.0, 1.0, (n,)), cm.Stage("c2", 1.0, 1.0, (n,))),
        head=((8, 4),),  # column-parallel at K = 2: 2 · 2 rows · 8 · 2 = 64 FLOPs forward
        fc_rates=((1, 128.0, 64.0),),
        opt_s_per_param=0.0,
    )
    link = cm.Link(0.0, 4 * n)
    inline = cm.step_time(prof, link, "a", 2, 1, trunk_sync="pipelined", defer_wgrad=False)
    deferred = cm.step_time(prof, link, "a", 2, 1, trunk_sync="pipelined")  # the default
    assert inline.step_s == pytest.approx(7.5, rel=1e-3)
    assert deferred.step_s == pytest.approx(6.5, rel=1e-3)
    assert deferred.compute_s == pytest.approx(inline.compute_s) == pytest.approx(6.5, rel=1e-3)
    # Bucketed: the weight gradient runs while the buckets travel, before the wait.
    bucketed = cm.step_time(prof, link, "a", 2, 1)
    assert bucketed.step_s < cm.step_time(prof, link, "a", 2, 1, defer_wgrad=False).step_s - 1.0


@pytest.mark.parametrize("scheme", ["a", "b", "c"])
def test_pipelined_is_never_slower_than_its_compute_and_is_it_on_a_free_link(scheme):
    prof = _toy_profile()
    for link in (cm.Link(1e-5, 1e6), cm.Link(1e-3, 1e9)):
        t = cm.step_time(prof, link, scheme, 4, 6, trunk_sync="pipelined")
        assert t.step_s >= t.compute_s - 1e-12
    free = cm.step_time(prof, cm.Link(0.0, float("inf")), scheme, 4, 6, trunk_sync="pipelined")
    assert free.step_s == pytest.approx(free.compute_s)


@pytest.mark.parametrize("trunk_sync", ["bucketed", "pipelined"])
def test_chunked_trunk_hides_the_first_move_behind_the_trunk(trunk_sync):
    """Scheme c, a trunk that dominates and a link as slow as it: running the trunk round by round
    overlaps the features' trip with the next round's convolutions and the gradients' trip back
    with the previous round's backward. On a free link it is its compute."""
    prof = _toy_profile(
        trunk=(cm.Stage("c1", 1.0, 1.0, (10,)),), head=((100, 50), (50, 10)), fc_rates=((1, 1e30, 1e30),)
    )
    slow = cm.Link(0.0, 400.0)
    kw = {"trunk_sync": trunk_sync}
    plain, chunked = (
        cm.step_time(prof, slow, "c", 2, 4, **kw),
        cm.step_time(prof, slow, "c", 2, 4, chunk_trunk=True, **kw),
    )
    assert chunked.bytes_sent == plain.bytes_sent
    assert chunked.compute_s == pytest.approx(plain.compute_s)
    assert chunked.step_s < plain.step_s - 0.5
    free = cm.step_time(prof, cm.Link(0.0, float("inf")), "c", 2, 4, chunk_trunk=True, **kw)
    assert free.step_s == pytest.approx(free.compute_s)
    # Scheme (a) in K micro-batches is (c)'s chunked schedule; (a) in one pass pays the whole move.
    micro = cm.step_time(prof, slow, "a", 2, 4, micro_batches=2, **kw)
    assert micro.step_s == pytest.approx(chunked.step_s)
    assert micro.step_s < cm.step_time(prof, slow, "a", 2, 4, **kw).step_s - 0.5
    # (b): the last worker's one chunk is the last round's; its forward still overlaps nothing.
    b_chunked = cm.step_time(prof, slow, "b", 2, 4, chunk_trunk=True, **kw)
    assert b_chunked.bytes_sent == cm.step_time(prof, slow, "b", 2, 4, **kw).bytes_sent
    with pytest.raises(ValueError, match="chunk_trunk runs with schemes b and c"):
        cm.step_time(prof, slow, "a", 2, 4, chunk_trunk=True, **kw)
    with pytest.raises(ValueError, match="micro_batches with scheme a"):
        cm.step_time(prof, slow, "c", 2, 4, micro_batches=2, **kw)


def test_a_token_bucket_link_lends_what_it_saved_while_idle():
    """tc tbf: credit builds up while the link is idle (at most the bucket) and is spent at once."""
    tl = cm._Timeline(burst_s=0.5)
    assert tl.issue(2.0) == 2.0  # nothing saved yet
    tl.run(3.0)  # the link idles from 2 to 3: a full bucket
    assert tl.issue(2.0) == pytest.approx(3.0 + 1.5)
    assert tl.issue(1.0) == pytest.approx(5.5)  # back to back: no idle time, no credit
    tl.run(2.0)  # the processor at 5.0, the link busy until 5.5: no idle time
    assert tl.issue(1.0) == pytest.approx(6.5)
    tl.run(2.6)  # the processor at 7.6: the link idled 1.1 s, the bucket holds 0.5
    assert tl.issue(0.2) == pytest.approx(7.6)  # a short move rides on the credit entirely
    assert tl.issue(1.0) == pytest.approx(7.6 + 0.7)  # the 0.3 left


def test_the_two_host_links_bucket_shortens_moves_after_compute():
    prof = _toy_profile(batch=4)
    plain = cm.Link(1e-4, 1e5)
    bucket = replace(plain, burst_bytes=cm.tbf_burst("100mbit"))
    assert cm.tbf_burst("100mbit") == 262144 and cm.tbf_burst("10gbit") == 12_500_000
    a_plain, a_bucket = (cm.step_time(prof, link, "a", 2, 4) for link in (plain, bucket))
    assert a_bucket.step_s < a_plain.step_s
    assert a_bucket.bytes_sent == a_plain.bytes_sent
    no_burst = replace(plain, burst_bytes=0.0)
    assert cm.step_time(prof, no_burst, "a", 2, 4).step_s == a_plain.step_s
