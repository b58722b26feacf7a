#!/bin/bash
# GPU check: a tiny EDM fit, a KnockoffNets attack on it and the serving benchmark, on cuda with bf16 mixed
# precision, printing the figures. Run from the repository root on a machine with a GPU and the data
# already fetched (python -m edm_lightning.data fetch fashionmnist mnist animal-mnist --root data):
#   bash scripts/gpu_check.sh            # about 2-3 minutes on one modern GPU
set -euo pipefail
export WANDB_MODE=${WANDB_MODE:-disabled} PYTHONUNBUFFERED=1
OUT=${GPU_CHECK_DIR:-runs/gpu_check}
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible: this script is for machines with a GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0)}")
PY
for name in FashionMNIST MNIST AnimalMNIST; do
  [ -d "data/$name/raw" ] || { echo "data/$name is missing: fetch it first (see the header of this script)"; exit 1; }
done
GPU=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --trainer.enable_progress_bar false)

echo "== EDM ensemble: N=5 LeNet-5, 2 epochs on 20k FashionMNIST images, bf16-mixed"
start=$(date +%s)
python main.py fit --config configs/edm.yaml "${GPU[@]}" --trainer.max_epochs 2 --trainer.logger false \
  --trainer.default_root_dir "$OUT/edm" --trainer.callbacks.dirpath "$OUT/edm/checkpoints" \
  --data.init_args.train_size 20000 2>&1 | grep -E "val/|Epoch|Error|error" | tail -5 || true
echo "EDM fit wall time: $(( $(date +%s) - start )) s"
python main.py test --config configs/edm.yaml "${GPU[@]}" --trainer.logger false \
  --ckpt_path "$OUT/edm/checkpoints/best.ckpt" 2>&1 | grep -E "test/(acc|id/coherence|ood/coherence)" || true

echo "== KnockoffNets: 10k MNIST queries against EDM (keyed router), clone trained 3 epochs on the GPU"
start=$(date +%s)
python main.py fit --config configs/attack/knockoff.yaml "${GPU[@]}" --trainer.max_epochs 3 --trainer.logger false \
  --trainer.default_root_dir "$OUT/knockoff" --data.init_args.victim.checkpoint "$OUT/edm/checkpoints/best.ckpt" \
  --data.init_args.victim.router keyed --data.init_args.budget 10000 --data.init_args.cache_dir "$OUT/cache" \
  2>&1 | grep -E "val/(acc|agreement)|attack/queries|Error|error" | tail -5 || true
echo "KnockoffNets wall time: $(( $(date +%s) - start )) s"

echo "== Serving throughput on cuda (defended N=5 over one undefended member)"
python benchmarks/serving.py --device cuda --batches 20 --repeats 5

echo "== Experiment runner: a tiny experiment on cuda, bf16-mixed, 2 workers (a GPU each, or sharing one)"
start=$(date +%s)
python -m edm_lightning.experiment --config configs/experiment/fashionmnist.yaml --config configs/experiment/devices/gpu.yaml \
  --workers 2 --name gpu_check \
  --runs_dir "$OUT/experiments" --results_dir "$OUT/results" --wandb_project null --test_size 2000 \
  --target.train_size 10000 --target.epochs 1 --hashnet.epochs 1 --edm.train_size 10000 --edm.epochs 1 \
  --attacks '[{name: knockoff, surrogate: mnist, budgets: [5000], epochs: 2}]' 2>&1 | grep -E "^\[|error|Error" | tail -20
echo "experiment wall time: $(( $(date +%s) - start )) s"
cat "$OUT/results/gpu_check/results.md" | grep -E "^\| knockoff" || true
