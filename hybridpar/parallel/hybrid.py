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
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.comm import regions
from hybridpar.comm.base import Communicator, even_split
from hybridpar.errors import ShardingError
from hybridpar.models.seeded import MODEL_LOCK
from hybridpar.models.split import split_model
from hybridpar.parallel.cost import scheme_rounds
from hybridpar.parallel.data_parallel import TrunkSync, allreduce_gradients
from hybridpar.parallel.head import Move, shard_head
from hybridpar.parallel.linear import ShardSpec
from hybridpar.parallel.rounds import grads_from, own_rows, send_grads, send_inputs
from hybridpar.parallel.sync_bn import sync_batch_norms


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
        bucket_cap: int = 1 << 20,
        fc_group_size: int | None = None,
        sync_bn: bool = True,
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
        self.overlap = overlap
        with MODEL_LOCK:  # tracing and cutting a model shared by emulated workers: one at a time
            self._build(model, plan, head, seed, bucket_cap, overlap, sync_bn)

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
        for h, layer in zip(self.split.head, layers):
            if h.name is not None:
                self.set_submodule(h.name, layer)
        if sync_bn and world.world_size > 1:
            # BatchNorm over the global batch, so the hybrid stays the single device (sync_bn.py).
            sync_batch_norms(self, world, skip=self.split.head_names)
        self._trunk = self.split.trunk(self)
        self._first_move = next(i for i, op in enumerate(self.program) if isinstance(op, Move))
        self.trunk_sync = TrunkSync(self.trunk_parameters(), world, bucket_cap=bucket_cap, overlap=overlap)

    # ---- the step ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of this worker's own examples ``x`` (its local batch)."""
        # Every worker must bring the same batch shape; checked by all before any activation moves.
        self.comm.agree("local batch shape", tuple(x.shape))
        return self.forward_head(self.forward_trunk(x))

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own forward up to the head's input: this worker's examples' feature vectors."""
        h = self._trunk(x)
        if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[0] != x.shape[0]:
            got = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ShardingError(
                f"the head of {self.split.kind} starts at {self.split.head_labels[0]}, whose input is {got} for a "
                f"batch of {x.shape[0]}: the hybrid shards Linear layers that take one flat feature vector per example"
            )
        return h

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        return self._run(self.program, h, [h.shape[0]] * self.comm.world_size)

    def _run(self, program, h: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
        head = self._head
        first = self.program[self._first_move]
        for op in program:
            if isinstance(op, int):
                h = head[op](h)
            elif op is first and self.comm_dtype is not None and self.comm.world_size > 1:
                # Autograd casts the returning gradient the same way: both directions travel in comm_dtype.
                h = self._move(op, h.to(self.comm_dtype), batch_sizes).to(h.dtype)
            else:
                h = self._move(op, h, batch_sizes)
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
    ):
        """Forward, backward and trunk synchronisation of one step; returns this worker's share of
        the global-mean loss and its examples' logits (both detached).

        ``fc_batch="full"``: the head's gradients accumulate over all rounds (then (b) and (c)
        compute exactly what (a) computes). ``"chunk"``: the head shards take an optimizer step
        after every round, on the mean over that round's examples (FC batch b, conv batch K·b);
        the conv layers still get the mean over all K·b examples.
        """
        if fc_batch == "chunk" and self.replicas is not None:
            raise ShardingError(
                "parallel.fc_batch=chunk updates the head shards every round; the 2-D layout "
                "(fc_group_size < workers) sums them across groups once per step: use fc_batch=full"
            )
        if scheme == "a":
            with autocast():
                logits = self(x)
            loss = global_mean_loss(_loss_dtype(logits), y, self.world)
            loss.backward()
            self.sync_gradients()
            return loss.detach(), logits.detach()
        return self._train_rounds(x, y, scheme, fc_batch, optimizer, autocast)

    def _train_rounds(self, x, y, scheme, fc_batch, optimizer, autocast):
        comm, K, first = self.comm, self.comm.world_size, self._first_move
        move: Move = self.program[first]
        self.comm.agree("local batch shape", tuple(x.shape))
        with autocast():
            h0 = self._run(self.program[:first], self.forward_trunk(x), [])
        total = self.world.world_size * x.shape[0]  # the global batch: every group's rounds
        sizes = scheme_rounds(scheme, x.shape[0], K)
        rows = own_rows(sizes, comm.rank)
        wire = self.comm_dtype or h0.dtype
        sent = h0.detach().to(wire)

        def issue(j: int):
            return send_inputs(move.kind, sent[rows[j]], comm, sizes[j], move.tag)

        pending = {0: issue(0)}
        returns, logits_out = [], []
        loss_share, snapshot, finite = 0.0, None, True
        for j in range(K):
            if self.overlap and j + 1 < K:
                pending[j + 1] = issue(j + 1)  # next round's features travel while this round computes
            inp = torch.cat(pending.pop(j).wait(), 0).to(h0.dtype).requires_grad_()
            with autocast():
                logits = self._run(self.program[first + 1 :], inp, sizes[j])
            ce = F.cross_entropy(_loss_dtype(logits), y[rows[j]], reduction="sum")
            n_j = sum(sizes[j])
            (ce / (total if fc_batch == "full" else n_j)).backward()
            loss_share = loss_share + ce.detach() / total
            logits_out.append(logits.detach())
            g = inp.grad
            if fc_batch == "chunk":
                # The head updates inside the step, before the trainer can check the step's loss:
                # every round's loss is checked (all workers agree) before its update, and a bad
                # round puts back the head as it was before the step, so the trainer's "stop before
                # the update" / "skip the step" hold for the head too. Later rounds still run
                # (their moves are collectives every worker must join) without updating.
                finite = finite and self.world.all_finite(math.isfinite(ce.item()), "round_nonfinite_check")
                if finite:
                    snapshot = snapshot or _HeadState(self.head_parameters(), optimizer)
                    optimizer.step()  # only the head has gradients yet: the trunk's come after the rounds
                elif snapshot is not None:
                    snapshot.restore()
                    snapshot = None
                for p in self.head_parameters():
                    p.grad = None
                g = g * (n_j / total)  # the trunk still sees the mean over all K·b examples
            returns.append((j, send_grads(move.kind, g.to(wire), comm, sizes[j], move.width, move.tag + ".grad")))
            if not self.overlap:
                returns[-1][1].wait()
                if j + 1 < K:
                    pending[j + 1] = issue(j + 1)
        grad = torch.zeros_like(h0)
        for j, handle in returns:
            grad[rows[j]] += grads_from(move.kind, handle.wait()).to(grad.dtype)
        h0.backward(grad)
        self.sync_gradients()
        return loss_share, torch.cat(logits_out)

    def _move(self, op: Move, h: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
        comm, fs = self.comm, even_split(op.width, self.comm.world_size)
        if op.kind == "gather_batch":
            return regions.gather_batch(h, comm, batch_sizes, op.tag)
        if op.kind == "scatter_batch":
            return regions.scatter_batch(h, comm, batch_sizes, op.tag)
        if op.kind == "gather_features":
            return regions.gather_features(h, comm, fs, op.tag)
        if op.kind == "reduce_scatter_features":
            return regions.reduce_scatter_features(h, comm, fs, op.tag)
        if op.kind == "batch_to_features":
            return regions.batch_to_features(h, comm, batch_sizes, fs, op.tag)
        if op.kind == "features_to_batch":
            return regions.features_to_batch(h, comm, batch_sizes, fs, op.tag)
        raise ValueError(f"unknown move {op.kind!r}")

    def sync_gradients(self) -> None:
        """Finish summing the trunk replicas' gradients (see the module docstring for why SUM).

        The buckets' all-reduces were issued during backward, as their gradients became ready.
        In the 2-D layout the head shards' gradients are then summed over their replicas."""
        self.trunk_sync.finish()
        if self.replicas is not None:
            allreduce_gradients(self.head_parameters(), self.replicas, tag="fc_grads")

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


def _copy_sharing(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) the modules named in ``names``."""
    memo = {id(model.get_submodule(n)): model.get_submodule(n) for n in names}
    return copy.deepcopy(model, memo)


class _HeadState:
    """A copy of the head shards and their optimizer state, to put back."""

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [(p, p.detach().clone()) for p in params]
        self.state = {p: copy.deepcopy(optimizer.state[p]) for p, _ in self.params if p in optimizer.state}

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in self.params:
                p.copy_(saved)
                if p in self.state:
                    self.optimizer.state[p] = self.state[p]
                else:
                    self.optimizer.state.pop(p, None)


def _loss_dtype(t: torch.Tensor) -> torch.Tensor:
    """Logits as the loss takes them: bf16/fp16 ones in fp32, fp32 and fp64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


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
