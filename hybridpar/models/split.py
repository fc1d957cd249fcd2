"""Where a CNN splits into the data-parallel trunk and the model-parallel head."""

from __future__ import annotations

from torch import nn

from hybridpar.errors import ShardingError


def split_trunk_head(model: nn.Module) -> tuple[list[str], str]:
    """Names of the trunk's top-level modules (run in order, then flattened) and of the head.

    The torchvision layout of AlexNet and VGG: ``features`` → ``avgpool`` → flatten →
    ``classifier`` (an ``nn.Sequential``).
    """
    names = [n for n, _ in model.named_children()]
    if names[-1:] != ["classifier"] or not isinstance(model.classifier, nn.Sequential) or len(names) < 2:
        raise ShardingError(
            f"cannot find the trunk/head split of {type(model).__name__}: expected top-level modules "
            f"[..., 'classifier'] with an nn.Sequential classifier (the torchvision AlexNet/VGG layout), got {names}"
        )
    return names[:-1], "classifier"
