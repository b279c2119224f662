#!/bin/bash
# One node's part of examples/slurm/train.sbatch (run by srun, once per node): `accelerate launch` with this node's
# rank and the job's size read from SLURM's variables. Usage: launch_node.sh CONFIG [key=value ...]
#
#   SLURM_NNODES, SLURM_NODEID   number of nodes, this node's index (set by SLURM)
#   MASTER_ADDR, MASTER_PORT     the rendezvous host and port (train.sbatch sets them)
#   GPUS_PER_NODE                training processes per node (one per GPU)
#   ACCELERATE_CONFIG            the launch config (default: configs/accelerate/ddp.yaml)
set -euo pipefail

config="$1"
shift
nodes="${SLURM_NNODES:?not set: run under SLURM (srun), or set it by hand}"
node="${SLURM_NODEID:?not set: run under SLURM (srun), or set it by hand}"
per_node="${GPUS_PER_NODE:?not set: processes per node}"

exec accelerate launch \
    --config_file "${ACCELERATE_CONFIG:-configs/accelerate/ddp.yaml}" \
    --num_machines "$nodes" \
    --machine_rank "$node" \
    --num_processes "$((nodes * per_node))" \
    --main_process_ip "${MASTER_ADDR:?not set: the first node}" \
    --main_process_port "${MASTER_PORT:-29500}" \
    -m flowtrain train "$config" "$@"
