"""Bytes per worker and step vs K for DDP, the 1-D hybrid and the best 2-D hybrid (AlexNet, VGG-16).

    python bench/plan_bytes.py

b = 128 per worker, fp32, K = 1 … 256, by the planner's formulas (``hybridpar.plan``; the 1-D rows
are the formula the byte ledger is tested against). Writes the ``plan`` section of
docs/benchmarks.md and docs/plan_bytes_vs_k.png.
"""

from __future__ import annotations

from docs_section import DOCS, write_section

from hybridpar.parallel.cost import ddp_step_bytes, two_d_step_bytes
from hybridpar.parallel.head import choose_styles
from hybridpar.plan import build, head_widths, trunk_buckets

KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
B = 128


def rows(name: str) -> list[tuple[int, float, float, float, int]]:
    model = build(name, 1000, 3)
    widths = head_widths(model)
    trunk = trunk_buckets(model)
    n_all = sum(p.numel() for p in model.parameters())
    out = []
    for K in KS:
        ddp = ddp_step_bytes(n_all, K)
        one_d = two_d_step_bytes(widths, choose_styles(widths, K), trunk, B, K, K)
        two_d = {
            G: two_d_step_bytes(widths, choose_styles(widths, G), trunk, B, K, G) for G in KS if G <= K and K % G == 0
        }
        G = min(two_d, key=two_d.get)
        out.append((K, ddp / 1e6, one_d / 1e6, two_d[G] / 1e6, G))
    return out


def main() -> None:
    lines, data = [], {}
    for name, label in (("alexnet", "AlexNet"), ("vgg16", "VGG-16")):
        data[label] = rows(name)
        lines += [
            f"*{label}* (b = {B}, fp32): MB per worker and step",
            "",
            "| K | DDP | 1-D hybrid | best 2-D hybrid | its G | best / DDP |",
            "|---|---|---|---|---|---|",
        ]
        for K, ddp, one, two, G in data[label]:
            lines.append(f"| {K} | {ddp:.1f} | {one:.1f} | {two:.1f} | {G} | {two / ddp if ddp else 0:.3f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (label, rs) in zip(axes, data.items()):
        ks = [r[0] for r in rs[1:]]
        ax.plot(ks, [r[1] for r in rs[1:]], "o-", color="tab:red", label="DDP")
        ax.plot(ks, [r[2] for r in rs[1:]], "o-", color="tab:blue", label="1-D hybrid (head over all K)")
        ax.plot(ks, [r[3] for r in rs[1:]], "o-", color="tab:green", label="best 2-D hybrid (head over G)")
        for K, _, _, two, G in rs[1:]:
            ax.annotate(f"G={G}", (K, two), textcoords="offset points", xytext=(0, -12), fontsize=7, ha="center")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers K (b = 128 each)")
        ax.set_ylabel("MB sent per worker and step")
        ax.set_title(f"{label}: bytes per step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "plan_bytes_vs_k.png", dpi=110)
    write_section("plan", text, "bench/plan_bytes.py")


if __name__ == "__main__":
    main()
