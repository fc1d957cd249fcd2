"""Tables and a plot from ``bench/twohost_sweep.sh``'s JSON lines (one line per rate and batch).

    python bench/twohost_report.py bench/out/twohost.jsonl [--section NAME --plot PATH]

Writes the tables between the ``twohost`` markers of docs/benchmarks.md and the plot
docs/twohost_step_vs_rate.png (measured points; lines: the cost model over link rates, from the
profile measured in the same runs and the link's measured alpha and payload efficiency).
``--section`` / ``--plot`` put a sweep from another machine beside that one instead of over it.
``--aggregate`` (``PASSES=N bench/twohost_sweep.sh``): the lines of one rate and batch are passes of
the same sweep, and each configuration's figures are its medians over them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from docs_section import DOCS, write_section
from schemes import anchored
from schemes import predict as predict_hybrid

from hybridpar import costmodel

DDP_HOOKS = ("", "bf16", "powersgd")  # torch's default all-reduce, bf16_compress_hook, powerSGD_hook
VARIANTS = (
    "bucketed",
    "bucketed+whole",
    "pipelined+inline",
    "pipelined",
    "pipelined+chunk",
    "pipelined+mb4",
    "pipelined+mb8",
    "pipelined+mb16+ccr",
    "pipelined+bf16",
    "pipelined+bf16+act16",
)


def parse(label: str) -> tuple[str, str]:
    """``a/pipelined+chunk`` -> ("a", "pipelined+chunk"); ``ddp/bf16`` -> ("ddp", "bf16"); ``c`` -> ("c", "bucketed")."""
    scheme, _, variant = label.partition("/")
    return scheme, variant or ("" if scheme == "ddp" else "bucketed")


def order(label: str) -> tuple:
    scheme, variant = parse(label)
    if scheme == "ddp":
        return (0, DDP_HOOKS.index(variant) if variant in DDP_HOOKS else 9)
    return (1 + "abc".index(scheme), VARIANTS.index(variant) if variant in VARIANTS else 9)


def exact(label: str) -> bool:
    """Every hybrid variant but bf16 sums and bf16 activations is exact (the single device's arithmetic)."""
    scheme, variant = parse(label)
    return scheme != "ddp" and "bf16" not in variant and "act16" not in variant


def predict(prof, link, label: str, K: int, b: int) -> float | None:
    scheme, variant = parse(label)
    if scheme == "ddp":
        if variant == "powersgd":
            return None  # not modelled
        return costmodel.step_time(prof, link, "ddp", K, b, grad_itemsize=2 if variant == "bf16" else 4).step_s
    return predict_hybrid(prof, link, scheme, variant, K, b).step_s


def ddp_hook_bytes(records: list[dict]) -> None:
    """DDP's bytes per worker under its hooks (the ledger sees only the default all-reduce): bf16
    halves them; PowerSGD (rank 4, AlexNet in one bucket, K = 2) sends each matrix as P and Q and
    each vector whole — every AlexNet matrix passes torch's compression-rate test."""
    from hybridpar.models import alexnet

    shapes = [p.shape for p in alexnet(1000).parameters()]
    psgd = 4 * sum(4 * (s[0] + s.numel() // s[0]) if len(s) > 1 else s.numel() for s in shapes)
    for rec in records:
        for r in rec["rows"]:
            if r["scheme"] == "ddp/bf16":
                r["bytes"] = r["bytes"] // 2
            elif r["scheme"] == "ddp/powersgd" and rec["K"] == 2:
                r["bytes"] = psgd


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
        # The veth's token bucket, as bench/twohost.sh set it for the rate.
        link = costmodel.Link(
            rec["alpha_s"],
            rec["bytes_per_s"],
            rec["cpu_s_per_byte"],
            burst_bytes=costmodel.tbf_burst(rec["rate"]),
            cpu_s_per_call=rec.get("cpu_s_per_call", 0.0),  # 0 where a record predates their measurement
            cpu_s_per_bf16_byte=rec.get("cpu_s_per_bf16_byte", 0.0),
            steal_s_per_byte=rec.get("steal_s_per_byte", 0.0),  # 0 where a record predates its measurement
        )
        for r in rec["rows"]:
            # A row measured with --profile-each carries the profile taken right before its scheme.
            own = costmodel.Profile.from_json(json.dumps(r["profile"])) if "profile" in r else prof
            r["predicted"] = predict(own, link, r["scheme"], rec["K"], rec["batch"])
            # A hybrid row also with its compute anchored to its scheme's serialised run of the same
            # invocation (schemes.anchored): the model's overlap without the profile's speed.
            scheme, variant = parse(r["scheme"])
            r["predicted_anchored"] = (
                None
                if scheme == "ddp" or not r.get("compute")
                else anchored(own, link, scheme, variant, rec["K"], rec["batch"], r["compute"])
            )


LINK_FIELDS = (
    "alpha_s",
    "bytes_per_s",
    "cpu_s_per_byte",
    "cpu_s_per_call",
    "cpu_s_per_bf16_byte",
    "steal_s_per_byte",
)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate(records: list[dict]) -> list[dict]:
    """One record per rate and batch from several passes of the sweep (after :func:`repredict`, so
    that each pass is predicted from its own profile and link): every numeric figure of a
    configuration — measured step, predictions, compute, drift, bytes — is its median over the
    passes, and the link's figures their medians. A row also keeps ``spread``, how far its measured
    step moved between passes ((largest − smallest) / median), and ``pass_errors``, each pass's
    error from the profile alone — what one pass would have reported."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["rate"], rec["batch"]), []).append(rec)
    out = []
    for recs in groups.values():
        if len(recs) == 1:
            out.append(recs[0])
            continue
        merged = dict(recs[-1])  # the rest (K, profile for the plot's lines): the last pass's
        merged["passes"] = len(recs)
        for k in LINK_FIELDS:
            vals = [rec[k] for rec in recs if _number(rec.get(k))]
            if vals:
                merged[k] = statistics.median(vals)
        labels = list(dict.fromkeys(r["scheme"] for rec in recs for r in rec["rows"]))
        merged["rows"] = []
        for label in labels:
            runs = [r for rec in recs for r in rec["rows"] if r["scheme"] == label]
            row: dict = {"scheme": label, "passes": len(runs)}
            for key in dict.fromkeys(k for r in runs for k in r):
                if key in ("scheme", "profile"):
                    continue
                vals = [r[key] for r in runs if _number(r.get(key))]
                row[key] = statistics.median(vals) if vals else runs[0].get(key)
            steps = [r["step"] for r in runs]
            row["spread"] = (max(steps) - min(steps)) / statistics.median(steps) if len(runs) > 1 else None
            row["pass_errors"] = [r["predicted"] / r["step"] - 1 for r in runs if r.get("predicted") is not None]
            merged["rows"].append(row)
        out.append(merged)
    return out


def _fmt(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def tables(records: list[dict]) -> str:
    out = []
    records = sorted(records, key=lambda r: (r["batch"], costmodel.parse_rate(r["rate"])))
    # Runs timed with the speed probe (bench/schemes.py's SpeedProbe) show its drift.
    drifted = any("drift" in r for rec in records for r in rec["rows"])
    # Several passes (aggregate): the medians, and how far each step moved between the passes.
    passes = max((rec.get("passes", 1) for rec in records), default=1)
    out.append(
        "| b | link | measured link | scheme / trunk sums | step s | predicted s | error | error, compute anchored |"
        + " probe drift |" * drifted
        + " step spread over passes |" * (passes > 1)
        + " speed vs DDP | MB sent/worker (ledger) | link bytes / ledger |"
    )
    out.append("|---|---|---|---|---|---|---|---|" + "---|" * (drifted + (passes > 1)) + "---|---|---|")
    errors, hybrid_errors, anchored_errors, spreads = [], [], [], []
    pass_errors: dict[int, list[float]] = {}
    for rec in records:
        ddp = next((r for r in rec["rows"] if r["scheme"] == "ddp"), None)
        link = (
            f"{rec['bytes_per_s'] * 8 / 1e9:.3f} Gbit/s, α {rec['alpha_s'] * 1e6:.0f} µs, "
            f"{rec['cpu_s_per_byte'] * 1e9:.2f} ns/B ({rec.get('cpu_s_per_bf16_byte', 0) * 1e9:.2f} bf16), "
            f"{rec.get('cpu_s_per_call', 0) * 1e6:.0f} µs/call"
            + (f", {rec['steal_s_per_byte'] * 1e9:.2f} ns/B beside compute" if rec.get("steal_s_per_byte") else "")
        )
        for r in sorted(rec["rows"], key=lambda r: order(r["scheme"])):
            err = None if r["predicted"] is None else r["predicted"] / r["step"] - 1
            if err is not None:
                errors.append(abs(err))
                if parse(r["scheme"])[0] != "ddp" and parse(r["scheme"])[1] != "bucketed":
                    hybrid_errors.append(abs(err))
            anch = None if r.get("predicted_anchored") is None else r["predicted_anchored"] / r["step"] - 1
            if err is not None:  # DDP, with no serialised run to anchor to, counts as predicted
                anchored_errors.append(abs(anch if anch is not None else err))
            more = f" {_fmt(anch, '+.1%')} |" + (f" {_fmt(r.get('drift'), '.3f')} |" if drifted else "")
            if passes > 1:
                more += f" {_fmt(r.get('spread'), '.1%')} |"
                if r.get("spread") is not None:
                    spreads.append(r["spread"])
                for i, e in enumerate(r.get("pass_errors", [])):
                    pass_errors.setdefault(i, []).append(abs(e))
            vs = f"{ddp['step'] / r['step']:.2f}×" if ddp else "–"
            # tx + rx on node 0's interface per step vs what both directions carry by the ledger.
            wire = f"{r['wire'] / (2 * r['bytes']):.3f}" if r.get("wire") and r.get("bytes") else "–"
            out.append(
                f"| {rec['batch']} | {rate_label(rec['rate'])} | {link} | {r['scheme']} | {r['step']:.3f} | "
                f"{_fmt(r['predicted'], '.3f')} | {_fmt(err, '+.1%')} |{more} {vs} | {_fmt(r.get('bytes') and r['bytes'] / 1e6, '.2f')} | {wire} |"
            )
    out.append("")
    out.append(
        f"Cost-model error over all {len(errors)} predicted runs: median {statistics.median(errors):.1%}, "
        f"largest {max(errors):.1%}; over the {len(hybrid_errors)} pipelined ones: median "
        f"{statistics.median(hybrid_errors or [0]):.1%}, largest {max(hybrid_errors or [0]):.1%}; "
        f"{within(errors)} of {len(errors)} within 15%. With the compute anchored to each hybrid scheme's "
        f"serialised run (DDP's rows as predicted): median {statistics.median(anchored_errors or [0]):.1%}, largest {max(anchored_errors or [0]):.1%}, "
        f"{within(anchored_errors)} of {len(anchored_errors)} within 15%."
    )
    if passes > 1:
        out[-1] += (
            f" These are medians over {passes} passes; a configuration's measured step moved between passes by "
            f"median {statistics.median(spreads or [0]):.1%}, largest {max(spreads or [0]):.1%}; one pass alone "
            "would have had "
            + ", ".join(f"{within(v)} of {len(v)}" for v in pass_errors.values())
            + " within 15% from the profile."
        )
    out += ["", *targets(records)]
    return "\n".join(out)


def within(errors: list[float], bound: float = 0.15) -> int:
    """How many of ``errors`` (absolute, relative) are within ``bound``."""
    return sum(e <= bound for e in errors)


def targets(records: list[dict]) -> list[str]:
    """The issue's ratios, each from rows measured side by side in one run."""
    out = [
        (
            "Targets — exact: the best exact hybrid vs max(compute, link-limited communication), compute = its "
            "scheme's serialised step − time blocked in collectives, communication = ledger bytes / measured "
            "bandwidth; vs DDP: the best hybrid (exact, and with bf16 sums) vs DDP with its best hook."
        ),
        "",
        "| b | link | best exact | step s | compute s | link-limited comm s | step / max | best DDP | DDP step s | exact vs best DDP | best hybrid | step s | vs best DDP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        hyb = [r for r in rec["rows"] if parse(r["scheme"])[0] != "ddp"]
        best = min((r for r in hyb if exact(r["scheme"])), key=lambda r: r["step"])
        anyh = min(hyb, key=lambda r: r["step"])
        comm = best["bytes"] / rec["bytes_per_s"]
        ddps = [r for r in rec["rows"] if parse(r["scheme"])[0] == "ddp"]
        ddp = min(ddps, key=lambda r: r["step"]) if ddps else None
        out.append(
            f"| {rec['batch']} | {rate_label(rec['rate'])} | {best['scheme']} | {best['step']:.3f} | "
            f"{best['compute']:.3f} | {comm:.3f} | {best['step'] / max(best['compute'], comm):.2f} | "
            f"{ddp['scheme'] if ddp else '–'} | {_fmt(ddp and ddp['step'], '.3f')} | "
            f"{_fmt(ddp and ddp['step'] / best['step'], '.2f')}{'×' if ddp else ''} | {anyh['scheme']} | "
            f"{anyh['step']:.3f} | {_fmt(ddp and ddp['step'] / anyh['step'], '.2f')}{'×' if ddp else ''} |"
        )
    # bf16 sums on the slowest link vs the same configuration on the fastest one (≈ unlimited).
    slow = {
        r["batch"]: r
        for r in records
        if costmodel.parse_rate(r["rate"]) == min(costmodel.parse_rate(x["rate"]) for x in records)
    }
    fast = {
        r["batch"]: r
        for r in records
        if costmodel.parse_rate(r["rate"]) == max(costmodel.parse_rate(x["rate"]) for x in records)
    }
    ratios = []
    for b in sorted(set(slow) & set(fast)) if len({r["rate"] for r in records}) > 1 else []:
        for r in slow[b]["rows"]:
            if "bf16" in r["scheme"] and parse(r["scheme"])[0] != "ddp":
                f = next((x for x in fast[b]["rows"] if x["scheme"] == r["scheme"]), None)
                if f:
                    ratios.append(
                        f"| {b} | {r['scheme']} | {r['step']:.3f} | {f['step']:.3f} | {r['step'] / f['step']:.2f} |"
                    )
    if ratios:  # one rate measured: nothing to compare
        out += [
            "",
            "| b | bf16 sums (+act16: and bf16 activations), configuration | step s, slowest link | step s, fastest link | ratio |",
            "|---|---|---|---|---|",
            *ratios,
        ]
    return out


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in records})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    colors = {"ddp": "tab:red", "a": "tab:blue", "b": "tab:green", "c": "tab:purple"}
    marks = {
        "bucketed": "o",
        "pipelined": "s",
        "pipelined+chunk": "^",
        "pipelined+mb4": "v",
        "pipelined+mb8": "D",
        "pipelined+mb16+ccr": "<",
        "pipelined+bf16": "D",
        "pipelined+bf16+act16": "P",
        "pipelined+inline": "s",
        "bucketed+whole": "o",
        "": "o",
        "bf16": "D",
        "powersgd": "x",
    }
    for ax, b in zip(axes[0], batches):
        recs = sorted((r for r in records if r["batch"] == b), key=lambda r: costmodel.parse_rate(r["rate"]))
        prof = costmodel.Profile.from_json(json.dumps(recs[0]["profile"]))
        alpha = statistics.median(r["alpha_s"] for r in recs)
        cpu = statistics.median(r["cpu_s_per_byte"] for r in recs)
        call, bf16, steal = (
            statistics.median(r.get(k, 0.0) for r in recs)
            for k in ("cpu_s_per_call", "cpu_s_per_bf16_byte", "steal_s_per_byte")
        )
        eff = statistics.median(r["bytes_per_s"] / costmodel.parse_rate(r["rate"]) for r in recs)
        rates = [10 ** (7.7 + i * 0.05) for i in range(50)]  # 50 Mbit/s .. 15 Gbit/s, in bits
        labels = sorted({row["scheme"] for rec in recs for row in rec["rows"]}, key=order)
        for label in labels:
            scheme, variant = parse(label)
            if variant in ("bucketed", "pipelined", ""):  # the model's lines for the exact ones and plain DDP
                model = [
                    predict(
                        prof,
                        costmodel.Link(
                            alpha,
                            r / 8 * eff,
                            cpu,
                            cpu_s_per_call=call,
                            cpu_s_per_bf16_byte=bf16,
                            steal_s_per_byte=steal,
                        ),
                        label,
                        recs[0]["K"],
                        b,
                    )
                    for r in rates
                ]
                ls = "-" if variant != "pipelined" else "--"
                ax.plot([r / 1e9 for r in rates], model, color=colors[scheme], lw=1, alpha=0.6, ls=ls)
            pts = [
                (costmodel.parse_rate(rec["rate"]) * 8 / 1e9, row["step"])
                for rec in recs
                for row in rec["rows"]
                if row["scheme"] == label
            ]
            ax.plot(*zip(*pts), marks.get(variant, "o"), color=colors[scheme], label=label, ms=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate, Gbit/s (tc token bucket)")
        ax.set_ylabel("step time, s (median)")
        ax.set_title(f"AlexNet 224 px, 2 hosts, b = {b} per worker")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.text(
        0.5,
        0.005,
        "points: measured; lines: cost model (solid: bucketed / DDP, dashed: pipelined; profile and link measured in the same runs)",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", type=Path, help="bench/twohost_sweep.sh's output")
    ap.add_argument("--section", default="twohost", help="the docs/benchmarks.md markers to write between")
    ap.add_argument("--plot", type=Path, default=DOCS / "twohost_step_vs_rate.png")
    ap.add_argument(
        "--aggregate",
        action="store_true",
        help="the lines of one rate and batch are passes of one sweep (PASSES=N): medians over them "
        "(default: a later line replaces an earlier one)",
    )
    args = ap.parse_args()
    records = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    repredict(records)
    ddp_hook_bytes(records)
    if args.aggregate:
        records = aggregate(records)
    else:
        records = list({(r["rate"], r["batch"]): r for r in records}.values())  # a rerun replaces its earlier line
    text = tables(records)
    print(text)
    plot(records, args.plot)
    write_section(args.section, text, "bench/twohost_report.py")


if __name__ == "__main__":
    main()
