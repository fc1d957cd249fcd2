#!/usr/bin/env bash
# Single node: one process per GPU (or 2 CPU processes without GPUs).
#   launch/single_node.sh [NPROC] [extra args for the module]
# Checks the hybrid against one device on this node's workers.
set -euo pipefail
nproc="${1:-2}"
shift || true
exec torchrun --standalone --nproc_per_node="$nproc" -m hybridpar.verify "$@"
