"""Model-parallel pieces of the head: column- and row-parallel Linear, per-worker dropout.

Both Linear kinds are cut from a full-size ``nn.Linear`` that was built (and seeded) as on a
single device; each worker keeps its slice. So the step-0 model is the same for every K, and
re-assembling the shards gives back the original layer.
"""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
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
