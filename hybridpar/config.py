"""The training app's configuration schema: Hydra structured configs.

Every group (``model``, ``data``, ``parallel``, ``optim``, ``trainer``, ``checkpoint``,
``logger``) has one dataclass here; ``TrainConfig`` holds them and is registered in Hydra's
ConfigStore as ``train_schema``, the first entry of ``conf/train.yaml``'s defaults, so the YAML
files in ``conf/`` are presets merged onto these schemas. Hydra checks every key and type when it composes the
config, so ``parallel.bucket_mb=big`` or ``trainer.epoch=3`` fails before anything starts. The
values a key may take (``parallel.scheme=a|b|c|ddp``) are checked by ``trainer.validate``.

A group whose options differ in their keys (``model``: AlexNet's widths, VGG's, a torchvision
name, a user's factory; ``data``: the embedded digits, an ImageNet folder, FakeData) has a base
schema with the keys they share and one subclass per option, which the option's YAML extends, so
``model=alexnet model.arch=resnet50`` fails as an unknown key too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from hybridpar.comm.torchdist import MOVE_PIECE_BYTES
from hybridpar.parallel.data_parallel import TRUNK_BUCKET_ELEMENTS


@dataclass
class ModelConfig:
    """Keys every model option has."""

    name: str = MISSING
    dropout: float | None = 0.5  # null (torchvision): the architecture's own
    init_from: str | None = None  # a plain single-device state_dict to start from
    head: str | None = None  # a module where the head starts (null: where the model's graph says)


@dataclass
class AlexNetConfig(ModelConfig):
    name: str = "alexnet"
    init: str = "torchvision"  # torchvision | paper: N(0, 0.01) weights, biases 1 in conv2/4/5 and FC6/7
    widths: str = "torchvision"  # torchvision: 64-192-384-256-256 convs (its weights load) | paper: 64-192-384-384-256


@dataclass
class AlexNetSmallConfig(ModelConfig):
    name: str = "alexnet_small"
    # He's init and light dropout: the small default model learns from its first steps (model=alexnet
    # keeps torchvision's init and dropout 0.5, the paper's ImageNet choices).
    init: str = "kaiming"  # kaiming | torchvision | paper (as model=alexnet's)
    dropout: float | None = 0.2
    channels: list[int] = field(default_factory=lambda: [32, 64, 96, 64, 64])  # conv widths
    hidden: int = 512  # FC width
    pool_size: int = 3  # adaptive pooling before the head


@dataclass
class VGGConfig(ModelConfig):
    name: str = "vgg11"  # vgg11 | vgg13 | vgg16 | vgg19
    batch_norm: bool = False  # BatchNorm after every conv
    width: int = 1  # divides every conv width
    hidden: int = 4096  # FC width
    pool_size: int = 7  # adaptive pooling before the head


@dataclass
class TorchvisionConfig(ModelConfig):
    name: str = "torchvision"
    arch: str = "resnet50"  # the model's name in torchvision.models
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to torchvision.models.get_model
    dropout: float | None = None


@dataclass
class CustomConfig(ModelConfig):
    name: str = "custom"
    target: str = MISSING  # package.module:factory
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the factory


@dataclass
class DataConfig:
    """Keys every dataset option has."""

    name: str = MISSING
    batch_size: int = 32  # per worker
    global_batch: int | None = None  # optional: K * batch_size must equal it
    image_size: int = 32
    num_workers: int = 0
    loader: str = "torch"  # torch: DataLoader worker processes; dali: NVIDIA DALI (data=imagenet, the [dali] extra)


@dataclass
class EmbeddedDataConfig(DataConfig):
    name: str = "embedded"
    val_per_class: int = 100  # held-out digits per class
    augment: bool = False


@dataclass
class ImageNetDataConfig(DataConfig):
    name: str = "imagenet"
    root: str = MISSING  # ImageFolder root (train/, val/)
    batch_size: int = 128
    image_size: int = 224
    resize: int = 256  # short side before the crop
    lighting: float = 0.1  # PCA colour noise std
    num_workers: int = 8


@dataclass
class FakeDataConfig(DataConfig):
    name: str = "fake"
    batch_size: int = 128
    image_size: int = 224
    size: int = 2048  # training images
    val_size: int = 256  # held-out images
    num_classes: int = 1000
    num_workers: int = 2


@dataclass
class SyntheticDataConfig(DataConfig):
    name: str = "synthetic"
    batch_size: int = 128
    image_size: int = 224
    size: int = 1024  # training examples, drawn once on each worker's device
    val_size: int = 256  # held-out examples
    num_classes: int = 1000
    seed: int = 0  # of the draws (the run's seed shuffles them)


@dataclass
class ParallelConfig:
    scheme: str = "a"  # a | b | c | ddp
    fc_batch: str = "full"  # full | chunk
    comm_dtype: str = "fp32"  # fp32 | bf16
    trunk_comm_dtype: str = "fp32"  # fp32 | bf16
    trunk_powersgd_rank: int = 0  # 0: off; r: the trunk's sums by PowerSGD of rank r (lossy)
    overlap: bool = True
    bucket_mb: float = TRUNK_BUCKET_ELEMENTS * 4 / 2**20  # trunk gradient buckets, MB of fp32
    trunk_sync: str = "bucketed"  # bucketed | pipelined
    chunk_trunk: bool = False  # scheme b/c: the trunk runs round by round (features travel while convs run)
    micro_batches: int = 1  # scheme a: m > 1 runs the step in m rounds, the trunk micro-batch by micro-batch
    defer_wgrad: bool = True  # the head's weight gradients after the trunk's backward, while its sums travel
    emulate: int = 1
    sync_bn: bool = True
    fc_group_size: Any = None  # null | G | auto
    plan: Any = "min_bytes"  # min_bytes | paper | [col/row, ...]
    timeout_s: float = 600.0
    peer_timeout_s: Any = 30.0  # a silent peer (host frozen, link down) ends the run in this time; null: off
    # gloo: a move larger than this per peer travels in pieces of this size; null: whole
    move_piece_mb: Any = MOVE_PIECE_BYTES / 2**20


@dataclass
class PlateauConfig:
    metric: str = "loss"  # loss | top1_error
    factor: float = 0.1
    patience: int = 0
    max_drops: int = 3


@dataclass
class StepScheduleConfig:
    every_epochs: int = 30
    gamma: float = 0.1


@dataclass
class OptimConfig:
    lr: float = 0.01
    conv_lr_scale: str = "none"  # none | sqrt | linear
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # plateau | step | cosine | constant (optim=paper: plateau, the AlexNet recipe)
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    step: StepScheduleConfig = field(default_factory=StepScheduleConfig)
    warmup_steps: int = 60


@dataclass
class TrainerConfig:
    epochs: int = 8
    max_steps: int | None = None
    eval_every_steps: int | None = None
    log_every_steps: int = 10
    precision: str = "fp32"  # fp32 | bf16
    deterministic: bool = False
    skip_nonfinite: bool = False
    channels_last: Any = "auto"  # true | false | auto: on for every model but model=custom (see conf/trainer)
    compile: bool = False
    cudnn_benchmark: bool = True
    progress: bool = True


def _checkpoint_init(self, **values: Any) -> None:  # dataclass's __init__, which cannot name `async`
    for f in dataclasses.fields(self):
        setattr(self, f.name, values.pop(f.name, f.default))
    if values:
        raise TypeError(f"CheckpointConfig has no field(s) {', '.join(values)}")


# `checkpoint.async` is the key's name everywhere (YAML, the command line, the docs), but `async` is a
# Python keyword: no class statement, attribute or parameter can spell it, and dataclass generates
# __init__, __repr__ and __eq__ as Python source naming every field (it would not compile). So the
# class is made by type() from a namespace whose __annotations__ name the fields (a class body's
# own __annotations__ is not there to write to from Python 3.14 on), with those three methods off
# and an __init__ of its own. Hydra and OmegaConf read only the fields; the code reads
# cfg.checkpoint["async"].
CheckpointConfig = dataclass(init=False, repr=False, eq=False)(
    type(
        "CheckpointConfig",
        (),
        {
            "__module__": __name__,
            "__qualname__": "CheckpointConfig",
            "__annotations__": {
                "every_steps": int | None,
                "keep_last": int | None,
                "resume": str,
                "dir": str | None,
                "async": bool,
            },
            "every_steps": 500,  # one every N steps (and always at the end); null: only at the end
            "keep_last": 3,  # the newest N complete checkpoints are kept; null: all
            "resume": "auto",  # auto | none | a checkpoint directory
            "dir": None,  # null: <run directory>/checkpoints
            "async": False,  # true: written by a background thread while training goes on (false: the step waits)
            "__init__": _checkpoint_init,
        },
    )
)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "hybridpar"
    mode: str = "offline"


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING  # one of its subclasses, chosen by the group's option
    data: DataConfig = MISSING
    parallel: ParallelConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    output_root: str = "runs"


# The schema of each option of the groups whose options differ in their keys, stored as
# ``schema/<group>/<name>`` (out of the groups a user picks from); the option's YAML names it first
# in its defaults list (``conf/model/vgg11.yaml``: ``- /schema/model@_here_: vgg``).
OPTION_SCHEMAS = {
    "model": {
        "alexnet": AlexNetConfig,
        "alexnet_small": AlexNetSmallConfig,
        "vgg": VGGConfig,
        "torchvision": TorchvisionConfig,
        "custom": CustomConfig,
    },
    "data": {
        "embedded": EmbeddedDataConfig,
        "imagenet": ImageNetDataConfig,
        "fake": FakeDataConfig,
        "synthetic": SyntheticDataConfig,
    },
}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore: ``train_schema`` (named by ``conf/train.yaml``) and
    each option schema of ``OPTION_SCHEMAS``."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, options in OPTION_SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys no schema has. Hydra lets ``+key=value`` add a key even to a typed node, where the
    training app would silently ignore it (``+trainer.epoch=3``); a free-form field such as
    ``model.kwargs`` takes any key."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return []
    known = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in cfg:
        if key not in known:
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(child := cfg._get_node(key)):
            found += unknown_keys(child, f"{prefix}{key}.")
    return found
