"""Bad input gets one clear error, raised before any activation or gradient is communicated."""

import pytest
import torch
from torch import nn

from hybridpar.comm import run_emulated
from hybridpar.errors import BatchMismatchError, ShardingError
from hybridpar.models import alexnet_small, build_seeded
from hybridpar.parallel import HybridModel
from hybridpar.verify import Case
from tests.helpers import run_gloo


def _uneven_batches(comm):
    model = Case(comm.world_size).model()
    m = HybridModel(model, comm)
    b = 4 if comm.rank == 0 else 3
    try:
        m(torch.randn(b, 3, 32, 32))
    finally:
        kinds = [e.kind for e in comm.ledger.entries]
    return kinds


def test_uneven_local_batches_emulated():
    with pytest.raises(
        BatchMismatchError, match=r"local batch shape .*worker 0: \(4, 3, 32, 32\).*worker 1: \(3, 3, 32, 32\)"
    ):
        run_emulated(3, _uneven_batches)


def _uneven_batches_report(comm):
    try:
        _uneven_batches(comm)
    except BatchMismatchError as exc:
        return str(exc), [e.kind for e in comm.ledger.entries]
    return None, [e.kind for e in comm.ledger.entries]


@pytest.mark.timeout(120)
def test_uneven_local_batches_gloo_fail_fast_on_every_rank():
    out = run_gloo(2, _uneven_batches_report, timeout_s=90)
    for status, (message, kinds) in out:
        assert status == "ok"
        assert message is not None and "local batch shape" in message
        assert kinds == ["agree"]  # nothing but the shape check was sent


def _with_head(head):
    model = alexnet_small(10, 0.0, channels=(8, 16, 24, 16, 16), hidden=50)
    model.classifier = head
    return model


@pytest.mark.parametrize(
    "head, sharded",
    [
        # A layer that is not elementwise ends the head: what comes before it runs in the trunk.
        (
            nn.Sequential(nn.Linear(144, 50), nn.BatchNorm1d(50), nn.ReLU(), nn.Linear(50, 10)),
            ["classifier.2", "classifier.3"],
        ),
        (nn.Sequential(nn.Linear(144, 50), nn.Softmax(dim=1), nn.Linear(50, 10)), ["classifier.2"]),
    ],
)
def test_a_head_layer_that_cannot_be_sharded_moves_to_the_trunk(head, sharded):
    labels = run_emulated(2, lambda comm: HybridModel(_with_head(head), comm).split.head_labels)
    assert labels == [sharded, sharded]


@pytest.mark.parametrize(
    "model",
    [
        _with_head(nn.Sequential(nn.ReLU())),
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.Softmax(dim=1)),  # ends in no Linear
    ],
)
def test_model_without_a_linear_head_is_refused(model):
    def build(comm):
        try:
            HybridModel(model, comm)
        finally:
            assert comm.ledger.entries == []

    with pytest.raises(ShardingError, match=r"does not end in Linear layers"):
        run_emulated(2, build)


@pytest.mark.parametrize(
    "K, classes, hidden, pattern",
    [
        (4, 3, 50, r"classifier\.6 \(Linear 50->3\) over 4 workers: its output width 3"),
        (4, 10, 2, r"classifier\.1 \(Linear 144->2\) over 4 workers: its output width 2"),
    ],
)
def test_more_workers_than_a_layer_is_wide(K, classes, hidden, pattern):
    model = build_seeded(lambda: alexnet_small(classes, 0.0, channels=(8, 16, 24, 16, 16), hidden=hidden), 0)

    def build(comm):
        try:
            HybridModel(model, comm)
        finally:
            assert comm.ledger.entries == []

    with pytest.raises(ShardingError, match=pattern):
        run_emulated(K, build)


def _too_narrow(comm):
    model = build_seeded(lambda: alexnet_small(1, 0.0, channels=(8, 16, 24, 16, 16), hidden=50), 0)
    try:
        HybridModel(model, comm)
    except ShardingError as exc:
        return str(exc)
    return None


@pytest.mark.timeout(120)
def test_more_workers_than_classes_gloo():
    for status, message in run_gloo(2, _too_narrow, timeout_s=90):
        assert status == "ok" and "output width 1 is smaller than the number of workers" in message


def test_move_piece_mb_is_a_positive_size_or_null():
    from hybridpar.errors import ConfigError
    from hybridpar.trainer import validate
    from tests.helpers import compose_train

    for good in ("null", "0.25", "4"):
        validate(compose_train(f"parallel.move_piece_mb={good}"))
    for bad in ("0", "-1", "big", "true"):
        with pytest.raises(ConfigError, match=r"^parallel.move_piece_mb must be a positive number of MB or null"):
            validate(compose_train(f"parallel.move_piece_mb={bad}"))
