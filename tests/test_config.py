"""The typed config (hybridpar/config.py): every preset in conf/ composes onto its schema, the
schema's defaults are the presets' values, every key the docs name exists, and a wrong type or
an unknown key fails at composition."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hybridpar import config
from hybridpar.config import unknown_keys
from tests.helpers import compose_train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
config.register()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in ("model", "data") for o in _options(g)],
)
def test_every_preset_composes_onto_its_own_schema(group, option):
    overrides = [f"{group}={option}"] + (["model.target=pkg.module:factory"] if option == "custom" else [])
    cfg = compose_train(*overrides)
    node = cfg[group]
    schema = OmegaConf.get_type(node)
    assert dataclasses.is_dataclass(schema) and schema.__module__ == "hybridpar.config", schema
    assert node.name == option or (group == "model" and option.startswith("vgg") and schema is config.VGGConfig)
    assert unknown_keys(cfg) == []
    # The preset's values are the schema's defaults (one meaning for a key, however it is built).
    defaults = OmegaConf.structured(schema)
    for key in node:
        if key == "name" or OmegaConf.is_missing(defaults, key):
            continue
        assert node[key] == defaults[key], f"{group}/{option}.yaml {key}={node[key]!r}, schema {defaults[key]!r}"


@pytest.mark.parametrize(
    "group, schema",
    [
        ("parallel", config.ParallelConfig),
        ("optim", config.OptimConfig),
        ("trainer", config.TrainerConfig),
        ("checkpoint", config.CheckpointConfig),
    ],
)
def test_single_option_groups_match_their_schema(group, schema):
    cfg = compose_train()
    assert OmegaConf.get_type(cfg[group]) is schema
    assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(OmegaConf.structured(schema))


def test_every_key_the_docs_name_exists():
    """Every key of docs/training.md's config table and every ``group.key`` the README names in
    backticks is a real setting of some option."""
    composed = [compose_train()] + [compose_train(f"model={o}") for o in _options("model")]
    composed += [compose_train(f"data={o}") for o in _options("data")]
    known = {k for c in composed for k in c} | {
        f"{g}.{k}" for c in composed for g in c if OmegaConf.is_dict(c[g]) for k in c[g]
    }
    named = set()
    for row in (ROOT / "docs" / "training.md").read_text().splitlines():
        cells = row.split(" | ")
        if len(cells) < 3 or not (head := re.match(r"\| `?([a-z_ ]+)`?$", cells[0])):
            continue
        group = "" if head.group(1) == "top level" else head.group(1) + "."
        for token in re.findall(r"`([^`]+)`", cells[2]):
            key = re.match(r"[a-z_0-9]+", token.removeprefix(group))  # a value such as resnet50 has digits
            if (
                key
                and not re.search(r"\d", key.group(0))
                and not token.startswith(("python", "torchvision", "package"))
            ):
                named.add(group + key.group(0))
    groups = "model|data|parallel|optim|trainer|checkpoint|logger"
    named |= set(re.findall(rf"`\+?((?:{groups})\.(?!py\b)[a-z_]+)", (ROOT / "README.md").read_text()))
    assert len(named) > 40, sorted(named)  # the parser still reads the table
    missing = sorted(named - known)
    assert not missing, f"documented but not in any schema: {missing}"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["trainer.epoch=3"], "Key 'epoch' not in 'TrainerConfig'"),
        (["parallel.bucket_mb=big"], "could not be converted to Float"),
        (["data.batch_size=1.5"], "could not be converted to Integer"),
        (["model=alexnet", "model.arch=resnet50"], "Key 'arch' not in 'AlexNetConfig'"),
        (["data.root=/x"], "Key 'root' not in 'EmbeddedDataConfig'"),
    ],
)
def test_a_wrong_type_or_unknown_key_fails_at_composition(overrides, fragment):
    with pytest.raises(Exception) as info:
        compose_train(*overrides)
    text = f"{info.value} {info.value.__cause__}"
    assert fragment in text, text


def test_keys_added_with_plus_are_found():
    cfg = compose_train("+trainer.epoch=3", "+seeds=1", "model=torchvision", "+model.kwargs.aux_logits=false")
    assert unknown_keys(cfg) == ["trainer.epoch", "seeds"]  # model.kwargs is free-form
