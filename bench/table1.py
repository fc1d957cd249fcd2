"""The paper's Table 1 in miniature: held-out error for K = 1, 2, 4, 8 workers, both batch settings, three
conv learning-rate rules, on the embedded digits; next to the cost model's projected speed-up and the paper.

    python bench/table1.py [--epochs 6] [--ks 1,2,4,8] [--seeds 0]

The paper trains AlexNet on ImageNet with 128 images per GPU for 1-8 GPUs and reports, for the batch settings
(conv batch, FC batch) = (K·b, K·b) and (K·b, b), top-1 error and speed-up. Here: the small AlexNet on the
4,000 embedded digits, b = 32 per worker, K emulated workers (one process: the arithmetic of K workers, not
their speed), the same number of epochs for every K (as the paper: a larger K takes fewer, larger steps):

- (K·b, K·b): ``parallel.fc_batch=full`` (the FC layers update once per step, on the global batch),
- (K·b, b): ``parallel.scheme=c parallel.fc_batch=chunk`` (the FC layers update after each of the K rounds),
- ``optim.conv_lr_scale`` none / sqrt / linear: the conv rate × 1, √K or K (the FC rate stays).

Warm-up is one epoch at every K (the default's 60 steps would be most of a K = 8 run). Speed-up is the cost
model's (docs/profiles, a K20-class device on a 6 GB/s PCIe-class link, b = 128), since emulated workers
share one CPU; the paper's own: 6.2× on 8 GPUs for about one point of top-1 error. Writes the ``table1``
section of docs/benchmarks.md and docs/table1.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import DOCS, write_section
from projection import k20, load

from hybridpar import costmodel as cm

TRAIN_EXAMPLES = 4000  # the embedded training split
B = 32
SETTINGS = {"(K·b, K·b)": ["parallel.scheme=a"], "(K·b, b)": ["parallel.scheme=c", "parallel.fc_batch=chunk"]}
RULES = ("none", "sqrt", "linear")


def run(K: int, setting: str, rule: str, epochs: int, seed: int, tmp: Path) -> dict:
    run_dir = tmp / f"k{K}_{setting.count('K')}_{rule}_s{seed}"
    warmup = math.ceil(TRAIN_EXAMPLES / (K * B))  # one epoch
    cmd = [
        sys.executable,
        "-m",
        "hybridpar.train",
        f"parallel.emulate={K}",
        *SETTINGS[setting],
        f"optim.conv_lr_scale={rule}",
        f"optim.warmup_steps={warmup}",
        f"data.batch_size={B}",
        f"trainer.epochs={epochs}",
        f"seed={seed}",
        "logger=none",
        "trainer.progress=false",
        "checkpoint.every_steps=null",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HYBRIDPAR_FAULT": ""})
    return json.loads((run_dir / "summary.json").read_text())


def projected() -> dict[int, dict[str, float]]:
    dev, link = k20(load("h200_fp32_b128.json")), cm.Link(10e-6, 6e9)
    return {k: {s: cm.speedup(dev, link, s, k, 128) for s in ("a", "c", "ddp")} for k in (1, 2, 4, 8)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for setting, marker in zip(SETTINGS, "os", strict=True):
        for rule, style in zip(RULES, ("-", "--", ":"), strict=True):
            pts = sorted((r["K"], r["error"]) for r in rows if r["setting"] == setting and r["rule"] == rule)
            pts = [(1, r["error"]) for r in rows if r["K"] == 1][:1] + [p for p in pts if p[0] > 1]
            ax.plot(*zip(*pts, strict=True), style, marker=marker, label=f"{setting}, conv lr {rule}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_xlabel("workers K (b = 32 each, same epochs)")
    ax.set_ylabel("held-out top-1 error (%)")
    ax.set_title("Table 1 in miniature: embedded digits, small AlexNet")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--seeds", default="0", help="comma-separated; the table gives the mean")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for K in ks:
            for setting in SETTINGS if K > 1 else list(SETTINGS)[:1]:
                for rule in RULES if K > 1 else RULES[:1]:
                    runs = [run(K, setting, rule, args.epochs, s, Path(tmp)) for s in seeds]
                    error = 100 * (1 - sum(r["val_top1"] for r in runs) / len(runs))
                    loss = sum(r["val_loss"] for r in runs) / len(runs)
                    rows.append({"K": K, "setting": setting, "rule": rule, "error": error, "loss": loss})
                    print(f"K={K} {setting} conv lr {rule}: error {error:.2f}%  loss {loss:.4f}", flush=True)
    proj = projected()
    lines = [
        (
            f"Small AlexNet, embedded digits (4,000 train / 1,000 held out), b = {B} per worker, {args.epochs} epochs at "
            f"every K, seed(s) {args.seeds}; held-out top-1 error (%) and cross-entropy. Projected speed-up: cost model, "
            "K20-class device, 6 GB/s per GPU, b = 128 (hybrid (a) / (c))."
        ),
        "",
        "| K | conv batch, FC batch | conv lr × 1 | conv lr × √K | conv lr × K | projected speed-up (a) / (c) |",
        "|---|---|---|---|---|---|",
    ]
    for K in ks:
        for setting in SETTINGS if K > 1 else list(SETTINGS)[:1]:
            cells = []
            for rule in RULES:
                found = [r for r in rows if r["K"] == K and r["setting"] == setting and (r["rule"] == rule or K == 1)]
                cells.append(f"{found[0]['error']:.1f} ({found[0]['loss']:.3f})" if found else "–")
            label = f"({K * B}, {K * B})" if setting == "(K·b, K·b)" else f"({K * B}, {B})"
            lines.append(f"| {K} | {label} | " + " | ".join(cells) + f" | {proj[K]['a']:.2f}× / {proj[K]['c']:.2f}× |")
    text = "\n".join(lines)
    print(text)
    plot(rows, DOCS / "table1.png")
    write_section("table1", text, "bench/table1.py")


if __name__ == "__main__":
    main()
