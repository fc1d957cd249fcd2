"""Models, with torchvision's parameter names so state_dicts move freely."""

from hybridpar.models.alexnet import AlexNet, alexnet, alexnet_small
from hybridpar.models.seeded import build_seeded

__all__ = ["AlexNet", "alexnet", "alexnet_small", "build_model", "build_seeded"]


def build_model(cfg, num_classes: int, in_channels: int, seed: int):
    """The full single-device model named by ``cfg.name``, built from ``seed`` (same on every worker)."""
    from hybridpar.errors import ConfigError

    name = cfg["name"]
    if name == "alexnet":
        if in_channels != 3:
            raise ConfigError(
                f"model=alexnet takes 3-channel 224 px images; this data has {in_channels} channel(s): use model=alexnet_small"
            )
        return build_seeded(lambda: alexnet(num_classes, cfg.get("dropout", 0.5)), seed)
    if name == "alexnet_small":
        widths = {k: cfg[k] for k in ("channels", "hidden", "pool_size") if cfg.get(k) is not None}
        if "channels" in widths:
            widths["channels"] = tuple(widths["channels"])
        return build_seeded(
            lambda: alexnet_small(num_classes, cfg.get("dropout", 0.5), in_channels=in_channels, **widths), seed
        )
    raise ConfigError(f"model.name={name!r} is not one of alexnet, alexnet_small")
