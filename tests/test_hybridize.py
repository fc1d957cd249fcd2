"""hybridize() beyond AlexNet: VGG (torchvision layout), user models, ResNet-style bare Linear
heads; every one equal to its single device; splits the hybrid cannot run are refused clearly."""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from hybridpar import hybridize
from hybridpar.comm import run_emulated
from hybridpar.errors import ShardingError
from hybridpar.models import vgg
from hybridpar.verify import Case, compare, hybrid_worker, reference
from tests.helpers import cli_in_process, concurrently, results, run_gloo, seeded_model
from tests.user_models import BareFc, BatchMixer, FunctionalHead, SkipAcross, TiedHead, TinyNet

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "vgg11_small": lambda: vgg("vgg11", 10, 0.0, width=16, hidden=48, pool_size=1),
    "user_tinynet": lambda: TinyNet(10),
    "user_bare_fc": lambda: BareFc(10),
    "user_skip_across": lambda: SkipAcross(10),
    "user_functional_head": lambda: FunctionalHead(10),
}


@functools.cache
def _reference(name: str, K: int) -> dict:
    """The single device on ``Case(K, local_batch=3)``'s batches, run once per model and K: the
    scheme shapes the hybrid's step only, so every scheme compares against the same run."""
    return reference(Case(K, local_batch=3), seeded_model(MODELS[name]))


def _check(name: str, K: int, scheme: str, workers=None):
    case = Case(K, local_batch=3, scheme=scheme)
    if workers is None:
        workers = run_emulated(K, hybrid_worker, case, seeded_model(MODELS[name]))
    errors = compare(workers, _reference(name, K), rtol=1e-5, atol=1e-6)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("scheme", ["a", "c"])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_hybridized_models_equal_the_single_device(name, K, scheme):
    _check(name, K, scheme)


