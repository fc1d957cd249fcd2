"""The trunk's gradient sum pipelined across the step boundary (``parallel.trunk_sync=pipelined``).

:class:`~hybridpar.parallel.data_parallel.TrunkSync` sums the trunk's gradients in buckets during
the backward and waits for all of them before the optimizer runs: the next step's forward starts
only once the last byte is in. On a slow link that wait is most of the step. Here:

* the trunk's gradients, flattened one after another in the order in which the trunk's graph first
  uses their parameters, are cut into small **partitions** (a parameter may span several);
* during the backward, the first ``cap`` partitions of the backward order are summed as they
  become ready (deepest first, as the backward produces them); ``cap`` is what the link finished
  during an earlier backward plus ``window`` (:func:`propose_cap`), so the link is kept busy
  through the backward's long stages but never queued far ahead of the next forward's needs;
* at the end of the backward the rest go out in **forward order** — the partition the next
  forward needs first goes first, although the backward made it last (priority-based parameter
  propagation); the deepest layer's last partitions are held back to go last where that costs the
  link nothing (:func:`schedule`), so the step's last sums gate only the deepest layer's forward
  and travel while the layer before it runs;
* the optimizer step of the trunk is deferred: when the trainer's ``optimizer.step()`` updates the
  head, the step's hyperparameters are kept, and each parameter's update is applied with them
  right before the next forward first uses its module — so the forward of layer l waits for
  the partitions holding layer l only.

Exact, not stale: every parameter gets the same update from the same sums as in the serialised
path, with the step's own hyperparameters, before anything reads it; ``flush()`` applies what is
left (before evaluation, a checkpoint, a ``state_dict``). Collectives must be issued in the same
order on every worker, so ``cap`` may not follow one worker's timing: at the end of each backward
every worker proposes one (:func:`propose_cap`) and the workers take the largest — a tiny
all-gather issued there and waited for at the end of the next backward, long done by then, for
the step after it. A blocking agreement at that point would wait behind the sums in flight on
the same wire (tens of ms at 100 Mbit/s) while the processor has work. The sums run on a communicator of their own (its own
process group: its traffic never waits behind the head's moves, nor they behind it).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hybridpar.comm.base import Agreement, Communicator, Handle
from hybridpar.errors import ConfigError, ShardingError

# Partitions of 2^17 elements (512 KB of fp32): a partition in flight is what the next forward's
# first layer may have to wait behind, so they are small; large enough that the per-message
# latency stays small beside the bytes. A parameter may span partitions.
PARTITION_ELEMENTS = 1 << 17
# Partitions in flight during the backward: enough to keep the link busy between hooks.
WINDOW = 2
# The deepest layer's partitions held back to end the step's sums (:func:`schedule`): two (1 MB,
# 84 ms at 100 Mbit/s) cover the forward of AlexNet's conv4 at b = 16 (31 ms here), which
# otherwise ran on an idle link after the last sum (measured: 48 ms of idle link with one held).
HOLD = 2


@dataclass(frozen=True)
class _Piece:
    param: int  # index into PipelinedTrunkSync.params
    lo: int  # the piece is param.view(-1)[lo:hi]
    hi: int


def partitions(numels: Sequence[int], cap: int = PARTITION_ELEMENTS) -> list[list[_Piece]]:
    """Cut the parameters (in forward order, flattened one after another) into consecutive
    partitions of ``cap`` elements (the last one shorter): each a list of parameter pieces."""
    out: list[list[_Piece]] = [[]]
    room = cap
    for i, n in enumerate(numels):
        lo = 0
        while lo < n:
            if room == 0:
                out.append([])
                room = cap
            hi = min(n, lo + room)
            out[-1].append(_Piece(i, lo, hi))
            room -= hi - lo
            lo = hi
    return [part for part in out if part]


def schedule(parts: Sequence[Sequence[_Piece]], hold: int | None = None) -> tuple[list[int], list[int]]:
    """The partitions' issue order: ``(backward, held)``. During the backward, partitions go in
    ``backward`` order (deepest first) as they are ready; at its end the rest go in forward order
    and ``held`` last, in forward order. ``held`` is the deepest ``hold`` partitions of the deepest
    parameter that spans several, its first partition always left to the backward: they are ready
    at the same moment as the ones issued then (one parameter's gradient), so sending those first
    costs the link nothing, and the step's last sums are then the ones the next forward needs last
    (its deepest layer): while they travel the layer before it runs, where the link would
    otherwise stand idle from the last byte of the step's sums to the features' first move.
    ``hold``: :data:`HOLD` (read at the call: a benchmark may set it to compare)."""
    n = len(parts)
    span = [j for j in range(n) if any(piece.param == parts[-1][0].param for piece in parts[j])]
    held = span[max(1, len(span) - (HOLD if hold is None else hold)) :]
    return [j for j in range(n - 1, -1, -1) if j not in held], held


def propose_cap(done: int, cap: int, window: int, n: int) -> int:
    """A worker's proposal of how many partitions a later backward issues as they are ready, from
    this backward: ``done`` of the ``cap`` it issued had finished when it ended. Those plus
    ``window`` (what is left in flight at the end, ahead of the forward-order rest); if all had
    finished the link stood idle — twice as many (at least the window more). At most ``n``, and
    none without a window (the serialised path issues everything at the end)."""
    if not window:
        return 0
    if done >= cap:
        return min(n, max(2 * cap, done + window))
    return min(n, done + window)


class PipelinedTrunkSync:
    """One worker's pipelined trunk sync. ``named`` lists the trunk's parameters with their owner
    (the module or attribute name the trunk's graph uses), in forward order; ``comm`` is the
    trunk's own communicator, ``control`` the world's (for the end-of-backward agreement)."""

    def __init__(
        self,
        named: Sequence[tuple[str, torch.nn.Parameter]],
        comm: Communicator,
        control: Communicator,
        *,
        cap: int = PARTITION_ELEMENTS,
        window: int = WINDOW,
        tag: str = "trunk_grads",
        wire: torch.dtype | None = None,
    ):
        self.owners = [o for o, _ in named]
        self.params = [p for _, p in named]
        self.comm, self.control, self.tag = comm, control, tag
        self.window = window
        self.wire = wire  # the dtype the sums travel and are added in (None: the gradients')
        self.armed = True  # False: a backward that only accumulates (a trunk chunk before the last)
        self._proposal: Agreement | None = None  # the workers' proposals of a later step's cap
        self.parts = partitions([p.numel() for p in self.params], cap)
        self._backward, self._held = schedule(self.parts)
        # Partitions of the backward order issued during the backward: every one at first (as the
        # bucketed sync does), then what the workers propose (:func:`propose_cap`); none with no window.
        self.cap = len(self._backward) if window else 0
        self._parts_of: list[list[int]] = [[] for _ in self.params]  # the partitions each parameter spans
        for j, part in enumerate(self.parts):
            for piece in part:
                self._parts_of[piece.param].append(j)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._handed = [False] * len(self.params)  # gradients handed over by accumulate() this backward
        self._by_owner: dict[str, list[int]] = {}  # each owner's parameters
        for i, owner in enumerate(self.owners):
            self._by_owner.setdefault(owner, []).append(i)
        n = len(self.parts)
        self._ready = [0] * n  # pieces whose parameter's gradient is in, per partition
        self._copied = [0] * len(self.params)  # partitions that took their piece, per parameter
        self._handles: list[Handle | None] = [None] * n
        self._sums: list[torch.Tensor | None] = [None] * n
        self._applied = [True] * len(self.params)  # this step's update is in the parameter
        self._left = [0] * n  # pieces of each partition's sum still to be applied
        self._unapplied = 0  # parameters whose update is still pending
        self._next = 0  # how many partitions of the backward order are issued this step
        self._pending = False  # this step's sums issued, updates not yet applied
        self._hparams: list[dict] | None = None  # the committing step's hyperparameters
        self._optimizer: torch.optim.Optimizer | None = None
        self._hook = None
        self._applying = False
        self._convs_run: set[int] = set()  # the weight-first convs this forward has run
        me = weakref.ref(self)  # hooks hold this object weakly (see TrunkSync)
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(functools.partial(_on_grad_ready, me, i))

    # ---- binding to the optimizer --------------------------------------------------------

    def bind(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer whose ``step()`` commits a step (its post-step hook keeps the step's
        hyperparameters) and whose update rule the deferred updates run."""
        if optimizer is None:
            raise ConfigError("parallel.trunk_sync=pipelined applies the trunk's update itself: pass the optimizer")
        if optimizer is self._optimizer:
            return
        if self._hook is not None:
            self._hook.remove()
        self._optimizer = optimizer
        me = weakref.ref(self)
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: _on_step(me, opt))

    def _commit(self, optimizer: torch.optim.Optimizer) -> None:
        if self._applying or not self._pending or self._hparams is not None:
            return  # our own partial steps, a step of the head alone (fc_batch=chunk), or done
        self._hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    # ---- backward: sums issued as gradients become ready -----------------------------------

    def accumulate(self, p: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """``grad`` added into ``p.grad`` as autograd's accumulation adds it, and ``p`` counted
        ready: for a layer whose backward hands its weight's gradient over itself, before it makes
        its input's (:func:`weight_grads_first`)."""
        i = self._index[id(p)]
        with torch.no_grad():
            p.grad = grad.to(p.dtype) if p.grad is None else p.grad + grad
        # Its AccumulateGrad node still runs after the layer's backward (with no gradient) and
        # fires the post-accumulate hook: that call is not counted again.
        self._handed[i] = True
        self._ready_one(i)

    def _ready_one(self, i: int) -> None:
        if not self.armed:
            return
        for j in self._parts_of[i]:
            self._ready[j] += 1
        self._issue_ready()

    def conv_runs(self, conv: nn.Module, name: str) -> None:
        """A weight-first conv runs in this forward. Twice would be wrong, silently: its first
        backward would count the weight ready and its sums could leave without the other use's
        gradient; so a graph that calls one conv twice (tied weights) is refused."""
        if id(conv) in self._convs_run:
            raise ShardingError(
                f"{name} runs twice in one forward of the trunk: its weight's gradient is complete only after both "
                "backwards, so it cannot make it first; build the model with weight_first=False"
            )
        self._convs_run.add(id(conv))

    def _issue_ready(self) -> None:
        while self._next < self.cap:
            j = self._backward[self._next]  # deepest first
            if self._ready[j] < len(self.parts[j]):
                return
            self._issue(j)
            self._next += 1

    def _issue(self, j: int) -> None:
        pieces = []
        for piece in self.parts[j]:
            p = self.params[piece.param]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            pieces.append(g.reshape(-1)[piece.lo : piece.hi])
            self._copied[piece.param] += 1
            if self._copied[piece.param] == len(self._parts_of[piece.param]):
                p.grad = None  # copied out: the optimizer's own step() leaves the trunk alone
        flat = torch.cat(pieces)
        self._handles[j] = self.comm.all_reduce_async(flat if self.wire is None else flat.to(self.wire), self.tag)

    def finish(self) -> None:
        """End of the backward: the first ``cap`` of the backward order not yet issued, then the
        rest in forward order; a ``cap`` proposed, and the one proposed a step ago taken (waited
        for, but long in). No sum is waited for here."""
        if self.comm.world_size == 1:
            return
        n = len(self.parts)
        # What the link finished while this backward ran, plus the window: a proposed cap.
        done = sum(1 for k in range(self._next) if self._handles[self._backward[k]].ready())
        for k in range(self._next, self.cap):
            self._issue(self._backward[k])
        for j in sorted(self._backward[self.cap :]):  # the rest, first layers first
            self._issue(j)
        for j in self._held:  # the deepest layer's last: the next forward needs them last
            self._issue(j)
        if self._proposal is not None:  # the proposals of a step ago (in long since): the next step's cap
            self.cap = min(self._proposal.wait(), len(self._backward))
        mine = propose_cap(done, self.cap, self.window, len(self._backward))
        self._proposal = self.control.max_int_async(mine, "trunk_pipeline")
        self._next, self._pending, self._hparams = 0, True, None
        self._handed = [False] * len(self.params)
        self._ready = [0] * n
        self._copied = [0] * len(self.params)
        self._applied = [False] * len(self.params)
        self._left = [len(part) for part in self.parts]
        self._unapplied = len(self.params)

    # ---- the next forward: each parameter's update right before its first use ----------------

    def before_forward(self) -> None:
        """A new forward: a step whose update never came (the trainer skipped it: a non-finite
        loss) is dropped, its sums collected in order so the collectives stay matched."""
        self._convs_run.clear()
        if self._pending and self._hparams is None:
            for j, h in enumerate(self._handles):
                if h is not None:
                    h.wait()
                self._handles[j] = self._sums[j] = None
            self._applied = [True] * len(self.params)
            self._pending, self._unapplied = False, 0

    def before(self, owner: str) -> None:
        """The trunk's graph is about to use ``owner`` (a module or attribute name)."""
        if self._pending and self._hparams is not None:
            self._apply([i for i in self._by_owner.get(owner, ()) if not self._applied[i]])

    def flush(self) -> None:
        """Apply every update of the committed step that is still pending."""
        if self._pending and self._hparams is not None:
            self._apply([i for i in range(len(self.params)) if not self._applied[i]])

    def _apply(self, todo: list[int]) -> None:
        if not todo:
            return
        for j in sorted({j for i in todo for j in self._parts_of[i]}):
            if self._sums[j] is None:
                self._sums[j] = self._handles[j].wait().to(self.params[self.parts[j][0].param].dtype)
                self._handles[j] = None
        for i in todo:
            pieces = []
            for j in self._parts_of[i]:
                at = 0
                for piece in self.parts[j]:
                    if piece.param == i:
                        pieces.append(self._sums[j][at : at + piece.hi - piece.lo])
                    at += piece.hi - piece.lo
            self.params[i].grad = torch.cat(pieces).view_as(self.params[i])
            self._applied[i] = True
        self._step([self.params[i] for i in todo])
        for i in todo:  # a sum is dropped once every piece of it is in its parameter
            for j in self._parts_of[i]:
                self._left[j] -= 1
                if self._left[j] == 0:
                    self._sums[j] = None
        self._unapplied -= len(todo)
        if self._unapplied == 0:
            self._pending, self._hparams = False, None

    def _step(self, chosen: list[torch.nn.Parameter]) -> None:
        """The optimizer's own update of ``chosen`` with the committed step's hyperparameters:
        the same per-parameter arithmetic as its step over all parameters at once."""
        opt, keep = self._optimizer, set(chosen)
        groups = opt.param_groups
        subset = [
            dict(hp, params=[p for p in g["params"] if p in keep]) for hp, g in zip(self._hparams, groups, strict=True)
        ]
        opt.param_groups = [g for g in subset if g["params"]]
        self._applying = True
        try:
            opt.step()
        finally:
            opt.param_groups, self._applying = groups, False
            for p in chosen:
                p.grad = None


def weight_grads_first(conv: nn.Module, sync: PipelinedTrunkSync, name: str = "a conv") -> bool:
    """Make the backward of ``conv`` (the trunk's deepest layer with parameters) produce its weight's
    and bias's gradients first and hand them to ``sync`` at once, its input's gradient after: the
    first partitions of the step's sums leave while the processor makes the input gradient, instead
    of after it. Autograd makes all three in one node and accumulates the weight's after it, while
    between the head's last move and the first partition the link has nothing to carry — the
    weight-gradient/input-gradient (W/B) split of zero-bubble pipeline schedules, here ordered W
    first. Each gradient is the product autograd makes (``aten.convolution_backward``, one output
    at a time), so the sums and weights are bit-identical. Only a plain ``nn.Conv2d`` with zero
    padding given as numbers (False otherwise, the module left as it is); a forward without grad,
    or under ``torch.compile``'s tracing, runs the module's own forward."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    conv.forward = functools.partial(_weight_first_forward, conv, name, weakref.ref(sync), conv.forward)
    return True


def _weight_first_forward(conv: nn.Conv2d, name: str, sync: weakref.ref, plain, x: torch.Tensor) -> torch.Tensor:
    target = sync()
    if target is None or not torch.is_grad_enabled() or not conv.weight.requires_grad or torch.compiler.is_compiling():
        return plain(x)
    target.conv_runs(conv, name)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is not None and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = None  # autocast leaves float64 alone
    with torch.autocast(device, enabled=False):  # its casts made here, as autocast would make them
        return _WeightFirstConv.apply(x, conv.weight, conv.bias, conv, target, dtype)


class _WeightFirstConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv, sync, dtype):
        xc = x if dtype is None else x.to(dtype)
        w = weight if dtype is None else weight.to(dtype)
        b = bias if bias is None or dtype is None else bias.to(dtype)
        ctx.save_for_backward(xc, w)
        ctx.conv, ctx.sync, ctx.x_dtype = conv, sync, x.dtype
        return conv._conv_forward(xc, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        conv, sync = ctx.conv, ctx.sync
        geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), False, [0] * len(conv.stride))
        has_bias = conv.bias is not None
        bias_sizes = [w.shape[0]] if has_bias else None
        _, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, bias_sizes, *geometry, conv.groups, [False, True, has_bias]
        )
        sync.accumulate(conv.weight, gw)  # its sums may leave now
        if has_bias:
            sync.accumulate(conv.bias, gb)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, w, None, *geometry, conv.groups, [True, False, False])[0]
            gx = gx.to(ctx.x_dtype)
        return gx, None, None, None, None, None


def _on_grad_ready(sync: weakref.ref, i: int, _p: torch.nn.Parameter) -> None:
    owner = sync()
    if owner is None:
        return
    if owner._handed[i]:  # counted when the layer handed it over (accumulate)
        owner._handed[i] = False
        return
    owner._ready_one(i)


def _on_step(sync: weakref.ref, optimizer: torch.optim.Optimizer) -> None:
    owner = sync()
    if owner is not None:
        owner._commit(optimizer)
