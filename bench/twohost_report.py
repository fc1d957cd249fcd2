"""Tables and a plot from ``bench/twohost_sweep.sh``'s JSON lines (one line per rate and batch).

    python bench/twohost_report.py bench/out/twohost.jsonl

Writes the tables between the ``twohost`` markers of docs/benchmarks.md and the plot
docs/twohost_step_vs_rate.png (measured points; lines: the cost model over link rates, from the
profile measured in the same runs and the link's measured alpha and payload efficiency).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from docs_section import DOCS, write_section

from hybridpar import costmodel

ORDER = {"ddp": 0, "a": 1, "b": 2, "c": 3}


def rate_label(rate: str) -> str:
    bps = costmodel.parse_rate(rate) * 8
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"


def repredict(records: list[dict]) -> None:
    """Predictions from each run's own profile and link, by the cost model as it is now. A record
    from before the transport's processor time was measured takes the median of those that have it
    (it is a property of this machine's TCP stack, not of the rate)."""
    known = [r["cpu_s_per_byte"] for r in records if "cpu_s_per_byte" in r]
    fallback = statistics.median(known) if known else 0.0
    for rec in records:
        rec.setdefault("cpu_s_per_byte", fallback)
        prof = costmodel.Profile.from_json(json.dumps(rec["profile"]))
        link = costmodel.Link(rec["alpha_s"], rec["bytes_per_s"], rec["cpu_s_per_byte"])
        for r in rec["rows"]:
            r["predicted"] = costmodel.step_time(prof, link, r["scheme"], rec["K"], rec["batch"]).step_s


def tables(records: list[dict]) -> str:
    out = []
    records = sorted(records, key=lambda r: (r["batch"], costmodel.parse_rate(r["rate"])))
    out.append(
        "| b | link | measured link | scheme | step s | predicted s | error | speed vs DDP | MB sent/worker (ledger) | link bytes / ledger |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    errors = []
    for rec in records:
        ddp = next((r for r in rec["rows"] if r["scheme"] == "ddp"), None)
        link = f"{rec['bytes_per_s'] * 8 / 1e9:.3f} Gbit/s, α {rec['alpha_s'] * 1e6:.0f} µs, {rec['cpu_s_per_byte'] * 1e9:.2f} ns/B"
        for r in sorted(rec["rows"], key=lambda r: ORDER[r["scheme"]]):
            err = r["predicted"] / r["step"] - 1
            errors.append(abs(err))
            vs = f"{ddp['step'] / r['step']:.2f}×" if ddp else "–"
            # tx + rx on node 0's interface per step vs what both directions carry by the ledger.
            wire = f"{r['wire'] / (2 * r['bytes']):.3f}" if r.get("wire") else "–"
            out.append(
                f"| {rec['batch']} | {rate_label(rec['rate'])} | {link} | {r['scheme']} | {r['step']:.3f} | "
                f"{r['predicted']:.3f} | {err:+.1%} | {vs} | {r['bytes'] / 1e6:.2f} | {wire} |"
            )
    out.append("")
    out.append(
        f"Cost-model error over all {len(errors)} runs: median {statistics.median(errors):.1%}, "
        f"largest {max(errors):.1%}."
    )
    out.append("")
    out.append(
        "Target check — best hybrid scheme vs max(compute, link-limited communication): compute = its serialised"
    )
    out.append("step − time blocked in collectives; link-limited communication = ledger bytes / measured bandwidth.")
    out.append("")
    out.append(
        "| b | link | best scheme | step s | compute s | link-limited comm s | step / max | DDP step s | hybrid speed vs DDP |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    for rec in records:
        hyb = [r for r in rec["rows"] if r["scheme"] != "ddp"]
        best = min(hyb, key=lambda r: r["step"])
        comm = best["bytes"] / rec["bytes_per_s"]
        ddp = next((r for r in rec["rows"] if r["scheme"] == "ddp"), None)
        out.append(
            f"| {rec['batch']} | {rate_label(rec['rate'])} | {best['scheme']} | {best['step']:.3f} | "
            f"{best['compute']:.3f} | {comm:.3f} | {best['step'] / max(best['compute'], comm):.2f} | "
            f"{ddp['step'] if ddp else float('nan'):.3f} | {ddp['step'] / best['step'] if ddp else float('nan'):.2f}× |"
        )
    return "\n".join(out)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in records})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    colors = {"ddp": "tab:red", "a": "tab:blue", "b": "tab:green", "c": "tab:purple"}
    for ax, b in zip(axes[0], batches):
        recs = sorted((r for r in records if r["batch"] == b), key=lambda r: costmodel.parse_rate(r["rate"]))
        prof = costmodel.Profile.from_json(json.dumps(recs[0]["profile"]))
        alpha = statistics.median(r["alpha_s"] for r in recs)
        cpu = statistics.median(r["cpu_s_per_byte"] for r in recs)
        eff = statistics.median(r["bytes_per_s"] / costmodel.parse_rate(r["rate"]) for r in recs)
        rates = [10 ** (7.7 + i * 0.05) for i in range(50)]  # 50 Mbit/s .. 15 Gbit/s, in bits
        for s in costmodel.SCHEMES:
            model = [
                costmodel.step_time(prof, costmodel.Link(alpha, r / 8 * eff, cpu), s, recs[0]["K"], b).step_s
                for r in rates
            ]
            ax.plot([r / 1e9 for r in rates], model, color=colors[s], lw=1, alpha=0.7)
            pts = [
                (costmodel.parse_rate(rec["rate"]) * 8 / 1e9, row["step"])
                for rec in recs
                for row in rec["rows"]
                if row["scheme"] == s
            ]
            ax.plot(*zip(*pts), "o", color=colors[s], label=f"{'DDP' if s == 'ddp' else 'hybrid (' + s + ')'}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate, Gbit/s (tc token bucket)")
        ax.set_ylabel("step time, s (median)")
        ax.set_title(f"AlexNet 224 px, 2 hosts, b = {b} per worker")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.text(
        0.5,
        0.005,
        "points: measured; lines: cost model (profile and link measured in the same runs)",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    records = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    repredict(records)
    records = list({(r["rate"], r["batch"]): r for r in records}.values())  # a rerun replaces its earlier line
    text = tables(records)
    print(text)
    plot(records, DOCS / "twohost_step_vs_rate.png")
    write_section("twohost", text, "bench/twohost_report.py")


if __name__ == "__main__":
    main()
