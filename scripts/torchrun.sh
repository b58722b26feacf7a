#!/bin/bash
# DDP without SLURM: run on every node (NODE_RANK 0..NNODES-1), the same MASTER_ADDR on all of them.
#   NNODES=1 GPUS=8 bash scripts/torchrun.sh --config configs/edm.yaml [--config configs/logger/wandb.yaml]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=8 bash scripts/torchrun.sh --config configs/edm.yaml
# Lightning detects torchrun's environment (TorchElasticEnvironment) and takes ranks from it.
set -euo pipefail
NNODES=${NNODES:-1}
GPUS=${GPUS:-8}
torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  main.py fit --trainer.accelerator gpu --trainer.devices "$GPUS" --trainer.num_nodes "$NNODES" \
  --trainer.strategy ddp "$@"
