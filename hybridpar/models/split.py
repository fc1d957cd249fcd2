"""Where a CNN splits into the data-parallel trunk and the model-parallel head.

The hybrid runs the trunk as the model's top-level modules in order, flattens, and runs the head
(an ``nn.Sequential`` of Linear and elementwise layers, or one bare ``nn.Linear``). By default the
head is the model's last top-level module — ``classifier`` in torchvision's AlexNet and VGG, ``fc``
in ResNet — and the split is checked against the model's own ``forward`` (traced with torch.fx,
top-level modules as leaves): the forward must be exactly that chain, so the hybrid computes what
the model computes. Anything else is reported with what was found, before any collective.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from hybridpar.errors import ShardingError
from hybridpar.models.seeded import MODEL_LOCK

# Calls allowed between the trunk and the head: flattening the features.
_FLATTEN = {torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.reshape, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


class _TopLevel(fx.Tracer):
    """Trace with every top-level module as a leaf: the graph shows how they are chained."""

    def __init__(self, top: set[str]):
        super().__init__()
        self.top = top

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.top or super().is_leaf_module(m, qualname)


def split_trunk_head(model: nn.Module, head: str | None = None) -> tuple[list[str], str]:
    """Names of the trunk's top-level modules (run in order, then flattened) and of the head."""
    kind = type(model).__name__
    names = [n for n, _ in model.named_children()]
    if not names:
        raise ShardingError(f"cannot find the trunk/head split of {kind}: it has no submodules")
    head = names[-1] if head is None else head
    if head not in names:
        raise ShardingError(f"cannot split {kind} at {head!r}: its top-level modules are {names}")
    module = getattr(model, head)
    if not isinstance(module, nn.Sequential | nn.Linear):
        raise ShardingError(
            f"cannot find the trunk/head split of {kind}: the head ({head!r}, {type(module).__name__}) must be an "
            f"nn.Sequential of Linear and elementwise layers or one nn.Linear, as the model's last top-level module "
            f"(or name it: model.head=<name>); top-level modules: {names}"
        )
    trunk = names[: names.index(head)]
    if not trunk:
        raise ShardingError(f"cannot split {kind} at {head!r}: no trunk modules come before it")
    _check_chain(model, trunk, head)
    return trunk, head


# Verdicts by (class, top-level module names and types, split): emulated workers building the same
# architecture trace it once. While torch.fx traces it patches nn.Module.__call__ process-wide, so
# another thread running a module then would land in this trace; the first worker traces (under
# MODEL_LOCK) before any worker has finished building its hybrid, the others reuse the verdict.
_CHECKED: dict[tuple, str | None] = {}


def _check_chain(model: nn.Module, trunk: list[str], head: str) -> None:
    flags = tuple(sorted((k, v) for k, v in vars(model).items() if isinstance(v, bool | int | float | str)))
    key = (type(model), tuple((n, type(m)) for n, m in model.named_children()), flags, head)
    with MODEL_LOCK:  # see seeded.MODEL_LOCK
        if key not in _CHECKED:
            try:
                _trace_chain(model, trunk, head)
                _CHECKED[key] = None
            except ShardingError as exc:
                _CHECKED[key] = str(exc)
    if _CHECKED[key] is not None:
        raise ShardingError(_CHECKED[key])


def _trace_chain(model: nn.Module, trunk: list[str], head: str) -> None:
    kind = type(model).__name__
    try:
        graph = _TopLevel(set(trunk) | {head}).trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: we cannot confirm the chain
        raise ShardingError(
            f"cannot check the trunk/head split of {kind}: its forward does not trace with torch.fx "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the hybrid needs forward = "
            f"{' -> '.join(trunk)} -> flatten -> {head}"
        ) from None
    expected = [*trunk, head]
    calls = [n for n in graph.nodes if n.op == "call_module"]
    found = [str(n.target) for n in calls]
    if found != expected:
        raise ShardingError(
            f"cannot split {kind}: the hybrid runs {' -> '.join(expected)} in order, but its forward calls {found}"
        )
    # Each call must take the previous one's output (flattening allowed before the head only).
    previous = next(n for n in graph.nodes if n.op == "placeholder")
    for node in calls:
        source = node.args[0] if node.args else None
        while node.target == head and isinstance(source, fx.Node) and _is_flatten(source):
            source = source.args[0]
        if source is not previous or len(node.args) != 1 or node.kwargs:
            raise ShardingError(
                f"cannot split {kind}: {node.target} does not take {previous.name!s} alone as its input "
                f"(found {node.args}); the hybrid needs forward = {' -> '.join(trunk)} -> flatten -> {head}"
            )
        previous = node
    output = next(n for n in graph.nodes if n.op == "output")
    if output.args[0] is not previous:
        raise ShardingError(f"cannot split {kind}: its forward does not return {head}'s output as it is")


def _is_flatten(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FLATTEN
    return node.op == "call_method" and node.target in _FLATTEN_METHODS
