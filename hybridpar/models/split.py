"""Where a CNN splits into the data-parallel trunk and the model-parallel head, read from its graph.

The model's own ``forward`` is traced with torch.fx. The head is the longest tail of that graph
made only of Linear layers and elementwise layers (ReLU, GELU, dropout, ... as modules or as
functions), each taking the previous one's output alone and feeding nothing else, that holds at
least one Linear: the head starts at the first Linear whose input is the flattened per-example
feature vector. Everything before it — the convolutions, and whatever the forward does between
them and the classifier (``F.adaptive_avg_pool2d``, ``torch.flatten``, ``x.mean([2, 3])``,
ConvNeXt's ``LayerNorm2d``) — is the trunk, replicated and run by the traced graph itself, so
the hybrid computes what the model computes.

Modules are traced as leaves, except those on the way to the head (a ``classifier``
``nn.Sequential`` holding the Linear layers is opened, a ResNet ``layer4`` is not), so the trunk
calls the model's own blocks. The forward is traced in both training and evaluation mode: code
that reads ``self.training`` runs as the model would in each.

What cannot be split is reported before any collective, with what was found and what would work:
no Linear at the end of the forward (SqueezeNet's 1×1-convolution classifier), a forward that
does not trace, a forward that returns more than one tensor, weights shared between the head and
the trunk, or an operation that reduces over the batch dimension in the trunk's own code.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from hybridpar.errors import ShardingError
from hybridpar.models.seeded import MODEL_LOCK

# Layers that act on each activation independently: they may run on any part of a tensor.
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Identity,
    nn.Dropout,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.elu,
    F.hardtanh,
    F.tanh,
    F.sigmoid,
    torch.tanh,
    torch.sigmoid,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}

# Functions whose ``dim`` argument may reduce over examples; in the trunk, dim 0 would make one
# worker's features depend on its own examples only, not on the whole batch as on one device.
_REDUCTIONS = {
    torch.sum,
    torch.mean,
    torch.std,
    torch.var,
    torch.amax,
    torch.amin,
    torch.max,
    torch.min,
    torch.softmax,
    torch.log_softmax,
    torch.cumsum,
    torch.logsumexp,
    F.softmax,
    F.log_softmax,
}
_REDUCTION_METHODS = {
    "sum",
    "mean",
    "std",
    "var",
    "amax",
    "amin",
    "max",
    "min",
    "softmax",
    "log_softmax",
    "cumsum",
    "logsumexp",
}


class Elementwise(nn.Module):
    """A functional elementwise call of the head (``F.relu(x)``, ``x.sigmoid()``) as a layer."""

    def __init__(self, fn: Callable | str, args: tuple = (), kwargs: dict | None = None):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fn, str):
            return getattr(x, self.fn)(*self.args, **self.kwargs)
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", str(self.fn))


@dataclass(frozen=True)
class HeadLayer:
    """One layer of the head: a module of the model (``name``) or a function call (``name`` None)."""

    name: str | None
    label: str  # the module's name, or the function call's node name (ledger tags, messages)
    call: tuple = ()  # for a function: (fn or method name, constant args, kwargs)


@dataclass(frozen=True)
class Split:
    """The trunk/head split of one model architecture (shared by every worker building it)."""

    kind: str  # the model's class name, for messages
    head: tuple[HeadLayer, ...]
    trunk_graphs: dict[bool, fx.Graph] = field(repr=False)  # by training mode: input -> head input
    constants: dict[str, torch.Tensor] = field(repr=False)  # tensors the tracer lifted out of forward

    @property
    def head_labels(self) -> list[str]:
        return [h.label for h in self.head]

    @property
    def head_names(self) -> list[str]:
        """Qualified names of the head's modules (Linear, elementwise), in order."""
        return [h.name for h in self.head if h.name is not None]

    def head_layers(self, model: nn.Module) -> list[nn.Module]:
        """The head's layers, in order: the model's own modules, functions wrapped as layers."""
        return [model.get_submodule(h.name) if h.name is not None else Elementwise(*h.call) for h in self.head]

    def head_widths(self, model: nn.Module) -> list[tuple[int, int]]:
        """``(in, out)`` of each Linear of the head, in order."""
        return [(m.in_features, m.out_features) for m in self.head_layers(model) if isinstance(m, nn.Linear)]

    def trunk_numels(self, model: nn.Module) -> list[int]:
        """Element counts of the trunk's parameters, in model order (what its all-reduce moves)."""
        return [p.numel() for n, p in model.named_parameters() if not self.is_head_parameter(n)]

    def is_head_parameter(self, name: str) -> bool:
        return any(name.startswith(n + ".") for n in self.head_names)

    def trunk_module_names(self, training: bool = True) -> list[str]:
        """The modules the trunk's graph calls, in order (each runs as the model's own)."""
        return graph_targets(self.trunk_graphs[training], ("call_module",))

    def trunk(self, root: nn.Module) -> TrunkRunner:
        """A callable running the trunk over ``root`` (a module with the model's module names)."""
        for name, value in self.constants.items():
            if not hasattr(root, name):
                root.register_buffer(name, value.clone(), persistent=False)
        return TrunkRunner(root, self.trunk_graphs)


