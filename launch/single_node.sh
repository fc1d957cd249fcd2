#!/usr/bin/env bash
# Single node: one worker per GPU (or N CPU processes without GPUs), one run directory per launch.
#   launch/single_node.sh [NPROC] [hydra overrides...]
#   launch/single_node.sh 8 data=imagenet data.root=/data/imagenet
set -euo pipefail
nproc="${1:-2}"
shift || true
exec torchrun --standalone --nproc_per_node="$nproc" -m hybridpar.train "$@"
