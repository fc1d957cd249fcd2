"""Models, with torchvision's parameter names so state_dicts move freely."""

from hybridpar.models.alexnet import AlexNet, alexnet, alexnet_small
from hybridpar.models.seeded import build_seeded

__all__ = ["AlexNet", "alexnet", "alexnet_small", "build_seeded"]
