#!/usr/bin/env bash
# Several nodes, one torchrun per node, c10d rendezvous: run the same line on every node.
#   launch/multi_node.sh NNODES NPROC_PER_NODE HEAD_ADDR[:PORT] RUN_ID [hydra overrides...]
#   launch/multi_node.sh 4 8 node001:29400 imagenet-run1 data=imagenet data.root=/data/imagenet
# RUN_ID names the run directory (runs/torchrun-RUN_ID) on every node; checkpoints must be on
# storage all nodes share. --max-restarts lets the job continue from its last checkpoint after a
# worker dies (checkpoint.resume=auto). NNODES may be a range, MIN:MAX (e.g. 1:4): a node lost
# (dead, frozen or cut off: parallel.peer_timeout_s) and the others go on without it; a node
# started again joins at the next restart (docs/reliability.md).
set -euo pipefail
if [ "$#" -lt 4 ]; then
  echo "usage: $0 NNODES NPROC_PER_NODE HEAD_ADDR[:PORT] RUN_ID [hydra overrides...]" >&2
  exit 2
fi
nnodes="$1" nproc="$2" head="$3" run_id="$4"
shift 4
case "$head" in *:*) ;; *) head="$head:29400" ;; esac
# torchrun's agents keep the first rendezvous round's address of their shared store; once the
# node of worker 0 changes (a node lost, another back) the next round never starts (torch 2.14).
# Unshared, each round's worker 0 serves a fresh one.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv-backend=c10d --rdzv-endpoint="$head" \
  --rdzv-id="$run_id" --max-restarts="${MAX_RESTARTS:-3}" -m hybridpar.train "$@"