def _gloo_worker(comm, name):
    case = Case(comm.world_size, local_batch=3)
    return hybrid_worker(comm, case, seeded_model(MODELS[name]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["vgg11_small", "user_tinynet"])
def test_hybridized_models_over_gloo(name):
    _check(name, 2, "a", results(run_gloo(2, _gloo_worker, name)))


def test_vgg_is_torchvisions_architecture():
    # On the meta device: the same names and shapes, strict both ways, without initialising 133M weights.
    for bn in (False, True):
        with torch.device("meta"):
            ours = vgg("vgg11", batch_norm=bn)
            theirs = torchvision.models.vgg11_bn() if bn else torchvision.models.vgg11()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(theirs.state_dict(), strict=True)


def test_models_split_where_their_graph_says():
    from hybridpar.models.split import split_model

    def split(model):
        found = split_model(model)
        return found.trunk_module_names(), found.head_labels

    assert split(torchvision.models.alexnet()) == (["features", "avgpool"], [f"classifier.{i}" for i in range(7)])
    trunk, head = split(torchvision.models.resnet18())
    assert head == ["fc"] and trunk[:4] == ["conv1", "bn1", "relu", "maxpool"] and trunk[-1] == "avgpool"
    # Functional pooling and flatten between the trunk and the classifier stay on the trunk side.
    assert split(torchvision.models.mobilenet_v2()) == (["features"], ["classifier.0", "classifier.1"])
    assert split(torchvision.models.shufflenet_v2_x0_5())[1] == ["fc"]
    # ConvNeXt's per-example LayerNorm2d and Flatten inside its classifier belong to the trunk.
    assert split(torchvision.models.convnext_tiny()) == (
        ["features", "avgpool", "classifier.0", "classifier.1"],
        ["classifier.2"],
    )
    assert split(TinyNet()) == (["body", "pool"], [f"head.{i}" for i in range(5)])
    assert split(FunctionalHead()) == (["conv"], ["fc1", "relu_1", "fc2"])  # relu_1: the F.relu call's node


@pytest.mark.parametrize(
    "model, head, pattern",
    [
        (torchvision.models.squeezenet1_0(), None, r"does not end in Linear layers .* train it data-parallel"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.Conv2d(1, 1, 1)),
            None,
            r"does not end in Linear layers",
        ),
        (BatchMixer(), None, r"reduces over the batch dimension"),
        (TiedHead(), None, r"calls \['embed'\] more than once, so layers of the head share weights"),
        (torchvision.models.googlenet(aux_logits=True, init_weights=False), None, r"aux_logits=False"),
        (TinyNet(), "pool", r"the head can only be a tail of Linear and elementwise layers"),
        (TinyNet(), "nope", r"no such module; its top-level modules are \['body', 'pool', 'head'\]"),
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
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hybridpar.train",
            "parallel.emulate=2",
            "trainer.max_steps=3",
            "logger=none",
            "trainer.progress=false",
            *overrides,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        env=env,
    )


@pytest.mark.timeout(300)
def test_vgg_and_custom_models_train_from_the_command_line(tmp_path):
    # Three independent runs, launched together.
    vgg_run, user, tv = concurrently(
        lambda: _train(
            "model=vgg11",
            "model.width=16",
            "model.hidden=64",
            "model.pool_size=1",
            f"hydra.run.dir={tmp_path / 'v'}",
            cwd=tmp_path,
        ),
        lambda: _train(
            "model=custom",
            "model.target=tests.user_models:TinyNet",
            "+model.kwargs.width=4",
            f"hydra.run.dir={tmp_path / 'u'}",
            cwd=tmp_path,
        ),
        lambda: _train(
            "model=torchvision",
            "model.arch=resnet18",
            "data=fake",
            "data.image_size=32",
            "data.size=48",
            "data.val_size=16",
            "data.num_classes=10",
            "data.batch_size=8",
            "data.num_workers=0",
            f"hydra.run.dir={tmp_path / 't'}",
            cwd=tmp_path,
        ),
    )
    assert vgg_run.returncode == 0, vgg_run.stderr[-2000:]
    assert user.returncode == 0, user.stderr[-2000:]
    assert "features" not in (tmp_path / "u" / "summary.json").read_text()  # sanity: the run wrote its summary
    assert tv.returncode == 0, tv.stderr[-2000:]
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["steps"] == 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=custom", "model.target=tests.user_models:NoSuchNet"],
            "model.target=tests.user_models:NoSuchNet: cannot import it",
        ),
        (
            ["model=torchvision", "model.arch=resnet7", "data=fake"],
            "model.arch='resnet7' is not a torchvision classification model",
        ),
        (["model=custom", "model.target=tests.user_models:BatchMixer"], "reduces over the batch dimension"),
    ],
)
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_models_the_command_line_cannot_build_or_split_are_one_error_line(
    tmp_path, overrides, message, capsys, monkeypatch
):
    """The command line's own entry point, in this process: exit 2 and one line naming the cause."""
    argv = ["parallel.emulate=2", "logger=none", "trainer.progress=false", *overrides, f"output_root={tmp_path}/runs"]
    code = cli_in_process(tmp_path, argv, monkeypatch)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hybridpar: error: "), (code, err[-2000:])
    assert message in lines[0]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"trunk_sync": "pipelined"},
        {"trunk_sync": "pipelined", "trunk_comm_dtype": torch.bfloat16, "weight_first": False},
        {"trunk_powersgd_rank": 2, "fc_group_size": 1},
    ],
    ids=["bucketed", "pipelined", "pipelined-bf16", "powersgd-2d"],
)
def test_a_dropped_hybrid_frees_its_memory_without_a_cyclic_collection(options):
    """Parameters, gradients and optimizer state go when the last reference to the model does, as a
    plain module's do: a reference cycle through the model would hold them until the garbage
    collector runs — gigabytes for a large head, model after model in a sweep run in one process."""
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    alive = []

    def worker(comm, model):
        hybrid = hybridize(model, comm, **options)
        opt = torch.optim.SGD(hybrid.parameters(), lr=0.1, momentum=0.9)
        lo = comm.rank * 2
        hybrid.train_step(x[lo : lo + 2], y[lo : lo + 2], optimizer=opt)
        opt.step()
        hybrid.flush()
        tensors = [*hybrid.parameters(), *(p.grad for p in hybrid.parameters() if p.grad is not None)]
        tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        alive.extend(map(weakref.ref, [hybrid, *tensors]))

    gc.collect()
    gc.disable()
    try:
        run_emulated(2, worker, model)
        left = sum(r() is not None for r in alive)
    finally:
        gc.enable()
    assert len(alive) > 100 and left == 0, (left, len(alive))
