"""The torchvision zoo against one device: shared by ``tests/test_zoo.py`` and ``bench/zoo.py``.

The single-device reference is a plain training loop written here from torch alone (torchvision's
model, SGD with momentum, cross-entropy on the whole batch); nothing of hybridpar takes part in it.
The hybrid side wraps a copy of the same model with ``hybridize`` on K emulated workers, each
feeding its own slice of the same batches, and re-assembles the head's shards to compare.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hybridpar import hybridize
from hybridpar.comm import run_emulated
from hybridpar.parallel import assemble

# (model, keyword arguments, input size). 64 px: at 32 px the last stage of most of these is 1×1,
# its BatchNorm sees 6 values, and even float64 rounding is amplified to ~1e-6.
ZOO: dict[str, tuple[dict, int]] = {
    "alexnet": ({}, 64),
    "vgg11": ({}, 64),
    "vgg11_bn": ({}, 64),
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "wide_resnet50_2": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "regnet_y_400mf": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "mobilenet_v3_large": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "efficientnet_v2_s": ({}, 64),
    "densenet121": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "mnasnet0_5": ({}, 64),
    "convnext_tiny": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 75),
    "swin_t": ({}, 64),
    "squeezenet1_0": ({}, 64),
    "squeezenet1_1": ({}, 64),
}
REFUSED = {"squeezenet1_0", "squeezenet1_1"}  # a 1×1-convolution classifier: no Linear head
NUM_CLASSES = 10
LR, MOMENTUM = 0.05, 0.9


@dataclass(frozen=True)
class Run:
    name: str
    workers: int = 2
    local_batch: int = 3
    steps: int = 2
    dtype: torch.dtype = torch.float64
    seed: int = 0
    reverse: bool = False  # the batch in reverse order: the same arithmetic, rounded in another order

    @property
    def kwargs(self) -> dict:
        return ZOO[self.name][0]

    @property
    def size(self) -> int:
        return ZOO[self.name][1]

    def model(self) -> nn.Module:
        """torchvision's model, seeded, with dropout and stochastic depth off (random masks cannot match).
        A fresh copy each call, of the last model built when it is asked for again (the same bits: a
        test builds one for the hybrid and one for the single device, and a large head takes seconds
        to initialise)."""
        return copy.deepcopy(_built(self.name, self.dtype, self.seed))

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed + 1)
        n = self.workers * self.local_batch
        out = [
            (
                torch.randn(n, 3, self.size, self.size, generator=g).to(self.dtype),
                torch.randint(0, NUM_CLASSES, (n,), generator=g),
            )
            for _ in range(self.steps)
        ]
        return [(x.flip(0), y.flip(0)) for x, y in out] if self.reverse else out


@functools.lru_cache(maxsize=1)  # one model held, not the zoo's gigabytes
def _built(name: str, dtype: torch.dtype, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, num_classes=NUM_CLASSES, **ZOO[name][0])
    for m in model.modules():
        if isinstance(m, nn.Dropout | torchvision.ops.StochasticDepth):
            m.p = 0.0
    return model.to(dtype)


def _snapshot(model: nn.Module, grads: list[dict]) -> dict:
    """The trained ``model``'s tensors, not copied: the model is not used again once trained (its
    caller drops it), and copies of VGG's float64 head would take gigabytes more."""
    return {
        "grads": grads,
        "params": {n: p.detach() for n, p in model.named_parameters()},
        "buffers": {n: b.detach() for n, b in model.named_buffers() if b.is_floating_point()},
    }


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """This step's gradients, not copied: ``zero_grad(set_to_none=True)`` drops them before the next
    backward makes new ones, and neither SGD's step nor anything else writes into them."""
    return {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


def reference(run: Run, model: nn.Module) -> dict:
    """One device: the plain loop on the whole batch (torch only)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    grads, logits0 = [], None
    for x, y in run.batches():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        logits0 = (logits.flip(0) if run.reverse else logits).detach() if logits0 is None else logits0
        grads.append(_grads(model))
        opt.step()
    return _snapshot(model, grads) | {"logits": logits0}


@functools.lru_cache(maxsize=2)
def one_device_params(run: Run) -> dict[str, torch.Tensor]:
    """``reference(run, run.model())["params"]``: the single-device loop's final weights, run once per
    ``run`` (tests of several options compare against the same loop). Read only."""
    return reference(run, run.model())["params"]


def _worker(comm, run: Run, model: nn.Module, options: dict) -> dict:
    # Every worker wraps the same model: hybridize copies what it keeps and never changes the model.
    hybrid = hybridize(model, comm, **options)
    opt = torch.optim.SGD(hybrid.parameters(), lr=LR, momentum=MOMENTUM)
    lo, hi = comm.rank * run.local_batch, (comm.rank + 1) * run.local_batch
    grads, logits0 = [], None
    for x, y in run.batches():
        opt.zero_grad(set_to_none=True)
        _, logits = hybrid.train_step(x[lo:hi], y[lo:hi])
        logits0 = logits if logits0 is None else logits0
        grads.append(_grads(hybrid))
        opt.step()
    out = _snapshot(hybrid, grads) | {"logits": logits0, "specs": hybrid.shard_specs()}
    # Replicated tensors (trunk, BatchNorm statistics): worker 0's are compared; the others send a
    # digest of theirs, so K copies of a large trunk are not held at once.
    out["digests"] = {
        f"{key}[{n}]": _digest(t) for key in ("params", "buffers") for n, t in out[key].items() if n not in out["specs"]
    }
    if comm.rank > 0:
        for part in (out["params"], out["buffers"], *out["grads"]):
            for n in [n for n in part if n not in out["specs"]]:
                del part[n]
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def hybrid(run: Run, model: nn.Module, launch=run_emulated, **options) -> dict:
    """K workers (emulated, or ``launch(K, fn, *args)`` -> results in rank order) running
    ``hybridize(model, comm, **options)``; their shards re-assembled into single-device tensors."""
    workers = launch(run.workers, _worker, run, model, options)
    specs = workers[0]["specs"]
    # The trunk and the BatchNorm statistics are replicas: every worker must hold the same bits.
    out = {
        "logits": torch.cat([w["logits"] for w in workers]),
        "replicas_differ": sorted(
            n for n, d in workers[0]["digests"].items() if any(w["digests"][n] != d for w in workers[1:])
        ),
        "grads": [],
    }
    # Each part assembled, then the workers' pieces of it let go: whole and shards of every part at
    # once would hold VGG's float64 head several times over (memory beyond ~10 GB is slow to get here).
    for key in ("params", "buffers"):
        out[key] = assemble([w.pop(key) for w in workers], specs)
    for _ in range(run.steps):
        out["grads"].append(assemble([w["grads"].pop(0) for w in workers], specs))
    return out


def compare(got: dict, want: dict) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """Every pair of tensors to compare, named, with the scale of its kind: the largest entry over
    all logits, all parameters, all buffers, or all of one step's gradients. Gradients here span
    1e-12 to 1e2 from tensor to tensor, so an error is judged against the scale of its kind."""
    groups = [("logits", {"": got["logits"]}, {"": want["logits"]})]
    for key in ("params", "buffers"):
        assert set(got[key]) == set(want[key]), f"{key}: names differ: {sorted(set(got[key]) ^ set(want[key]))}"
        groups.append((key, got[key], want[key]))
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        assert set(g) == set(w), f"step {step} gradients: names differ: {sorted(set(g) ^ set(w))}"
        groups.append((f"grad step {step}", g, w))
    pairs = []
    for kind, g, w in groups:
        scale = max((_abs_max(t) for t in w.values()), default=0.0)
        pairs += [(f"{kind}[{n}]" if n else kind, g[n], t, scale) for n, t in w.items()]
    return pairs


# Elementwise checks over a 100M-entry head allocate a tensor of that size per operation, and fresh
# allocations that large cost more than the arithmetic here (seconds each): they run in pieces.
_PIECE = 1 << 20


def _pieces(t: torch.Tensor):
    flat = t.reshape(-1)
    return [flat[i : i + _PIECE] for i in range(0, flat.numel(), _PIECE)] if flat.numel() > _PIECE else [t]


def _abs_max(t: torch.Tensor) -> float:
    """``t.double().abs().max().item()``, piece by piece for a large tensor."""
    return max(p.double().abs().max().item() for p in _pieces(t))


def max_error(pairs) -> tuple[float, str]:
    """The largest difference relative to the scale of its kind, and where."""
    return max(((a.double() - b.double()).abs().max().item() / max(scale, 1e-30), n) for n, a, b, scale in pairs)


def assert_equal(run: Run, got: dict, want: dict, *, rtol: float, atol: float = 0.0, atol_scaled: float = 0.0) -> None:
    """Every tensor within rtol and ``atol + atol_scaled · (scale of its kind)``; replicas bit-identical."""
    assert got["replicas_differ"] == [], f"replicated tensors differ between workers: {got['replicas_differ'][:5]}"
    for name, a, b, scale in compare(got, want):
        # assert_close's own test (isclose) costs seconds on VGG's 100M-entry head; the same bound in two
        # kernels passes the common case, and anything else (a miss, NaN, inf, dtype, shape) goes to
        # assert_close for its verdict and message.
        if (
            a.dtype == b.dtype
            and a.shape == b.shape
            and all(
                bool(((x - y).abs() <= atol + atol_scaled * scale + rtol * y.abs()).all())
                for x, y in zip(_pieces(a), _pieces(b), strict=True)
            )
        ):
            continue
        torch.testing.assert_close(
            a,
            b,
            rtol=rtol,
            atol=atol + atol_scaled * scale,
            msg=lambda m, n=name: f"{run.name} K={run.workers} {n}: {m}",
        )


def trained_state(hybrid: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """A worker's parameters and momentum buffers after training (copies), by parameter name."""
    names = {p: n for n, p in hybrid.named_parameters()}
    momenta = {names[p]: s["momentum_buffer"].clone() for p, s in opt.state.items() if "momentum_buffer" in s}
    return {"params": {n: p.detach().clone() for n, p in hybrid.named_parameters()}, "momenta": momenta}


def assert_bit_identical(got: list[dict], want: list[dict]) -> None:
    """Every worker's :func:`trained_state` holds the same bits in both runs."""
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        for key in ("params", "momenta"):
            assert g[key].keys() == w[key].keys()
            differ = [n for n in w[key] if not torch.equal(g[key][n], w[key][n])]
            assert not differ, f"worker {k} {key} differ: {differ[:5]}"
