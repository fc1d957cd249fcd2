"""hybridize() beyond AlexNet: VGG (torchvision layout), user models, ResNet-style bare Linear
heads; every one equal to its single device; splits the hybrid cannot run are refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from hybridpar import hybridize
from hybridpar.comm import run_emulated
from hybridpar.errors import ShardingError
from hybridpar.models import build_seeded, vgg
from hybridpar.verify import Case, compare, hybrid_worker, reference
from tests.helpers import results, run_gloo
from tests.user_models import BareFc, SkipAcross, TinyNet

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "vgg11_small": lambda: vgg("vgg11", 10, 0.0, width=16, hidden=48, pool_size=1),
    "user_tinynet": lambda: TinyNet(10),
    "user_bare_fc": lambda: BareFc(10),
}


def _check(name: str, K: int, scheme: str, workers=None):
    case = Case(K, local_batch=3, scheme=scheme)
    model = lambda: build_seeded(MODELS[name], 0)  # noqa: E731
    if workers is None:
        workers = run_emulated(K, hybrid_worker, case, model())
    errors = compare(workers, reference(case, model()), rtol=1e-5, atol=1e-6)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("scheme", ["a", "c"])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_hybridized_models_equal_the_single_device(name, K, scheme):
    _check(name, K, scheme)


def _gloo_worker(comm, name):
    case = Case(comm.world_size, local_batch=3)
    return hybrid_worker(comm, case, build_seeded(MODELS[name], 0))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["vgg11_small", "user_tinynet"])
def test_hybridized_models_over_gloo(name):
    _check(name, 2, "a", results(run_gloo(2, _gloo_worker, name)))


def test_vgg_is_torchvisions_architecture():
    for bn in (False, True):
        ours = vgg("vgg11", batch_norm=bn)
        theirs = torchvision.models.vgg11_bn() if bn else torchvision.models.vgg11()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(theirs.state_dict(), strict=True)


def test_torchvision_models_split_where_expected():
    from hybridpar.models.split import split_trunk_head

    assert split_trunk_head(torchvision.models.alexnet()) == (["features", "avgpool"], "classifier")
    assert split_trunk_head(torchvision.models.resnet18())[1] == "fc"
    assert split_trunk_head(TinyNet()) == (["body", "pool"], "head")


@pytest.mark.parametrize(
    "model, head, pattern",
    [
        (SkipAcross(), None, r"pool does not take b alone as its input \(found \(add,\)\)"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.Conv2d(1, 1, 1)), None, r"must be an nn.Sequential"),
        (TinyNet(), "pool", r"must be an nn.Sequential of Linear"),
        (TinyNet(), "nope", r"its top-level modules are \['body', 'pool', 'head'\]"),
    ],
)
def test_splits_the_hybrid_cannot_run_are_refused_before_any_collective(model, head, pattern):
    def build(comm):
        try:
            hybridize(model, comm, head=head)
        finally:
            assert comm.ledger.entries == []

    with pytest.raises(ShardingError, match=pattern):
        run_emulated(2, build)


def _train(*overrides, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hybridpar.train", "parallel.emulate=2", "trainer.max_steps=3",
                           "logger=none", "trainer.progress=false", *overrides],
                          capture_output=True, text=True, timeout=240, cwd=cwd, env=env)  # fmt: skip


@pytest.mark.timeout(300)
def test_vgg_and_custom_models_train_from_the_command_line(tmp_path):
    vgg_run = _train("model=vgg11", "model.width=16", "model.hidden=64", "model.pool_size=1", f"hydra.run.dir={tmp_path / 'v'}", cwd=tmp_path)
    assert vgg_run.returncode == 0, vgg_run.stderr[-2000:]
    user = _train("model=custom", "model.target=tests.user_models:TinyNet", "+model.kwargs.width=4", f"hydra.run.dir={tmp_path / 'u'}", cwd=tmp_path)
    assert user.returncode == 0, user.stderr[-2000:]
    assert "features" not in (tmp_path / "u" / "summary.json").read_text()  # sanity: the run wrote its summary
    bad = _train("model=custom", "model.target=tests.user_models:NoSuchNet", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("hybridpar: error: model.target=tests.user_models:NoSuchNet: cannot import it")
    skip = _train("model=custom", "model.target=tests.user_models:SkipAcross", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert skip.returncode == 2 and "does not take" in skip.stderr, skip.stderr[-2000:]
