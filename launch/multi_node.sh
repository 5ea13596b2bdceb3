#!/usr/bin/env bash
# Several nodes: run this on every node with the same RDZV_ENDPOINT (host:port of node 0).
#   node0$ NNODES=2 RDZV_ENDPOINT=node0:29500 launch/multi_node.sh
#   node1$ NNODES=2 RDZV_ENDPOINT=node0:29500 launch/multi_node.sh
# No node rank to give: the c10d rendezvous numbers the nodes itself (torch 2.x: in the order
# of their host names; global rank 0 need not be on the RDZV_ENDPOINT host). Global rank 0 starts
# the coordinator and binds the interface its host name routes to (if that name maps to
# loopback, as Debian's "127.0.1.1 node0" does: GLOO_SOCKET_IFNAME's interface, else the only
# one up); set SHARDBALANCE_BIND=tcp://IP:PORT to choose, or SHARDBALANCE_COORDINATOR to use a
# standalone one (launch/coordinator.sh). Extra arguments go to the training script.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}"
NNODES=${NNODES:-2}
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MAX_RESTARTS=${MAX_RESTARTS:-0}
# The same on every node (a date in it would split nodes started either side of midnight).
RDZV_ID=${RDZV_ID:-shardbalance}
SCRIPT=${SCRIPT:-examples/train.py}

exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" \
    "$SCRIPT" "$@"
