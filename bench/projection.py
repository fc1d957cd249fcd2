"""Projected speedup vs K from the cost model: the paper's setting and today's hardware.

    python bench/projection.py

Uses the per-layer profiles in docs/profiles/ (measured with ``python -m hybridpar.costmodel
profile``; the H200 ones by ``bench/gpu.sh``). Writes the tables between the ``projection``
markers of docs/benchmarks.md and the plot docs/speedup_vs_k.png. Speedup = throughput of K
workers with b images each over one device's throughput at b (weak scaling, as in the paper).

The paper's setting: 8 GPUs, 128 images each. The cost model needs a per-device speed and a link;
the paper gives neither in numbers we can check here, so both are stated assumptions. A
K20-class device is a *given* profile: 0.40 s per 128-image step (≈ 320 images/s, about 100 h for
90 ImageNet epochs), 95% of it in the conv layers (per-layer shares as measured on the H200) and 5%
in the FC layers (the paper's split), FC products at one rate whatever their size (a 2014 GPU is
saturated by far smaller products than an H200), and an SGD step at ~200 GB/s of memory traffic.
The per-GPU link is swept over PCIe-class bandwidths.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from docs_section import DOCS, write_section

from hybridpar import costmodel as cm

KS = (1, 2, 4, 8, 16, 32, 64)
SCHEMES = cm.SCHEMES
K20_STEP_S = 0.40  # assumed one-GPU step at b = 128 (see the module docstring)
PAPER_SPEEDUP = 6.2


def load(name: str) -> cm.Profile:
    return cm.Profile.from_json((DOCS / "profiles" / name).read_text())


def k20(ref: cm.Profile, b: int = 128) -> cm.Profile:
    """The K20-class profile described in the module docstring, built on ``ref``'s layer shares."""
    trunk_s = sum(s.fwd_s + s.bwd_s for s in ref.trunk) * b
    f = 0.95 * K20_STEP_S / trunk_s
    fc_flops = 3 * 2.0 * b * sum(i * o for i, o in ref.head)  # forward + backward of the full head
    rate = fc_flops / (0.05 * K20_STEP_S)
    return replace(
        ref,
        device="K20-class (given)",
        trunk=tuple(replace(s, fwd_s=s.fwd_s * f, bwd_s=s.bwd_s * f) for s in ref.trunk),
        fc_rates=((1, rate, rate),),
        opt_s_per_param=3 * 2 * 4 / 200e9,
        notes="0.40 s/step, 95% conv, 5% FC",
    )


def paper_bandwidth(dev: cm.Profile) -> float:
    """Per-GPU bytes/s at which the best hybrid scheme gives the paper's 6.2× at K = 8."""
    lo, hi = 0.05e9, 100e9
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        best = max(cm.speedup(dev, cm.Link(10e-6, mid), s, 8, 128) for s in "abc")
        lo, hi = (mid, hi) if best < PAPER_SPEEDUP else (lo, mid)
    return hi


def settings() -> list[tuple[str, cm.Profile, cm.Link, int]]:
    h200, h200_bf16 = load("h200_fp32_b128.json"), load("h200_bf16_b128.json")
    dev = k20(h200)
    bw = paper_bandwidth(dev)
    out = [
        (
            f"K20-class (0.40 s/step), {bw / 1e9:.2f} GB/s per GPU (gives the paper's 6.2x)",
            dev,
            cm.Link(10e-6, bw),
            128,
        ),
        ("K20-class (0.40 s/step), 6 GB/s per GPU (PCIe-class)", dev, cm.Link(10e-6, 6e9), 128),
        ("H200 bf16 (measured), 100 Gbit/s per GPU", h200_bf16, cm.Link(10e-6, cm.parse_rate("100gbit")), 128),
        ("H200 bf16 (measured), 400 Gbit/s per GPU", h200_bf16, cm.Link(10e-6, cm.parse_rate("400gbit")), 128),
    ]
    cpu = DOCS / "profiles" / "cpu_1thread_fp32_b256.json"
    if cpu.exists():
        out.append(
            (
                "this CPU, 1 thread (measured), 1 Gbit/s",
                cm.Profile.from_json(cpu.read_text()),
                cm.Link(100e-6, cm.parse_rate("1gbit")),
                128,
            )
        )
    return out


def tables() -> tuple[str, list]:
    lines, curves = [], []
    h200 = load("h200_fp32_b128.json")
    dev = k20(h200)
    lines.append(
        "The paper's setting — 8 workers, b = 128, K20-class device; speedup over one device by per-GPU link bandwidth:"
    )
    lines.append("")
    lines.append(
        "| link per GPU | DDP | hybrid (a) | hybrid (b) | hybrid (c) | bandwidth-bound fraction of (a)'s step |"
    )
    lines.append("|---|---|---|---|---|---|")
    for gbs in (1, 2, 4, 6, 8, 12):
        link = cm.Link(10e-6, gbs * 1e9)
        sp = [cm.speedup(dev, link, s, 8, 128) for s in SCHEMES]
        t = cm.step_time(dev, link, "a", 8, 128)
        lines.append(f"| {gbs} GB/s | " + " | ".join(f"{v:.2f}×" for v in sp) + f" | {t.exposed_s / t.step_s:.0%} |")
    hi = paper_bandwidth(dev)
    lines.append("")
    lines.append(
        f"The best hybrid scheme reaches the paper's {PAPER_SPEEDUP}× at {hi / 1e9:.2f} GB/s per GPU; DDP at that "
        f"bandwidth: {cm.speedup(dev, cm.Link(10e-6, hi), 'ddp', 8, 128):.2f}×."
    )
    lines.append("")
    lines.append("Speedup vs K (b = 128 per worker):")
    lines.append("")
    for name, prof, link, b in settings():
        one = cm.single_device_time(prof, b)
        lines.append(f"*{name}* — one device {one * 1e3:.1f} ms per {b}-image step")
        lines.append("")
        lines.append("| K | " + " | ".join("DDP" if s == "ddp" else f"hybrid ({s})" for s in SCHEMES) + " |")
        lines.append("|---|" + "---|" * len(SCHEMES))
        rows = {s: [cm.speedup(prof, link, s, k, b) for k in KS] for s in SCHEMES}
        for i, k in enumerate(KS):
            lines.append(f"| {k} | " + " | ".join(f"{rows[s][i]:.2f}" for s in SCHEMES) + " |")
        lines.append("")
        curves.append((name, rows))
    return "\n".join(lines), curves


def plot(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows_n = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.8 * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(curves) :]:
        ax.axis("off")
    colors = {"ddp": "tab:red", "a": "tab:blue", "b": "tab:green", "c": "tab:purple"}
    for ax, (name, rows) in zip(axes.flat, curves):
        ax.plot(KS, KS, "k:", lw=1, label="linear")
        for s in SCHEMES:
            ax.plot(KS, rows[s], "o-", ms=3, color=colors[s], label="DDP" if s == "ddp" else f"hybrid ({s})")
        if name.startswith("K20") and "6.2x" in name:
            ax.plot([8], [PAPER_SPEEDUP], "k*", ms=10, label="paper: 6.2× at K = 8")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("workers K (b = 128 each)")
        ax.set_ylabel("speedup over one device")
        ax.set_title(name, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    text, curves = tables()
    print(text)
    plot(curves, DOCS / "speedup_vs_k.png")
    write_section("projection", text, "bench/projection.py")


if __name__ == "__main__":
    main()
