"""The AlexNet paper's recipe, selectable: ``model.init=paper`` (its initialisation),
``model.widths=paper`` (the one-weird-trick footnote's conv widths) and ``data=imagenet`` (90
epochs, 128 images per worker, lr 0.01 divided by 10 on held-out top-1 plateaus, three times);
the defaults stay torchvision's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from hybridpar.errors import ConfigError
from hybridpar.models import alexnet, alexnet_small, build_model, build_seeded
from hybridpar.optim import Schedule, sgd
from hybridpar.trainer import _init_from
from tests.helpers import compose_train

# The paper's biases: 1 where a ReLU follows and the layer is conv2, conv4, conv5, FC6 or FC7.
CONV_BIAS = {"features.0": 0.0, "features.3": 1.0, "features.6": 0.0, "features.8": 1.0, "features.10": 1.0}
FC_BIAS = {"classifier.1": 1.0, "classifier.4": 1.0, "classifier.6": 0.0}


def _model(num_classes: int = 10, seed: int = 0, **keys):
    return build_model(OmegaConf.create({"name": "alexnet", "dropout": 0.5, **keys}), num_classes, 3, seed)


def _assert_paper_init(model: nn.Module) -> None:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert set(layers) == set(CONV_BIAS) | set(FC_BIAS)
    for name, layer in layers.items():
        w = layer.weight.detach().double()
        n = w.numel()
        # Five standard errors of the sample mean (0.01/√n) and of the sample std (0.01/√(2n)).
        assert abs(w.mean().item()) < 5 * 0.01 / math.sqrt(n), f"{name}: mean {w.mean().item():.2e} over {n}"
        assert abs(w.std().item() - 0.01) < 5 * 0.01 / math.sqrt(2 * n), f"{name}: std {w.std().item():.5f} over {n}"
        want = {**CONV_BIAS, **FC_BIAS}[name]
        assert torch.equal(layer.bias, torch.full_like(layer.bias, want)), f"{name}: bias not all {want}"


def test_paper_init_draws_the_papers_weights_and_biases():
    _assert_paper_init(_model(init="paper"))


def test_paper_init_on_the_small_alexnet():
    cfg = OmegaConf.create(
        {"name": "alexnet_small", "dropout": 0.5, "init": "paper", "channels": [32, 64, 96, 64, 64], "hidden": 512}
    )
    _assert_paper_init(build_model(cfg, 10, 1, 0))


def test_paper_init_depends_on_the_seed_alone():
    before = torch.random.get_rng_state()
    a, b, c = _model(seed=5, init="paper"), _model(seed=5, init="paper"), _model(seed=6, init="paper")
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is left alone
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
        if name.endswith("weight"):
            assert not torch.equal(x, z), name


def test_default_init_is_torchvisions_bit_for_bit():
    # Today's construction (build_seeded around the bare factory) and torchvision's own AlexNet under
    # the same seed: the default, spelt out or not, changes no bit.
    tv = build_seeded(lambda: torchvision.models.alexnet(num_classes=10), 3).state_dict()
    plain = build_seeded(lambda: alexnet(10), 3).state_dict()
    for built in (_model(seed=3), _model(seed=3, init="torchvision", widths="torchvision")):
        sd = built.state_dict()
        assert sd.keys() == tv.keys()
        for k, v in tv.items():
            assert torch.equal(sd[k], v), k
            assert torch.equal(plain[k], v), k
    small_cfg = compose_train("model=alexnet_small", "model.init=torchvision").model
    small = build_model(small_cfg, 10, 1, 7).state_dict()
    today = build_seeded(
        lambda: alexnet_small(10, 0.5, in_channels=1, channels=(32, 64, 96, 64, 64), hidden=512, pool_size=3), 7
    ).state_dict()
    for k, v in today.items():
        assert torch.equal(small[k], v), k


def test_the_small_models_default_init_is_hes():
    """The small model's default: every weight N(0, 2/fan_in) (the last layer, no ReLU after it, 1/fan_in),
    every bias 0 — not torchvision's uniform draws, whose std is √3 times smaller than He's."""
    model = build_model(compose_train().model, 10, 1, 5)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    for i, m in enumerate(layers):
        w = m.weight.detach()
        fan_in = w[0].numel()
        want = (1.0 if i == len(layers) - 1 else 2.0) ** 0.5 / fan_in**0.5
        # The sample std of n normal draws is within a few times want/√(2n) of want.
        assert abs(w.std().item() - want) < 5 * want / (2 * w.numel()) ** 0.5, (i, w.std().item(), want)
        assert abs(w.mean().item()) < 5 * want / w.numel() ** 0.5, i
        assert not m.bias.any(), i


def _shapes(**keys) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in _model(1000, **keys).state_dict().items()}


def test_widths_option_sets_the_conv_widths():
    paper, tv = _shapes(widths="paper"), _shapes()
    assert paper["features.8.weight"] == (384, 384, 3, 3)
    assert paper["features.10.weight"] == (256, 384, 3, 3)
    assert tv["features.8.weight"] == (256, 384, 3, 3)
    assert tv["features.10.weight"] == (256, 256, 3, 3)
    # Only conv4 and conv5's input change: the FC head still reads 256·6·6 features.
    assert {k for k in tv if tv[k] != paper[k]} == {"features.8.weight", "features.8.bias", "features.10.weight"}
    with torch.device("meta"):
        torchvision_shapes = {k: tuple(v.shape) for k, v in torchvision.models.alexnet().state_dict().items()}
    assert tv == torchvision_shapes


@pytest.fixture(scope="module")
def torchvision_state_dict(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tv") / "alexnet.pt"
    torch.save(build_seeded(lambda: torchvision.models.alexnet(num_classes=10), 11).state_dict(), path)
    return path


def test_torchvision_weights_load_into_the_default_widths(torchvision_state_dict):
    model = _model(seed=0)
    _init_from(model, str(torchvision_state_dict))  # the path of model.init_from: shape checks, then strict
    theirs = torch.load(torchvision_state_dict, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_torchvision_weights_are_refused_by_the_paper_widths_in_one_line(torchvision_state_dict):
    with pytest.raises(ConfigError) as info:
        _init_from(_model(widths="paper"), str(torchvision_state_dict))
    text = str(info.value)
    assert "\n" not in text and "features.8.weight" in text and "does not fit" in text, text


@pytest.mark.parametrize(
    "keys, fragment",
    [
        ({"init": "xavier"}, "model.init='xavier' is not one of torchvision, paper, kaiming"),
        ({"widths": "wide"}, "model.widths='wide' is not one of torchvision, paper"),
        ({"init": "paper", "init_from": "x.pt"}, "model.init=paper and model.init_from=x.pt together"),
    ],
)
def test_a_combination_that_makes_no_sense_is_refused_in_one_line(keys, fragment):
    with pytest.raises(ConfigError) as info, torch.device("meta"):
        _model(**keys)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model=alexnet_small", "model.widths=paper"], "Key 'widths' not in 'AlexNetSmallConfig'"),
        (["model=vgg11", "model.init=paper"], "Key 'init' not in 'VGGConfig'"),
    ],
)
def test_the_options_exist_only_where_they_mean_something(overrides, fragment):
    with pytest.raises(Exception) as info:
        compose_train(*overrides)
    assert fragment in f"{info.value} {info.value.__cause__}"


def test_presets_name_the_options_with_torchvision_as_default():
    cfg = compose_train("model=alexnet")
    assert (cfg.model.init, cfg.model.widths) == ("torchvision", "torchvision")
    assert compose_train().model.init == "kaiming"  # the small model: He's init (see the test above)
    assert compose_train("model=alexnet", "model.init=paper", "model.widths=paper").model.widths == "paper"


def test_imagenet_brings_the_papers_recipe():
    cfg = compose_train("data=imagenet", "data.root=/x")
    assert cfg.model.name == "alexnet"
    assert cfg.trainer.epochs == 90
    assert cfg.data.batch_size == 128
    o = cfg.optim
    assert (o.lr, o.momentum, o.weight_decay, o.schedule) == (0.01, 0.9, 5e-4, "plateau")
    assert (o.plateau.metric, o.plateau.factor, o.plateau.max_drops) == ("top1_error", 0.1, 3)
    # Other data keep the short default, and the command line still picks another schedule.
    default = compose_train()
    assert (default.trainer.epochs, default.optim.schedule, default.optim.warmup_steps) == (8, "cosine", 60)
    assert (default.model.init, default.model.dropout) == ("kaiming", 0.2)  # the small model's quick recipe
    mine = compose_train("data=imagenet", "data.root=/x", "optim=sgd", "trainer.epochs=3")
    assert (mine.trainer.epochs, mine.optim.plateau.metric) == (3, "loss")


def test_imagenet_schedule_divides_by_ten_on_top1_plateaus_three_times():
    cfg = compose_train("data=imagenet", "data.root=/x")
    weight = nn.Parameter(torch.zeros(1))
    optimizer = sgd([{"name": "all", "params": [weight]}], cfg.optim)
    schedule = Schedule(optimizer, cfg.optim, steps_per_epoch=1, total_steps=10)
    rates = []
    # Top-1 improves twice, then stalls for six epochs; the loss keeps falling all along, so a
    # schedule on the loss would never drop.
    for epoch, top1 in enumerate([0.10, 0.20, 0.20, 0.20, 0.20, 0.20, 0.20, 0.20]):
        schedule.after_step()
        schedule.after_eval({"val_loss": 5.0 - epoch, "val_top1": top1})
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.01, 0.01, 1e-3, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5])
