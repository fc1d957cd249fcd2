"""AlexNet keeps torchvision's names and shapes; the small variant keeps its layer kinds."""

import pytest
import torch
import torchvision
from torch import nn

from hybridpar.comm import run_emulated
from hybridpar.models import alexnet, alexnet_small, build_seeded
from hybridpar.parallel import HybridModel


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_alexnet_state_dict_round_trips_with_torchvision():
    ours, theirs = alexnet(num_classes=37, dropout=0.3), torchvision.models.alexnet(num_classes=37, dropout=0.3)
    assert _shapes(ours) == _shapes(theirs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours2 = alexnet(num_classes=37)
    ours2.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    for m in (ours, theirs, ours2):
        m.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(ours2(x), theirs(x), rtol=0, atol=0)
    assert [m.p for m in ours.classifier if isinstance(m, nn.Dropout)] == [0.3, 0.3]


def test_alexnet_layers_are_the_papers():
    m = alexnet(1000)
    convs = [c for c in m.features if isinstance(c, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    assert convs[0].kernel_size == (11, 11) and convs[0].stride == (4, 4)
    pools = [p for p in m.features if isinstance(p, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3  # overlapping pooling
    assert [(f.in_features, f.out_features) for f in m.classifier if isinstance(f, nn.Linear)] == [
        (9216, 4096),
        (4096, 4096),
        (4096, 1000),
    ]
    assert [type(x) for x in m.classifier][:2] == [nn.Dropout, nn.Linear]  # dropout before FC6 ...
    assert isinstance(m.classifier[3], nn.Dropout) and isinstance(m.classifier[4], nn.Linear)  # ... and FC7


@pytest.mark.parametrize("px", [28, 32, 48, 64])
def test_small_variant_keeps_layer_kinds(px):
    small, big = alexnet_small(10), alexnet(10)
    assert [type(m) for m in small.modules()] == [type(m) for m in big.modules()]
    assert small.state_dict().keys() == big.state_dict().keys()
    assert small(torch.randn(2, 3, px, px)).shape == (2, 10)
    gray = alexnet_small(10, in_channels=1, channels=(8, 16, 24, 16, 16), hidden=64)
    assert gray(torch.randn(2, 1, px, px)).shape == (2, 10)


def test_hybrid_loads_and_returns_a_plain_state_dict():
    # A torchvision state_dict loads into the sharded model; the sharded model returns it unchanged,
    # and its evaluation gives torchvision's logits.
    tv = build_seeded(lambda: torchvision.models.alexnet(num_classes=10), 3).eval()
    x = torch.randn(6, 3, 224, 224)
    expected = tv(x)
    fresh = build_seeded(lambda: alexnet(10), 4)

    def run(comm):
        m = HybridModel(fresh, comm).eval()
        m.load_full_state_dict(tv.state_dict())
        lo = comm.rank * 2
        return m(x[lo : lo + 2]).detach(), m.full_state_dict()

    out = run_emulated(3, run)
    torch.testing.assert_close(torch.cat([o[0] for o in out]), expected, rtol=1e-5, atol=1e-5)
    for _, sd in out:
        for k, v in tv.state_dict().items():
            assert torch.equal(sd[k], v), k


def test_dropout_is_per_worker_reproducible_and_off_in_eval():
    model = build_seeded(lambda: alexnet_small(10, 0.5, channels=(8, 16, 24, 16, 16), hidden=50), 0)
    x = torch.randn(8, 3, 32, 32)

    def run(comm):
        m = HybridModel(model, comm, seed=7)
        lo = comm.rank * 4
        train = m(x[lo : lo + 4]).detach()
        evaluated = m.eval()(x[lo : lo + 4]).detach()
        return train, evaluated

    a, b = run_emulated(2, run), run_emulated(2, run)
    for (ta, ea), (tb, eb) in zip(a, b):
        assert torch.equal(ta, tb)  # same seed, same masks
        assert not torch.equal(ta, ea)  # dropout was active in training
    model.eval()
    torch.testing.assert_close(torch.cat([e for _, e in a]), model(x), rtol=1e-5, atol=1e-6)
