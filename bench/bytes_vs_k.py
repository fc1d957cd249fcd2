"""Bytes per worker and step vs K for AlexNet at b = 128: DDP vs hybrid (a), (b), (c).

    python bench/bytes_vs_k.py [--measure-up-to 8] [--out docs]

K ≤ --measure-up-to: counted by the byte ledger of one real emulated step (64 px input: the
same 9216 features and trunk parameters, so the same bytes as 224 px) and checked against the
closed-form formula; larger K: the formula. Writes ``bytes_vs_k.md`` (table) and
``bytes_vs_k.png`` (plot) into --out and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hybridpar.comm import run_emulated
from hybridpar.models import alexnet, build_seeded
from hybridpar.parallel import HybridModel
from hybridpar.parallel.cost import ddp_step_bytes, hybrid_step_bytes
from hybridpar.parallel.data_parallel import trunk_bucket_numels
from hybridpar.parallel.program import SCHEMES

WIDTHS = [(9216, 4096), (4096, 4096), (4096, 1000)]
LAYOUTS = {"paper": ("col", "row", "row"), "min_bytes": ("row", "row", "row")}
KS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 33, 40, 48, 49, 56, 64]


def measured(model, K: int, b: int, scheme: str, plan: str) -> int:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(K * b, 3, 64, 64, generator=g), torch.randint(0, 1000, (K * b,), generator=g)

    def step(comm):
        m = HybridModel(model, comm, plan=plan)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        lo = comm.rank * b
        m.train_step(x[lo : lo + b], y[lo : lo + b], scheme=scheme, optimizer=opt)
        return comm.ledger.sent

    return max(run_emulated(K, step))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--measure-up-to", type=int, default=8)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    b = args.batch
    model = build_seeded(lambda: alexnet(1000, dropout=0.0), 0)
    total = sum(p.numel() for p in model.parameters())
    trunk = trunk_bucket_numels([p.numel() for p in model.features.parameters()])
    rows = []
    for K in KS:
        ddp = ddp_step_bytes(total, K)
        row = {"K": K, "ddp": ddp}
        for plan, styles in LAYOUTS.items():
            formula = max(hybrid_step_bytes(WIDTHS, styles, trunk, b, K, r) for r in range(K))
            row[plan] = formula
            if 2 <= K <= args.measure_up_to:
                for scheme in SCHEMES:
                    got = measured(model, K, b, scheme, plan)
                    assert got == formula, (K, plan, scheme, got, formula)
                row["source"] = "ledger (a, b, c) = formula"
            else:
                row["source"] = "formula" if K > 1 else "no communication"
        rows.append(row)
    lines = [
        (
            f"AlexNet, b = {b} per worker, fp32; MB sent per worker per step (max over workers). (b) and (c) move "
            "exactly the bytes of (a)."
        ),
        "",
        "| K | DDP | hybrid, paper chain | ratio | hybrid, byte-minimal chain | ratio | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = lambda v, r=r: f"{v / r['ddp']:.3f}" if r["ddp"] else "–"
        lines.append(
            f"| {r['K']} | {r['ddp'] / 1e6:.1f} | {r['paper'] / 1e6:.1f} | {ratio(r['paper'])} | "
            f"{r['min_bytes'] / 1e6:.1f} | {ratio(r['min_bytes'])} | {r['source']} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bytes_vs_k.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["K"] for r in rows if r["K"] > 1]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ks, [r["ddp"] / 1e6 for r in rows if r["K"] > 1], "o-", label="DDP (all-reduce of 61.1 M gradients)")
    ax.plot(ks, [r["paper"] / 1e6 for r in rows if r["K"] > 1], "s-", label="hybrid (a)/(b)/(c), paper chain")
    ax.plot(
        ks, [r["min_bytes"] / 1e6 for r in rows if r["K"] > 1], "^-", label="hybrid (a)/(b)/(c), byte-minimal chain"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers K")
    ax.set_ylabel("MB sent per worker per step")
    ax.set_title(f"AlexNet, b = {b} per worker, fp32 (ledger for K ≤ {args.measure_up_to}, formula beyond)")
    ax.axvline(33, color="grey", ls=":", lw=1)
    ax.axvline(49, color="grey", ls=":", lw=1)
    ax.text(33, ax.get_ylim()[1] * 0.05, " K=33", color="grey")
    ax.text(49, ax.get_ylim()[1] * 0.12, " K=49", color="grey")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bytes_vs_k.png", dpi=120)


if __name__ == "__main__":
    main()
