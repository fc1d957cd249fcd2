"""Model-parallel pieces of the head: column- and row-parallel Linear, per-worker dropout.

Both Linear kinds are cut from a full-size ``nn.Linear`` that was built (and seeded) as on a
single device; each worker keeps its slice. So the step-0 model is the same for every K, and
re-assembling the shards gives back the original layer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.comm.base import even_split


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is cut: along ``dim``, worker ``j`` holding ``sizes[j]`` entries."""

    dim: int
    sizes: tuple[int, ...]

    def slice_of(self, rank: int) -> slice:
        lo = sum(self.sizes[:rank])
        return slice(lo, lo + self.sizes[rank])

    def take(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        return full.narrow(self.dim, sum(self.sizes[:rank]), self.sizes[rank])


class WeightGrads:
    """The head's deferred weight gradients (``parallel.defer_wgrad``).

    A Linear's backward makes two products: the input gradient, which the trunk's backward
    waits for, and the weight gradient, which only this worker's optimizer step reads (a head
    shard is never summed with another in the 1-D layout). On the critical path of a step on a
    slow link — trunk sums in → forward → head → trunk backward → next sums out — the weight
    gradient is pure delay: on a CPU at b = 16 it is most of the head's backward (it writes a
    weight-sized tensor for few rows). Deferred, the head's backward makes only the input
    gradients and keeps (input, output gradient) of each product; :meth:`run` makes the weight
    gradients once the trunk's sums are on their way, while the link is busy.

    The arithmetic is autograd's: the same product in the same layout, accumulated into
    ``.grad`` in the order autograd would. Several products of one weight in a step (the rounds
    of (b)/(c), micro-batches) are one product over their rows stacked — the single device's
    product over the whole batch, and one pass over the weight-sized output instead of one per round.
    """

    def __init__(self):
        self._pending: dict[nn.Parameter, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def add(self, weight: nn.Parameter, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self._pending[weight].append((x, grad_out))

    def __len__(self) -> int:
        return len(self._pending)

    def run(self) -> None:
        """Make every pending weight gradient and add it into its parameter's ``.grad``."""
        pending, self._pending = self._pending, defaultdict(list)
        with torch.no_grad():
            for weight, parts in pending.items():
                x = parts[0][0] if len(parts) == 1 else torch.cat([xi for xi, _ in parts])
                g = parts[0][1] if len(parts) == 1 else torch.cat([gi for _, gi in parts])
                # Autograd's weight gradient of x @ W.t() (W row-major): (g.t() @ x), made in W's layout.
                gw = g.t().mm(x).to(weight.dtype)
                if weight.grad is None:
                    weight.grad = gw
                else:
                    weight.grad += gw

    def clear(self) -> None:
        self._pending.clear()


class _DeferredLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward returns the input's (and bias's) gradient and
    leaves the weight's to ``queue`` (:class:`WeightGrads`). ``dtype``: the autocast dtype the
    product runs in (the casts autocast would make, made here)."""

    @staticmethod
    def forward(ctx, x, weight, bias, queue, dtype):
        w = weight if dtype is None else weight.to(dtype)
        xc = x if dtype is None else x.to(dtype)
        b = bias if bias is None or dtype is None else bias.to(dtype)
        ctx.save_for_backward(xc, w)
        ctx.queue, ctx.weight, ctx.x_dtype = queue, weight, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(xc, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        # mm's input gradient as autograd makes it (FunctionsManual mm_mat1_backward): in the
        # input's layout when the input is column-major.
        if x.dim() == 2 and x.stride(0) == 1 and x.stride(1) == x.shape[0]:
            gx = w.mm(g.t()).t()
        else:
            gx = g.mm(w)
        ctx.queue.add(ctx.weight, x, g)
        gb = None if ctx.bias_dtype is None else g.sum(0).to(ctx.bias_dtype)
        return gx.to(ctx.x_dtype), None, gb, None, None


def linear(x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None, queue: WeightGrads | None):
    """``F.linear``, with the weight's gradient deferred to ``queue`` when one is given and a
    backward will run (2-D inputs: the head's)."""
    if queue is None or not torch.is_grad_enabled() or not weight.requires_grad or x.dim() != 2:
        return F.linear(x, weight, bias)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is not None and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = None  # autocast leaves float64 alone
    with torch.autocast(device, enabled=False):
        return _DeferredLinear.apply(x, weight, bias, queue, dtype)


class ColumnParallelLinear(nn.Module):
    """Holds a slice of the output features: input (all examples, all features) ->
    output (all examples, this worker's output slice). No communication inside."""

    def __init__(self, full: nn.Linear, rank: int, world_size: int):
        super().__init__()
        self.in_features, self.out_features = full.in_features, full.out_features
        self.out_sizes = tuple(even_split(full.out_features, world_size))
        self.specs = {"weight": ShardSpec(0, self.out_sizes)}
        self.weight = nn.Parameter(self.specs["weight"].take(full.weight.detach(), rank).clone())
        if full.bias is not None:
            self.specs["bias"] = ShardSpec(0, self.out_sizes)
            self.bias = nn.Parameter(self.specs["bias"].take(full.bias.detach(), rank).clone())
        else:
            self.register_parameter("bias", None)
        self.wgrad: WeightGrads | None = None  # set by the model: defer the weight's gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.wgrad)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, out_sizes={list(self.out_sizes)}"


class RowParallelLinear(nn.Module):
    """Holds a slice of the input features: input (all examples, this worker's input slice) ->
    partial sums (all examples, all output features), to be reduced by the caller.

    The bias is cut along the *output* features and each worker adds only its slice into its
    partial sum, so the reduction adds the bias exactly once and every bias entry's gradient is
    computed by exactly one worker, with nothing to synchronise.
    """

    def __init__(self, full: nn.Linear, rank: int, world_size: int):
        super().__init__()
        self.in_features, self.out_features = full.in_features, full.out_features
        self.in_sizes = tuple(even_split(full.in_features, world_size))
        self.out_sizes = tuple(even_split(full.out_features, world_size))
        self.specs = {"weight": ShardSpec(1, self.in_sizes)}
        self.weight = nn.Parameter(self.specs["weight"].take(full.weight.detach(), rank).clone())
        if full.bias is not None:
            self.specs["bias"] = ShardSpec(0, self.out_sizes)
            self.bias = nn.Parameter(self.specs["bias"].take(full.bias.detach(), rank).clone())
            lo = sum(self.out_sizes[:rank])
            self._bias_pad = (lo, full.out_features - lo - self.out_sizes[rank])
        else:
            self.register_parameter("bias", None)
        self.wgrad: WeightGrads | None = None  # set by the model: defer the weight's gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, None, self.wgrad)
        if self.bias is not None:
            y = y + F.pad(self.bias, self._bias_pad)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, in_sizes={list(self.in_sizes)}"


class WorkerDropout(nn.Module):
    """Dropout drawing from this worker's own generator.

    Emulated workers share one process and so torch's global RNG; a generator per worker keeps
    each worker's masks its own and reproducible. The hybrid only applies dropout where a
    worker holds a disjoint part of the activations (its own examples, or its feature slice),
    so independent masks are exactly a dropout of the whole tensor.
    """

    def __init__(self, p: float, seed: int):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.seed = p, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, generator=self.generator(x.device), device=x.device) >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