class TrunkRunner:
    """Runs the traced trunk graph of the root's current mode; modules are looked up in the root
    at every call, so a module replaced or compiled in place afterwards is the one that runs.
    ``before``, if set, is called with a module's or attribute's name right before the graph
    first uses it (the pipelined trunk sync applies that layer's pending update there).

    The root is held weakly and the graph's interpreter made per call: the root keeps its runner
    (a hybrid model holds the runner of its own trunk), and a reference back would put the whole
    model — parameters, gradients, optimizer state — in a cycle that only a cyclic collection
    frees, gigabytes held after a model is dropped (models built one after another in a sweep)."""

    def __init__(self, root: nn.Module, graphs: dict[bool, fx.Graph]):
        self._root = weakref.ref(root)
        self.before: Callable[[str], None] | None = None
        self.graphs = graphs

    @property
    def root(self) -> nn.Module:
        root = self._root()
        if root is None:
            raise ReferenceError("the module this trunk runner ran over no longer exists")
        return root

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        root = self.root
        return _Interpreter(self, root, self.graphs[root.training]).run(x)

    def owners(self, training: bool = True) -> list[str]:
        """The names the graph's ``call_module`` and ``get_attr`` nodes use, in the order it runs them."""
        return graph_targets(self.graphs[training], ("call_module", "get_attr"))


def graph_targets(graph: fx.Graph, ops: tuple[str, ...]) -> list[str]:
    """The targets of ``graph``'s nodes of kinds ``ops``, each once, in the order it first uses them."""
    return list(dict.fromkeys(str(n.target) for n in graph.nodes if n.op in ops))


class _Interpreter(fx.Interpreter):
    def __init__(self, runner: TrunkRunner, root: nn.Module, graph: fx.Graph):
        super().__init__(root, graph=graph)
        self.runner = runner

    def run_node(self, n: fx.Node):
        if self.runner.before is not None and n.op in ("call_module", "get_attr"):
            self.runner.before(str(n.target))
        return super().run_node(n)


def split_model(model: nn.Module, head: str | None = None) -> Split:
    """The trunk/head split of ``model``; ``head`` names the module where the head starts
    (default: where the graph says). Raises :class:`ShardingError` when there is none."""
    key = _key(model, head)
    with MODEL_LOCK:  # see _CHECKED
        if key not in _CHECKED:
            try:
                _CHECKED[key] = _split(model, head)
            except ShardingError as exc:
                _CHECKED[key] = str(exc)
    found = _CHECKED[key]
    if isinstance(found, str):
        raise ShardingError(found)
    return found


# Splits by architecture (classes and names of all modules, their scalar settings, the head asked
# for): emulated workers building the same model trace it once. While torch.fx traces it patches
# nn.Module.__call__ process-wide, so another thread running a module then would land in this
# trace; the first worker traces (under MODEL_LOCK) before any worker has finished building its
# hybrid, the others reuse the split.
_CHECKED: dict[tuple, Split | str] = {}


