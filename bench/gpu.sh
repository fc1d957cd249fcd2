#!/usr/bin/env bash
# GPU figures in one run (a few minutes on one H100/H200; the CPU variant runs the same steps):
#   1. bench/gpu.py: hybridpar (K = 1, NCCL) vs a plain torchvision-AlexNet loop, fp32 and bf16;
#   2. the cost model's per-layer profile of this device (fp32, bf16) for its projections;
#   3. the training app end to end on the device (FakeData, 30 steps, bf16, channels_last, compile).
#   bash bench/gpu.sh [OUTDIR]        (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${1:-bench/out/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then dev=cuda; else dev=cpu; fi
small=()
[ "$dev" = cpu ] && small=(--batch 32 --steps 5 --warmup 2)
status=0
nvidia-smi -L 2>/dev/null
"$py" -m torch.distributed.run --standalone --nproc_per_node=1 bench/gpu.py --channels-last --json "$out/gpu.jsonl" \
  "${small[@]}" || status=1
for p in fp32 bf16; do
  "$py" -m hybridpar.costmodel profile --device "$dev" --batch 128 --precision "$p" --out "$out/profile_${dev}_$p.json" || status=1
done
# The app with the whole fast path (bf16, channels_last, compiled trunk), from outside the checkout
# so the installed package (and its configs) is what runs.
(cd /tmp && "$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m hybridpar.train data=fake data.size=3840 \
  data.val_size=256 data.num_workers=8 trainer.max_steps=30 trainer.precision=bf16 trainer.channels_last=true \
  trainer.compile=true trainer.progress=false logger=none hydra.run.dir="$out/train") || status=1
exit "$status"
