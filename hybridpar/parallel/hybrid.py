"""One worker's part of the hybrid model, scheme (a): replicated trunk, sharded head.

One step on K workers with b examples each:

1. every worker runs the replicated trunk on its own b examples;
2. the features move so that every head shard sees all K·b examples (the head plan decides how);
3. the head runs on its shards, and each example's logits end on the worker that owns it;
4. the loss is the mean over the global K·b batch: each worker adds its examples' terms,
   divided by K·b (:func:`global_mean_loss`);
5. backward sends each example's feature gradient back to its owner; head shards get exact
   gradients over all K·b examples without any synchronisation;
6. each worker's trunk gradient is the part of the global-mean gradient due to its own
   examples, so the replicas **sum** them (:meth:`HybridModel.sync_gradients`) — not DDP's
   average, which would be right only for a per-worker mean loss.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.comm.base import Communicator, even_split
from hybridpar.errors import ShardingError
from hybridpar.models.seeded import MODEL_LOCK
from hybridpar.models.split import split_model
from hybridpar.parallel.data_parallel import TRUNK_BUCKET_ELEMENTS, TrunkSync, allreduce_gradients
from hybridpar.parallel.head import shard_head
from hybridpar.parallel.linear import ColumnParallelLinear, RowParallelLinear, ShardSpec, WeightGrads
from hybridpar.parallel.powersgd import PowerSGD
from hybridpar.parallel.program import Move
from hybridpar.parallel.rounds import loss_input, train_rounds
from hybridpar.parallel.sync_bn import sync_batch_norms
from hybridpar.parallel.trunk_pipeline import PARTITION_ELEMENTS, WINDOW, PipelinedTrunkSync, weight_grads_first

TRUNK_SYNCS = ("bucketed", "pipelined")


class HybridModel(nn.Module):
    """Built from a full single-device model (same seed on every worker); keeps the trunk whole
    and this worker's slice of the head. Parameter names are the full model's."""

    def __init__(
        self,
        model: nn.Module,
        comm: Communicator,
        *,
        plan: str | Sequence[str] = "min_bytes",
        head: str | None = None,
        seed: int = 0,
        comm_dtype: torch.dtype | None = None,
        overlap: bool = True,
        bucket_cap: int = TRUNK_BUCKET_ELEMENTS,
        fc_group_size: int | None = None,
        sync_bn: bool = True,
        trunk_sync: str = "bucketed",
        partition_cap: int = PARTITION_ELEMENTS,
        trunk_comm_dtype: torch.dtype | None = None,
        chunk_trunk: bool = False,
        micro_batches: int = 1,
        trunk_powersgd_rank: int = 0,
        defer_wgrad: bool = True,
        weight_first: bool = True,
    ):
        super().__init__()
        K = comm.world_size
        G = K if fc_group_size is None else fc_group_size
        if not 1 <= G <= K or K % G:
            raise ShardingError(f"parallel.fc_group_size={G} must divide the number of workers ({K})")
        # The 2-D hybrid: the head is sharded inside groups of G consecutive workers (``comm``,
        # where the activations move) and each shard's gradient is summed over the K/G workers
        # holding the same shard (``replicas``); the trunk's over all K (``world``). G = K: the paper's.
        self.world = comm
        self.comm = comm.split([[g * G + i for i in range(G)] for g in range(K // G)]) if G < K else comm
        self.replicas = comm.split([[g * G + i for g in range(K // G)] for i in range(G)]) if G < K else None
        # The dtype the features and their gradients travel in (None: as computed). bf16 halves
        # the activation bytes; every accumulation stays in the compute dtype.
        self.comm_dtype = comm_dtype
        # The dtype the trunk's gradient sums travel and are added in (bf16: half the bytes;
        # lossy, unlike everything else here, so opt-in).
        self.trunk_comm_dtype = trunk_comm_dtype
        self.overlap = overlap
        # The trunk runs round by round (rounds.py), so features travel while convs run: the
        # rounds of (b)/(c) (chunk_trunk), or (a) in micro-batches of b/m (micro_batches = m).
        if micro_batches < 1:
            raise ShardingError(f"parallel.micro_batches must be a positive integer, got {micro_batches}")
        self.chunk_trunk = chunk_trunk and comm.world_size > 1
        self.micro_batches = micro_batches if comm.world_size > 1 else 1
        if trunk_sync not in TRUNK_SYNCS:
            raise ShardingError(f"trunk_sync={trunk_sync!r} is not one of {', '.join(TRUNK_SYNCS)}")
        if trunk_powersgd_rank and (trunk_sync != "bucketed" or trunk_comm_dtype is not None):
            raise ShardingError(
                "parallel.trunk_powersgd_rank compresses whole parameters bucket by bucket: it runs with "
                "trunk_sync=bucketed and trunk_comm_dtype=fp32 (one compression at a time)"
            )
        self.powersgd_rank, self.seed = trunk_powersgd_rank, seed
        # The head's weight gradients made after the trunk's backward, while its sums travel
        # (linear.WeightGrads); at K = 1 there is nothing to hide them behind.
        self.wgrad = WeightGrads() if defer_wgrad and comm.world_size > 1 else None
        with MODEL_LOCK:  # tracing and cutting a model shared by emulated workers: one at a time
            self._build(model, plan, head, seed, bucket_cap, overlap, sync_bn)
            self._trunk_sync(trunk_sync, bucket_cap, partition_cap, overlap, weight_first)
            if self.chunk_trunk or self.micro_batches > 1:
                self._check_chunkable()

    def _build(self, model, plan, head, seed, bucket_cap, overlap, sync_bn) -> None:
        comm, world = self.comm, self.world
        # Where the trunk ends and the head starts, read from the model's traced forward (split.py).
        self.split = split_model(model, head)
        # Check and cut the head before touching anything: a bad layer is reported before any collective.
        layers, self.program, self.styles = shard_head(
            self.split.head_layers(model),
            self.split.head_labels,
            comm.rank,
            comm.world_size,
            plan,
            dropout_seed=seed * 1_000_003 + world.rank * 10_007,
        )
        # The worker holds the model's own module tree, so every parameter keeps its single-device
        # name; the head's Linear layers in it are replaced by this worker's shards (never copied whole).
        body = _copy_sharing(model, self.split.head_names)
        for name, child in body.named_children():
            if hasattr(HybridModel, name) or name in vars(self):
                raise ShardingError(
                    f"cannot wrap {type(model).__name__}: its module {name!r} has the name of a HybridModel attribute"
                )
            self.add_module(name, child)
        for name, p in body.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in body.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in body._non_persistent_buffers_set)
        self._head = layers
        for layer in layers:
            if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
                layer.wgrad = self.wgrad
        for h, layer in zip(self.split.head, layers):
            if h.name is not None:
                self.set_submodule(h.name, layer)
        if sync_bn and world.world_size > 1:
            # BatchNorm over the global batch, so the hybrid stays the single device (sync_bn.py).
            sync_batch_norms(self, world, skip=self.split.head_names)
        self._trunk = self.split.trunk(self)
        self.first_move = next(i for i, op in enumerate(self.program) if isinstance(op, Move))

    def _trunk_sync(self, kind: str, bucket_cap: int, partition_cap: int, overlap: bool, weight_first: bool) -> None:
        """How the trunk replicas' gradients are summed: in buckets during the backward, all in
        before the optimizer (``bucketed``), or pipelined across the step boundary, each layer's
        update applied right before the next forward uses it (``pipelined``, trunk_pipeline.py),
        the deepest conv's weight gradient made before its input gradient (``weight_first``;
        False, autograd's order: for measuring what it saves)."""
        world = self.world
        self.pipelined = kind == "pipelined" and world.world_size > 1
        if not self.pipelined:
            compressor = PowerSGD(world, self.powersgd_rank, seed=self.seed) if self.powersgd_rank else None
            self.trunk_sync = TrunkSync(
                self.trunk_parameters(),
                world,
                bucket_cap=bucket_cap,
                overlap=overlap,
                wire=self.trunk_comm_dtype,
                compressor=compressor,
            )
            return
        # Its own group: the sums never queue behind the head's moves, nor they behind the sums.
        trunk_comm = world.split([list(range(world.world_size))])
        named = self._trunk_in_forward_order()
        self.trunk_sync = PipelinedTrunkSync(
            named, trunk_comm, world, cap=partition_cap, window=WINDOW if overlap else 0, wire=self.trunk_comm_dtype
        )
        self._hook_owners([o for o, _ in named])
        self._trunk.before = functools.partial(_before_attribute, weakref.ref(self.trunk_sync), weakref.ref(self))
        deepest = self._deepest_trunk_layer() if weight_first else None
        if deepest is not None:  # the first partitions leave before its input gradient
            weight_grads_first(deepest[1], self.trunk_sync, deepest[0])

    def _deepest_trunk_layer(self) -> tuple[str, nn.Module] | None:
        """``(name, module)`` of the last module holding trunk parameters that the trunk's graph
        runs: its gradients are the backward's first."""
        last = None
        for name in self._trunk.owners():
            if _is_module(self, name):
                for sub, m in self.get_submodule(name).named_modules(prefix=name):
                    if any(True for _ in m.parameters(recurse=False)):
                        last = (sub, m)
        return last

    def _check_chunkable(self) -> None:
        """A trunk run in chunks gives the gradients of one pass only if it treats every example
        on its own: BatchNorm (training) would normalise each chunk by itself."""
        option = "chunk_trunk" if self.chunk_trunk else "micro_batches"
        for name in self.split.trunk_module_names():
            for sub, m in self.get_submodule(name).named_modules(prefix=name):
                if isinstance(m, nn.modules.batchnorm._BatchNorm):  # synchronised ones included
                    raise ShardingError(
                        f"parallel.{option} runs the trunk on each round's rows apart, and {sub} is a "
                        f"BatchNorm: it would normalise by the chunk, not the batch; leave {option} off for this model"
                    )

    def chunked(self, scheme: str) -> bool:
        """Whether this step runs the trunk chunk by chunk (``rounds._train_chunked``)."""
        return self.micro_batches > 1 if scheme == "a" else self.chunk_trunk

    def _trunk_in_forward_order(self) -> list[tuple[str, nn.Parameter]]:
        """``(owner, parameter)`` for every trunk parameter, in the order the forward first uses
        it: the owner is the module holding it directly (or the attribute the trunk's graph
        reads); a module the graph calls as a whole (AlexNet's ``features``) contributes its
        submodules in their registration order, which is their calling order in a Sequential.
        Unused parameters come last. Each owner gets a hook that applies its pending update."""
        order: dict[str, None] = {}
        for name in self._trunk.owners():
            target = self.get_submodule(name) if _is_module(self, name) else None
            if target is None:
                order[name] = None  # an attribute read by the graph
                continue
            for sub, m in target.named_modules(prefix=name):
                if any(True for _ in m.parameters(recurse=False)):
                    order[sub] = None
        rank = {o: i for i, o in enumerate(order)}
        out = []
        for n, p in self.named_parameters():
            if self.split.is_head_parameter(n):
                continue
            owner = n.rpartition(".")[0] if n.rpartition(".")[0] in rank else n
            out.append((rank.get(owner, len(rank)), owner, p))
        out.sort(key=lambda t: t[0])  # stable: model order within an owner
        return [(o, p) for _, o, p in out]

    def _hook_owners(self, owners: Sequence[str]) -> None:
        """Before a module holding trunk parameters runs, its pending update is applied (a
        forward pre-hook, so submodules of a module the graph calls whole are reached too);
        attributes the graph reads directly are handled by the trunk's interpreter."""
        sync = weakref.ref(self.trunk_sync)
        for owner in dict.fromkeys(owners):
            if _is_module(self, owner):
                self.get_submodule(owner).register_forward_pre_hook(functools.partial(_before_module, sync, owner))

    # ---- the step ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of this worker's own examples ``x`` (its local batch)."""
        # Every worker must bring the same batch shape; checked by all before any activation moves
        # (issued now, waited for after the trunk: see Communicator.agree_async).
        shape = self.comm.agree_async("local batch shape", tuple(x.shape))
        h = self.forward_trunk(x)
        shape.wait()
        return self.forward_head(h)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own forward up to the head's input: this worker's examples' feature vectors."""
        if self.pipelined:
            self.trunk_sync.before_forward()
        h = self._trunk(x)
        if self.pipelined:
            self.trunk_sync.flush()  # parameters the graph never named (unused ones) included
        if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[0] != x.shape[0]:
            got = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ShardingError(
                f"the head of {self.split.kind} starts at {self.split.head_labels[0]}, whose input is {got} for a "
                f"batch of {x.shape[0]}: the hybrid shards Linear layers that take one flat feature vector per example"
            )
        return h

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.run_program(self.program, h, [h.shape[0]] * self.comm.world_size)

    def run_program(self, program: Sequence[int | Move], h: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
        """Run ``program`` (a part of the head's: layer indices and moves) on ``h``; the moves' rows
        come from workers bringing ``batch_sizes`` examples."""
        first = self.program[self.first_move]
        for op in program:
            if isinstance(op, int):
                h = self._head[op](h)
                continue
            cast = op is first and self.comm_dtype is not None and self.comm.world_size > 1
            x = h.to(self.comm_dtype) if cast else h
            # The first move may travel in comm_dtype; autograd casts the returning gradient the same way.
            moved = op.spec.apply(x, self.comm, batch_sizes, even_split(op.width, self.comm.world_size), op.tag)
            h = moved.to(h.dtype)
        return h

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        scheme: str = "a",
        fc_batch: str = "full",
        optimizer: torch.optim.Optimizer | None = None,
        autocast=contextlib.nullcontext,
        on_loss: Callable[[torch.Tensor], None] | None = None,
    ):
        """Forward, backward and trunk synchronisation of one step; returns this worker's share of
        the global-mean loss and its examples' logits (both detached). ``on_loss`` is called with
        that share as soon as it exists, before the trunk's backward and its sums (the training
        app issues its per-step vote there: it travels before the sums fill the link).

        ``fc_batch="full"``: the head's gradients accumulate over all rounds (then (b) and (c)
        compute exactly what (a) computes). ``"chunk"``: the head shards take an optimizer step
        after every round, on the mean over that round's examples (FC batch b, conv batch K·b);
        the conv layers still get the mean over all K·b examples.
        """
        if self.chunk_trunk and scheme == "a":
            raise ShardingError(
                "parallel.chunk_trunk runs the trunk round by round: scheme (a) has one round, its chunks are "
                "parallel.micro_batches"
            )
        if self.micro_batches > 1 and scheme != "a":
            raise ShardingError(
                f"parallel.micro_batches cuts scheme (a)'s step into rounds; scheme {scheme!r} has its own "
                "rounds: use parallel.chunk_trunk"
            )
        if self.micro_batches > x.shape[0]:
            raise ShardingError(
                f"parallel.micro_batches={self.micro_batches} is more than the {x.shape[0]} examples per worker"
            )
        if fc_batch == "chunk" and self.replicas is not None:
            raise ShardingError(
                "parallel.fc_batch=chunk updates the head shards every round; the 2-D layout "
                "(fc_group_size < workers) sums them across groups once per step: use fc_batch=full"
            )
        if self.pipelined:
            self.trunk_sync.bind(optimizer)
        if scheme == "a" and self.micro_batches == 1:
            with autocast():
                logits = self(x)
            loss = global_mean_loss(loss_input(logits), y, self.world)
            if on_loss is not None:
                on_loss(loss.detach())
            loss.backward()
            self.sync_gradients()
            return loss.detach(), logits.detach()
        return train_rounds(self, x, y, scheme, fc_batch, optimizer, autocast, on_loss)

    def sync_gradients(self) -> None:
        """Finish summing the trunk replicas' gradients (see the module docstring for why SUM).

        The buckets' all-reduces were issued during backward, as their gradients became ready.
        In the 2-D layout the head shards' gradients are then summed over their replicas.
        Deferred head weight gradients (``defer_wgrad``) are made here, while the trunk's sums
        travel: after the pipelined sync has issued the rest of its sums, before the bucketed one
        waits for its buckets (all issued during the backward)."""
        if self.pipelined:
            self.trunk_sync.finish()
            self.head_weight_grads()
        else:
            self.head_weight_grads()
            self.trunk_sync.finish()
        if self.replicas is not None:
            allreduce_gradients(self.head_parameters(), self.replicas, tag="fc_grads")

    def head_weight_grads(self) -> None:
        """Make the head's deferred weight gradients (``defer_wgrad``; a no-op otherwise): after a
        backward, before anything reads the head's ``.grad``."""
        if self.wgrad is not None:
            self.wgrad.run()

    def flush(self) -> None:
        """Apply every trunk update still pending (``trunk_sync=pipelined`` defers each layer's
        to the next forward); a no-op otherwise. Anything that reads the weights or the
        optimizer's state outside a forward (a checkpoint, an export) comes after it."""
        if self.pipelined:
            self.trunk_sync.flush()

    def state_dict(self, *args, **kwargs):
        self.flush()
        return super().state_dict(*args, **kwargs)

    # ---- layout ---------------------------------------------------------------------------

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The replicated (data-parallel) parameters: every one outside the head, in model order."""
        return [p for n, p in self.named_parameters() if not self.split.is_head_parameter(n)]

    def head_parameters(self) -> list[nn.Parameter]:
        """This worker's shards of the head's parameters."""
        return [p for n, p in self.named_parameters() if self.split.is_head_parameter(n)]

    def shard_specs(self) -> dict[str, ShardSpec]:
        """``{full parameter name: how it is cut}``; parameters not listed are replicated."""
        out = {}
        for h, m in zip(self.split.head, self._head):
            for pname, spec in getattr(m, "specs", {}).items():
                out[f"{h.name}.{pname}"] = spec
        return out

    def full_shapes(self) -> dict[str, list[int]]:
        """The single-device shape of every ``state_dict`` entry."""
        specs, out = self.shard_specs(), {}
        for name, t in self.state_dict().items():
            shape = list(t.shape)
            if name in specs:
                shape[specs[name].dim] = sum(specs[name].sizes)
            out[name] = shape
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device state_dict (every worker gets it; costs one gather per shard)."""
        specs, sd = self.shard_specs(), {}
        for name, t in self.state_dict().items():
            if name in specs:
                spec = specs[name]
                sd[name] = self.comm.all_gather(t.detach().contiguous(), spec.dim, spec.sizes, tag="state_dict")
            else:
                sd[name] = t.detach().clone()
        return sd

    def load_full_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load a single-device state_dict, keeping this worker's slices."""
        specs = self.shard_specs()
        local = {n: (specs[n].take(t, self.comm.rank) if n in specs else t) for n, t in sd.items()}
        self.load_state_dict(local, strict=True)