def _key(model: nn.Module, head: str | None) -> tuple:
    def flags(m: nn.Module) -> tuple:
        return tuple(
            sorted((k, v) for k, v in vars(m).items() if k != "training" and isinstance(v, bool | int | float | str))
        )

    return tuple((n, type(m), flags(m)) for n, m in model.named_modules()), head


def _split(model: nn.Module, head: str | None) -> Split:
    kind = type(model).__name__
    modules = dict(model.named_modules())
    if head is not None and head not in modules:
        raise ShardingError(
            f"cannot split {kind} at {head!r}: it has no such module; its top-level modules are "
            f"{[n for n, _ in model.named_children()]}"
        )
    was_training = model.training
    graphs, found, lifted = {}, {}, {}
    try:
        for mode in (True, False):
            model.train(mode)
            graph, chain, constants = _trace_split(model, modules, head, kind)
            graphs[mode], found[mode] = _trunk_graph(graph, chain), chain
            lifted |= constants
    finally:
        model.train(was_training)
    layers = {mode: tuple(_head_layer(n) for n in chain) for mode, chain in found.items()}
    if layers[True] != layers[False]:
        raise ShardingError(
            f"cannot split {kind}: its head differs between training and evaluation mode "
            f"({layers[True]} vs {layers[False]})"
        )
    split = Split(kind, layers[True], graphs, lifted)
    _check_trunk(model, split, modules)
    return split


class _Tracer(fx.Tracer):
    """Trace with every module a leaf except those opened (the root and the way to the head)."""

    def __init__(self, opened: set[str]):
        super().__init__()
        self.opened = opened

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname not in self.opened


def _trace_split(model, modules, head, kind):
    """Trace, opening the modules the tail runs into until the tail is made of leaves; returns
    the graph, the head's nodes in order and the tensors the tracer lifted into attributes."""
    opened = {""}
    while True:
        tracer = _Tracer(opened)
        before = set(vars(model))
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: we cannot read the forward
            where = f" (inside {sorted(opened - {''})})" if len(opened) > 1 else ""
            raise ShardingError(
                f"cannot split {kind}: its forward does not trace with torch.fx{where} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the hybrid needs a traceable forward "
                f"that ends in Linear layers"
            ) from None
        lifted = {k: v for k, v in vars(model).items() if k not in before and isinstance(v, torch.Tensor)}
        for k in lifted:  # the tracer stores tensor constants on the traced model: keep it as it was
            delattr(model, k)
        chain, to_open = _tail(graph, modules, kind)
        if to_open is None:
            return graph, _start_at(chain, head, modules, kind), lifted
        opened.add(to_open)


def _tail(graph: fx.Graph, modules: dict[str, nn.Module], kind: str) -> tuple[list[fx.Node], str | None]:
    """The head's nodes in order, or a leaf module on the tail to open first."""
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0]
    if not isinstance(node, fx.Node) or (node.op == "call_function" and isinstance(node.target, type)):
        what = node.target.__name__ if isinstance(node, fx.Node) else type(node).__name__
        raise ShardingError(
            f"cannot split {kind}: its forward returns a {what}, not one tensor of logits "
            "(GoogLeNet/Inception with aux_logits=True: build it with aux_logits=False)"
        )
    chain: list[fx.Node] = []
    user = output
    while isinstance(node, fx.Node) and list(node.users) == [user] and len(node.all_input_nodes) == 1:
        if node.op == "call_module":
            m = modules[str(node.target)]
            if not isinstance(m, (nn.Linear, *ELEMENTWISE_MODULES)):
                if any(isinstance(s, nn.Linear) for s in m.modules()):
                    return chain, str(node.target)  # a container with the head inside: open it
                break
        elif not _is_elementwise_call(node):
            break
        chain.append(node)
        user, node = node, node.all_input_nodes[0]
    chain.reverse()
    first = next(
        (i for i, n in enumerate(chain) if n.op == "call_module" and isinstance(modules[str(n.target)], nn.Linear)),
        None,
    )
    if first is None:
        last = chain[0] if chain else output.args[0]
        what = last.target if last.op == "call_module" else getattr(last.target, "__name__", last.target)
        raise ShardingError(
            f"cannot split {kind}: its forward does not end in Linear layers (the output comes from {what!r}, "
            f"{_describe(last, modules)}), so it has no fully-connected head to shard; train it data-parallel "
            f"(parallel.scheme=ddp)"
        )
    return chain, None


