"""The planner: per layer, what it holds and moves and how it is parallelised; per layout, the bytes
per step and the predicted step time; the best FC group size for the 2-D hybrid.

    python -m hybridpar.plan model=vgg16 world_size=64 batch=128 bandwidth=100gbit [profile=PATH]
        [num_classes=1000 image_size=224 in_channels=3 alpha_us=10 plan=min_bytes]

Layouts: DDP (everything data parallel), the 1-D hybrid (the head sharded over all K workers, the
paper's) and the 2-D hybrid (the head sharded inside groups of G workers, data parallel across the
K/G groups), for every G dividing K. Bytes come from the closed-form formulas the byte ledger is
tested against (``hybridpar.parallel.cost``); step times from the cost model
(``hybridpar.costmodel``) when a per-layer ``profile`` is given (``python -m hybridpar.costmodel
profile``), else the time the link alone needs (alpha-beta, nothing overlapped).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hybridpar import costmodel as cm
from hybridpar.models.split import split_model
from hybridpar.parallel.cost import allreduce_steps, ddp_step_bytes, two_d_step_bytes
from hybridpar.parallel.data_parallel import trunk_bucket_numels
from hybridpar.parallel.head import choose_styles
from hybridpar.parallel.program import head_message_steps

DEFAULTS = {
    "model": "alexnet",
    "world_size": "8",
    "batch": "128",
    "bandwidth": "10gbit",
    "num_classes": "1000",
    "image_size": "224",
    "in_channels": "3",
    "alpha_us": "10",
    "plan": "min_bytes",
    "profile": "",
}


@dataclass(frozen=True)
class Layout:
    name: str
    G: int  # FC group size (K: 1-D hybrid; 0: DDP)
    bytes: int  # per worker and step
    step_s: float | None  # cost model (None without a profile)
    link_s: float  # the link alone: bytes / bandwidth + alpha per message step


def build(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """The model on the meta device: shapes and parameter counts, no memory, no init cost."""
    import torchvision
    from omegaconf import OmegaConf

    from hybridpar.models import VGG_DEPTHS, build_model

    cfg = {"name": name, "dropout": 0.5}
    if name not in ("alexnet", "alexnet_small", *VGG_DEPTHS) and name in torchvision.models.list_models(
        module=torchvision.models
    ):
        cfg = {"name": "torchvision", "arch": name}  # any other torchvision model by its own name
    if name == "alexnet_small":
        cfg |= {"channels": [32, 64, 96, 64, 64], "hidden": 512, "pool_size": 3}
    return on_meta(lambda: build_model(OmegaConf.create(cfg), num_classes, in_channels, 0))


def on_meta(factory):
    """``factory()`` on the meta device (no memory, no init cost); on the CPU for the models whose
    constructor computes with tensors (RegNet derives its widths with torch ops)."""
    try:
        with torch.device("meta"):
            return factory()
    except (NotImplementedError, RuntimeError):  # "cannot copy out of meta tensor", "not on the expected device"
        return factory()


def layer_table(model: nn.Module, image_size: int, in_channels: int, styles: Sequence[str]) -> list[tuple]:
    """``(name, kind, parameters, activation elements per example, parallelism)`` per layer with weights."""
    head = set(split_model(model).head_names)
    shapes: dict[str, tuple] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
        for n, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    with torch.no_grad():
        model(torch.zeros(1, in_channels, image_size, image_size, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    rows, k = [], 0
    for n, m in model.named_modules():
        if n not in shapes:
            continue
        params = sum(p.numel() for p in m.parameters(recurse=False))
        act = 1
        for d in shapes[n]:
            act *= d
        if n in head:
            rows.append((n, type(m).__name__, params, act, f"model parallel ({styles[k]})"))
            k += 1
        else:
            rows.append((n, type(m).__name__, params, act, "data parallel"))
    return rows


def layouts(model: nn.Module, K: int, b: int, link: cm.Link, profile: cm.Profile | None, plan) -> list[Layout]:
    widths = head_widths(model)
    trunk = trunk_buckets(model)
    n_all = sum(p.numel() for p in model.parameters())
    out = []

    def link_time(kind_bytes: int, steps: int) -> float:
        return steps * link.alpha_s + kind_bytes / link.bytes_per_s

    ddp = ddp_step_bytes(n_all, K)
    out.append(
        Layout(
            "DDP",
            0,
            ddp,
            cm.step_time(profile, link, "ddp", K, b).step_s if profile else None,
            link_time(ddp, allreduce_steps(K)),
        )
    )
    for G in [g for g in range(1, K + 1) if K % g == 0 and g > 1]:
        styles = choose_styles(widths, G, plan)
        by = two_d_step_bytes(widths, styles, trunk, b, K, G)
        step = cm.step_time(profile, link, "a", K, b, plan=plan, fc_group_size=G).step_s if profile else None
        name = "1-D hybrid (G = K)" if G == K else f"2-D hybrid, G = {G}"
        steps = allreduce_steps(K) + head_message_steps(widths, styles, G) + (allreduce_steps(K // G) if G < K else 0)
        out.append(Layout(name, G, by, step, link_time(by, steps)))
    return out


def best(ls: Sequence[Layout]) -> Layout:
    return min(ls, key=lambda lay: (lay.step_s if lay.step_s is not None else lay.link_s, lay.bytes))


def main(argv: Sequence[str] | None = None) -> None:
    args = dict(DEFAULTS)
    for item in sys.argv[1:] if argv is None else argv:
        if item in ("-h", "--help"):
            keys = " ".join(f"{k}={v or '<unset>'}" for k, v in DEFAULTS.items())
            print(f"usage: hybridpar-plan [key=value ...]\n\n{__doc__}\ndefaults: {keys}")
            raise SystemExit(0)
        key, eq, value = item.partition("=")
        if not eq or key not in DEFAULTS:
            print(f"hybridpar.plan: error: {item!r}: use key=value with key in {', '.join(DEFAULTS)}", file=sys.stderr)
            raise SystemExit(2)
        args[key] = value
    try:
        K, b = int(args["world_size"]), int(args["batch"])
        link = cm.Link(float(args["alpha_us"]) * 1e-6, cm.parse_rate(args["bandwidth"]))
        model = build(args["model"], int(args["num_classes"]), int(args["in_channels"]))
        profile = cm.Profile.from_json(Path(args["profile"]).read_text()) if args["profile"] else None
    except Exception as exc:  # noqa: BLE001 - one line for any bad argument
        print(f"hybridpar.plan: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    ls = layouts(model, K, b, link, profile, args["plan"])
    choice = best(ls)
    styles = choose_styles(head_widths(model), choice.G, args["plan"]) if choice.G else ()
    print(
        f"{args['model']}: K = {K} workers, b = {b} per worker, {args['bandwidth']} per worker, "
        f"{'profile ' + args['profile'] if profile else 'no compute profile (link time only)'}"
    )
    print("| layer | kind | parameters | activation / example | parallelism |")
    print("|---|---|---|---|---|")
    for n, kind, p, act, par in layer_table(
        model, int(args["image_size"]), int(args["in_channels"]), styles or ("col",) * 8
    ):
        print(f"| {n} | {kind} | {p:,} | {act:,} | {par if choice.G else 'data parallel'} |")
    print()
    print("| layout | MB sent per worker and step | link time s | predicted step s |")
    print("|---|---|---|---|")
    for lay in ls:
        step = f"{lay.step_s:.4f}" if lay.step_s is not None else "–"
        print(f"| {lay.name} | {lay.bytes / 1e6:.1f} | {lay.link_s:.4f} | {step} |")
    print(
        f"\nchosen: {choice.name}" + (f" (parallel.fc_group_size={choice.G})" if choice.G else " (parallel.scheme=ddp)")
    )


def trunk_buckets(model: nn.Module, head: str | None = None) -> list[int]:
    """Element counts of the trunk's gradient buckets (what its all-reduce moves)."""
    return trunk_bucket_numels(split_model(model, head).trunk_numels(model))


def head_widths(model: nn.Module, head: str | None = None) -> list[tuple[int, int]]:
    """``(in, out)`` of each Linear of the model's head."""
    return split_model(model, head).head_widths(model)


if __name__ == "__main__":
    main()
