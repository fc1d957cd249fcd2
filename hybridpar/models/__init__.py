"""Models, with torchvision's parameter names so state_dicts move freely."""

from torch import nn

from hybridpar.models.alexnet import INITS, WIDTHS, AlexNet, alexnet, alexnet_small, init_kaiming, init_paper
from hybridpar.models.seeded import build_seeded
from hybridpar.models.vgg import CONFIGS as _VGG_CONFIGS
from hybridpar.models.vgg import vgg

VGG_DEPTHS = tuple(_VGG_CONFIGS)
__all__ = ["AlexNet", "alexnet", "alexnet_small", "build_model", "build_seeded", "init_kaiming", "init_paper", "vgg"]


def build_model(cfg, num_classes: int, in_channels: int, seed: int):
    """The full single-device model named by ``cfg.name``, built from ``seed`` (same on every worker)."""
    from hybridpar.errors import ConfigError

    name = cfg["name"]
    if name == "alexnet":
        if in_channels != 3:
            raise ConfigError(
                f"model=alexnet takes 3-channel 224 px images; this data has {in_channels} channel(s): use model=alexnet_small"
            )
        widths, init = cfg.get("widths", "torchvision"), _alexnet_init(cfg)
        if widths not in WIDTHS:
            raise ConfigError(f"model.widths={widths!r} is not one of {', '.join(WIDTHS)}")
        return build_seeded(lambda: init(alexnet(num_classes, cfg.get("dropout", 0.5), widths=widths)), seed)
    if name == "alexnet_small":
        widths = {k: cfg[k] for k in ("channels", "hidden", "pool_size") if cfg.get(k) is not None}
        if "channels" in widths:
            widths["channels"] = tuple(widths["channels"])
        init = _alexnet_init(cfg)
        return build_seeded(
            lambda: init(alexnet_small(num_classes, cfg.get("dropout", 0.5), in_channels=in_channels, **widths)), seed
        )
    if name in VGG_DEPTHS:
        widths = {k: cfg[k] for k in ("width", "hidden", "pool_size") if cfg.get(k) is not None}
        return build_seeded(
            lambda: vgg(
                name,
                num_classes,
                cfg.get("dropout", 0.5),
                batch_norm=bool(cfg.get("batch_norm", False)),
                in_channels=in_channels,
                **widths,
            ),
            seed,
        )
    if name == "custom":
        return build_seeded(lambda: custom(cfg, num_classes, in_channels), seed)
    if name == "torchvision":
        return build_seeded(lambda: from_torchvision(cfg, num_classes, in_channels), seed)
    raise ConfigError(
        f"model.name={name!r} is not one of alexnet, alexnet_small, {', '.join(VGG_DEPTHS)}, custom, torchvision"
    )


def _alexnet_init(cfg):
    """``model.init``: torchvision's (what construction leaves), the AlexNet paper's or He's, drawn right
    after construction inside ``build_seeded``, so it too depends on the seed alone."""
    from hybridpar.errors import ConfigError

    init = cfg.get("init", "torchvision")
    if init not in INITS:
        raise ConfigError(f"model.init={init!r} is not one of {', '.join(INITS)}")
    # The small model's default (kaiming) is simply replaced by init_from's weights; paper is only ever
    # asked for on purpose, so asking for it and for other weights at once is a mistake worth a line.
    if init == "paper" and cfg.get("init_from"):
        raise ConfigError(
            f"model.init={init} and model.init_from={cfg.init_from} together: the state_dict replaces every weight the init draws"
        )
    return {"paper": init_paper, "kaiming": init_kaiming}.get(init, lambda model: model)


def from_torchvision(cfg, num_classes: int, in_channels: int):
    """``model=torchvision model.arch=<name>``: torchvision's classification model, built untrained
    with ``model.kwargs``; ``model.dropout`` (if set) replaces every dropout probability in it."""
    import torchvision

    from hybridpar.errors import ConfigError

    arch = str(cfg.get("arch"))
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise ConfigError(f"model.arch={arch!r} is not a torchvision classification model: {', '.join(known)}")
    if in_channels != 3:
        raise ConfigError(
            f"model.arch={arch} takes 3-channel images; this data has {in_channels} channel(s): "
            "use data=imagenet or data=fake"
        )
    try:
        model = torchvision.models.get_model(arch, num_classes=num_classes, **dict(cfg.get("kwargs") or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.arch={arch} with model.kwargs={dict(cfg.get('kwargs') or {})}: {exc}") from None
    if cfg.get("dropout") is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = float(cfg.dropout)
    return model


def custom(cfg, num_classes: int, in_channels: int):
    """``model=custom model.target=package.module:factory``: the user's model, built by Hydra's
    ``instantiate`` with ``model.kwargs``; ``num_classes`` and ``in_channels`` are passed when the
    factory takes them (and not given in kwargs)."""
    import inspect

    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate

    from hybridpar.errors import ConfigError

    target = str(cfg.get("target") or "")
    if not target or target == "???":
        raise ConfigError(
            "model=custom needs model.target=package.module:factory (a class or a function returning the model)"
        )
    path = target.replace(":", ".")
    try:
        factory = get_object(path)
    except Exception as exc:  # noqa: BLE001 - import errors of the user's module, a missing name
        why = " ".join(str(exc).split())  # Hydra's import errors span lines; the error is one line
        raise ConfigError(f"model.target={target}: cannot import it ({type(exc).__name__}: {why})") from None
    kwargs = dict(cfg.get("kwargs") or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    try:
        model = instantiate({"_target_": path, **kwargs})
    except InstantiationException as exc:
        raise ConfigError(f"model.target={target}: {str(exc).splitlines()[0]}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.target={target} returned a {type(model).__name__}, not an nn.Module")
    return model
