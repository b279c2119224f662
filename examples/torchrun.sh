#!/bin/bash
# DDP without accelerate's launcher: torchrun starts the processes and accelerate (inside flowtrain) reads the
# rank / world size torchrun sets. Run it on every node, from the repository root:
#
#     NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=node0 examples/torchrun.sh configs/klein4b/lora.yaml
#     NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 MASTER_ADDR=node0 examples/torchrun.sh configs/klein4b/lora.yaml
#
# Defaults: one node, 8 processes, rendezvous on 127.0.0.1:29500. Extra arguments go to `flowtrain train`.
set -euo pipefail

config="$1"
shift
exec torchrun \
    --nnodes "${NNODES:-1}" \
    --node_rank "${NODE_RANK:-0}" \
    --nproc_per_node "${NPROC_PER_NODE:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    -m flowtrain train "$config" "$@"