def _is_module(root: nn.Module, name: str) -> bool:
    try:
        return isinstance(root.get_submodule(name), nn.Module)
    except AttributeError:
        return False


def _before_module(sync: weakref.ref, owner: str, _module: nn.Module, _args) -> None:
    target = sync()
    if target is not None:
        target.before(owner)


def _before_attribute(sync: weakref.ref, root: weakref.ref, name: str) -> None:
    # Both held weakly: the model holds this hook (through its trunk runner), and a reference back
    # would keep a dropped model alive until a cyclic collection.
    target, module = sync(), root()
    if target is not None and module is not None and not _is_module(module, name):
        target.before(name)


def _copy_sharing(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) the modules named in ``names``."""
    memo = {id(model.get_submodule(n)): model.get_submodule(n) for n in names}
    return copy.deepcopy(model, memo)


def global_mean_loss(logits: torch.Tensor, target: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """This worker's share of the cross-entropy averaged over the global batch of K·b examples.

    Summed over workers it is the single-device loss on the concatenated batch; its gradient is
    this worker's share of the single-device gradient.
    """
    return F.cross_entropy(logits, target, reduction="sum") / (logits.shape[0] * comm.world_size)


def assemble(shards: Sequence[Mapping[str, torch.Tensor]], specs: Mapping[str, ShardSpec]) -> dict[str, torch.Tensor]:
    """Re-assemble per-worker tensors (rank order) into single-device ones: sharded entries are
    concatenated along their dim; replicated entries are taken from worker 0."""
    out = {}
    for name in shards[0]:
        if name in specs:
            out[name] = torch.cat([s[name] for s in shards], specs[name].dim)
        else:
            out[name] = shards[0][name]
    return out
