#!/usr/bin/env bash
# One node, one rank per GPU (or NPROC CPU ranks), embedded coordinator on rank 0.
#   launch/single_node.sh                                   # all visible GPUs
#   NPROC=3 launch/single_node.sh --emulate-speeds 1,2,4    # CPU, emulated speeds
# Extra arguments go to the training script. SCRIPT picks another script.
set -euo pipefail
cd "$(dirname "$0")/.."

gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 2 ))}
SCRIPT=${SCRIPT:-examples/train.py}

exec torchrun --standalone --nproc_per_node="$NPROC" "$SCRIPT" "$@"
