"""The 2-D hybrid (parallel.fc_group_size=G): the head sharded inside groups of G workers, data
parallel across the K/G groups. Equal to the single device for every model and G; bytes = formula."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from hybridpar import checkpoint
from hybridpar.comm import run_emulated
from hybridpar.errors import ShardingError
from hybridpar.models import vgg
from hybridpar.parallel import HybridModel
from hybridpar.parallel.cost import two_d_step_bytes
from hybridpar.parallel.data_parallel import trunk_bucket_numels
from hybridpar.verify import Case, compare, hybrid_worker, reference
from tests.helpers import concurrently, results, run_cmd, run_gloo, seeded_model
from tests.user_models import TinyNet

MODELS = {
    "alexnet_small": None,  # Case's own
    "vgg11_small": lambda: vgg("vgg11", 10, 0.0, width=16, hidden=48, pool_size=1),
    "user_tinynet": lambda: TinyNet(10),
}
LAYOUTS = [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]


def _model(name: str):
    return seeded_model(MODELS[name]) if MODELS[name] else None


@functools.cache
def _reference(name: str, K: int) -> dict:
    """The single device on ``Case(K, local_batch=3)``'s batches, run once per model and K: the case's
    fc_group_size shapes the hybrid only, so every G compares against the same run."""
    return reference(Case(K, local_batch=3), _model(name))


@pytest.mark.parametrize("K, G", LAYOUTS)
@pytest.mark.parametrize("name", list(MODELS))
def test_two_d_equals_the_single_device(name, K, G):
    case = Case(K, local_batch=3, fc_group_size=G)
    workers = run_emulated(K, hybrid_worker, case, _model(name))
    errors = compare(workers, _reference(name, K))  # asserts rtol 1e-5 / atol 1e-6, replicas identical
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("scheme", ["b", "c"])
def test_two_d_with_rounds(scheme):
    case = Case(4, local_batch=4, fc_group_size=2, scheme=scheme)
    compare(run_emulated(4, hybrid_worker, case), reference(case))


@pytest.mark.parametrize("K, G", [(4, 1), (4, 2), (6, 3), (6, 2)])
def test_two_d_ledger_is_the_formula(K, G):
    case = Case(K, local_batch=5, fc_group_size=G)
    model = case.model()
    widths = [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, torch.nn.Linear)]
    trunk = trunk_bucket_numels([p.numel() for n, p in model.named_parameters() if not n.startswith("classifier")])
    for rank, w in enumerate(run_emulated(K, hybrid_worker, case)):
        assert w["sent"] == two_d_step_bytes(widths, w["styles"], trunk, 5, K, G, rank), (rank, w["by_tag"])


def _gloo(comm, G):
    return hybrid_worker(comm, Case(comm.world_size, local_batch=3, fc_group_size=G))


@pytest.mark.timeout(240)
def test_two_d_over_gloo():
    workers = results(run_gloo(4, _gloo, 2))
    compare(workers, reference(Case(4, local_batch=3, fc_group_size=2)))


def test_bad_group_sizes_are_refused_before_any_collective():
    def build(comm, G):
        HybridModel(Case(4).model(), comm, fc_group_size=G)

    for G in (3, 0, 5):
        with pytest.raises(ShardingError, match=rf"fc_group_size={G} must divide the number of workers \(4\)"):
            run_emulated(4, build, G)

    def chunk(comm):
        m = HybridModel(Case(4).model(), comm, fc_group_size=2)
        m.train_step(
            torch.randn(2, 3, 32, 32),
            torch.arange(2),
            scheme="c",
            fc_batch="chunk",
            optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        )

    with pytest.raises(ShardingError, match="fc_batch=chunk"):
        run_emulated(4, chunk)


def _save_2d(comm, root):
    case = Case(4, local_batch=2, fc_group_size=2)
    m = HybridModel(case.model(), comm, fc_group_size=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = case.batches()[0]
    m.train_step(x[comm.rank * 2 : comm.rank * 2 + 2], y[comm.rank * 2 : comm.rank * 2 + 2], optimizer=opt)
    opt.step()
    checkpoint.save(
        comm,
        root,
        model=m,
        plain=m,
        optimizer=opt,
        position=checkpoint.Position(1, 0, 1),
        schedule_state={},
        scheme="a",
        config_yaml="",
        keep_last=None,
    )
    return m.full_state_dict()


def _load_1d(comm, root):
    m = HybridModel(Case(3).model(), comm)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    path, meta = checkpoint.latest(root)
    checkpoint.load(comm, path, meta, model=m, plain=m, optimizer=opt, scheme="a")
    return m.full_state_dict()


def test_a_two_d_checkpoint_resumes_on_a_one_d_layout(tmp_path):
    written = run_emulated(4, _save_2d, tmp_path)[0]
    loaded = run_emulated(3, _load_1d, tmp_path)[0]
    assert written.keys() == loaded.keys()
    for n in written:
        assert torch.equal(written[n], loaded[n]), n
    files = sorted(p.name for p in checkpoint.latest(tmp_path)[0].iterdir())
    assert files == ["meta.json", "worker-000.pt", "worker-001.pt", "worker-002.pt", "worker-003.pt"]


APP_SETTINGS = ["2", "auto"]


@pytest.fixture(scope="module")
def app_runs(tmp_path_factory) -> dict[str, Path]:
    """The training app on four emulated workers for each parallel.fc_group_size setting of the test
    below, launched together (independent runs, nothing timed): their run directories."""
    tmp = tmp_path_factory.mktemp("app")

    def train(setting: str):
        return run_cmd(
            [
                sys.executable,
                "-m",
                "hybridpar.train",
                "parallel.emulate=4",
                f"parallel.fc_group_size={setting}",
                "trainer.max_steps=3",
                "logger=none",
                "trainer.progress=false",
                f"hydra.run.dir={tmp / setting}",
            ],
            cwd=tmp,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    runs = concurrently(*(lambda setting=setting: train(setting) for setting in APP_SETTINGS))
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return {setting: tmp / setting for setting in APP_SETTINGS}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setting", APP_SETTINGS)
def test_the_training_app_runs_the_two_d_layout(app_runs, setting):
    from hybridpar.models import alexnet_small
    from hybridpar.parallel.head import choose_styles, fewest_bytes_group

    summary = json.loads((app_runs[setting] / "summary.json").read_text())
    model = alexnet_small(10, in_channels=1, channels=(32, 64, 96, 64, 64), hidden=512)
    G = 2 if setting == "2" else fewest_bytes_group(model, 4, 32)
    assert summary["fc_group_size"] == G
    widths = [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, torch.nn.Linear)]
    trunk = trunk_bucket_numels([p.numel() for p in model.features.parameters()])
    assert summary["comm_bytes_per_step"] == two_d_step_bytes(widths, choose_styles(widths, G), trunk, 32, 4, G)


def _gloo_all(comm):
    """Every (model, G) for this K in one launch: each run is a fresh HybridModel on the same group."""
    K = comm.world_size
    out = {}
    for name in ("vgg11_small", "user_tinynet"):
        for G in sorted({1, 2, K}):
            out[(name, G)] = hybrid_worker(comm, Case(K, local_batch=3, fc_group_size=G), _model(name))
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("K", [2, 4])
def test_vgg_and_a_user_model_over_gloo_for_every_group_size(K):
    runs = results(run_gloo(K, _gloo_all))
    for name, G in runs[0]:
        workers = [r[(name, G)] for r in runs]
        errors = compare(workers, _reference(name, K))
        assert max(errors.values()) < 1e-5, (name, G, errors)
