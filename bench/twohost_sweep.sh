#!/usr/bin/env bash
# The two-host benchmark of docs/benchmarks.md in one command (run as root, ~85 min on 2 cores):
# every scheme (DDP with torch's default, bf16 and PowerSGD hooks; hybrid a, b, c — b left out at
# b = 256 — with the trunk's sums bucketed, pipelined, pipelined in bf16, for b and c with the trunk
# run round by round, for a in 4 and 8 micro-batches (at b = 256 also 16 with the head laid out col,
# col, row), and for a side by side: the head's weight
# gradients made inline (parallel.defer_wgrad=false) and bf16 sums with bf16 activations)
# at 100 Mbit/s, 1 Gbit/s and 10 Gbit/s, with 16 images per worker and with the
# largest local batch that keeps a step under ~10 s here (256), then the report: tables and plots
# in docs/ (bench/twohost_report.py). SCHEMES=... VARIANTS=... narrow it.
#   PYTHON=.venv/bin/python bench/twohost_sweep.sh [OUT.jsonl]
# RATES="100mbit" BATCHES="256" re-measures a subset: its lines are appended to OUT.jsonl and
# replace the earlier ones of the same rate and batch in the report. On a processor ~3x slower
# (AlexNet's b = 16 step ~2 s), BATCHES="16 64" keeps the larger batch's step under ~10 s (~2.5 h);
# REPORT_ARGS="--section twohost-avx2 --plot docs/twohost_avx2_step_vs_rate.png" then writes the report
# beside the main table (its default: the main twohost section and plot, which a slower machine's
# figures would replace). PASSES=N runs the whole sweep N times over (every rate and batch, then
# again), and the report takes each configuration's medians over the passes and shows how far its
# step moved between them (--aggregate): on a shared machine whose speed drifts by tens of percent
# within an hour, one pass cannot tell a model's miss from the machine's. Three passes, not two:
# the median of three outvotes one disturbed run, the median of two is their mean.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/out/twohost.jsonl}"
mkdir -p "$(dirname "$out")"
[ -n "${RATES:-}${BATCHES:-}" ] || : >"$out"
passes="${PASSES:-1}"
for pass in $(seq "$passes"); do
  for rate in ${RATES:-100mbit 1gbit 10gbit}; do
    for batch in ${BATCHES:-16 256}; do
      if [ "$batch" -le 64 ]; then steps=5 warmup=2; else steps=3 warmup=2; fi
      echo "== pass $pass of $passes: $rate, b = $batch" >&2
      # b = 256: also a in 16 micro-batches with the head laid out col, col, row (one blocking move
      # fewer per round than min_bytes' row, row, row: 16 rounds pay for each).
      if [ "$batch" -le 64 ]; then schemes="a,b,c" more=""; else schemes="a,c" more=",pipelined+mb16+ccr"; fi
      bash bench/twohost.sh "$rate" bench/schemes.py --batch "$batch" --steps "$steps" --warmup "$warmup" \
        --schemes "${SCHEMES:-$schemes,ddp,ddp/bf16,ddp/powersgd}" --trunk-sync "${VARIANTS:-bucketed,pipelined+inline,pipelined,pipelined+bf16,pipelined+bf16+act16,pipelined+chunk,pipelined+mb4,pipelined+mb8$more}" \
        --rate "$rate" --profile-each --json "$out" 2>&1 | grep -v -e '^\[W' -e Warning
    done
  done
done
read -r -a report_args <<<"${REPORT_ARGS:-}"
[ "$passes" -gt 1 ] && report_args+=(--aggregate)
"${PYTHON:-python}" bench/twohost_report.py "$out" "${report_args[@]}"