def _start_at(chain: list[fx.Node], head: str | None, modules, kind: str) -> list[fx.Node]:
    if head is None:
        return chain
    inside = [
        i
        for i, n in enumerate(chain)
        if n.op == "call_module" and (n.target == head or str(n.target).startswith(head + "."))
    ]
    names = [str(n.target) if n.op == "call_module" else n.name for n in chain]
    if not inside:
        raise ShardingError(
            f"cannot split {kind} at {head!r}: the head can only be a tail of Linear and elementwise "
            f"layers, and its forward ends in {names}"
        )
    rest = chain[inside[0] :]
    if not any(n.op == "call_module" and isinstance(modules[str(n.target)], nn.Linear) for n in rest):
        raise ShardingError(f"cannot split {kind} at {head!r}: no Linear layer follows it")
    return rest


def _is_elementwise_call(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _head_layer(node: fx.Node) -> HeadLayer:
    if node.op == "call_module":
        return HeadLayer(str(node.target), str(node.target))
    return HeadLayer(None, node.name, (node.target, tuple(node.args[1:]), dict(node.kwargs)))


def _describe(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"a {type(modules[str(node.target)]).__name__}"
    return f"a {node.op.replace('_', ' ')}"


def _trunk_graph(graph: fx.Graph, chain: list[fx.Node]) -> fx.Graph:
    """The graph up to the head's input, which it returns."""
    head = set(chain)
    out, env = fx.Graph(), {}
    for node in graph.nodes:
        if node.op != "output" and node not in head:
            env[node] = out.node_copy(node, lambda n: env[n])
    out.output(env[chain[0].all_input_nodes[0]])
    out.lint()
    return out


def _check_trunk(model: nn.Module, split: Split, modules: dict[str, nn.Module]) -> None:
    kind = split.kind
    twice = sorted({n for n in split.head_names if split.head_names.count(n) > 1})
    if twice:
        raise ShardingError(
            f"cannot split {kind}: its head calls {twice} more than once, so layers of the head share "
            f"weights; the head's weights are sharded layer by layer"
        )
    head_params = {id(p) for n in split.head_names for p in modules[n].parameters()}
    for graph in split.trunk_graphs.values():
        for node in graph.nodes:
            if node.op == "call_module":
                shared = [n for n, p in modules[str(node.target)].named_parameters() if id(p) in head_params]
                if shared or node.target in split.head_names:
                    raise ShardingError(
                        f"cannot split {kind}: the trunk's {node.target} shares weights with the head "
                        f"({shared or 'the module itself'}); the head's weights are sharded"
                    )
            elif node.op == "get_attr" and node.target not in split.constants:
                attr = operator.attrgetter(str(node.target))(model)
                if id(attr) in head_params:
                    raise ShardingError(
                        f"cannot split {kind}: its forward reads the head's {node.target} outside the head"
                    )
            elif _reduces_over_batch(node):
                what = node.target if isinstance(node.target, str) else node.target.__name__
                raise ShardingError(
                    f"cannot split {kind}: its forward's {what}() ({node.name}) reduces over the batch dimension "
                    f"before the head; the trunk runs on each worker's own examples, so it must treat every "
                    f"example separately (BatchNorm layers excepted: they are synchronised)"
                )


def _reduces_over_batch(node: fx.Node) -> bool:
    reduction = (node.op == "call_function" and node.target in _REDUCTIONS) or (
        node.op == "call_method" and node.target in _REDUCTION_METHODS
    )
    if not reduction:
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is None:
        return True  # a reduction over everything, the batch included
    dims = dims if isinstance(dims, list | tuple) else (dims,)
    return any(d == 0 for d in dims if isinstance(d, int))
