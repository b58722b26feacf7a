#!/bin/bash
# GPU check: a tiny EDM fit, a KnockoffNets attack on it, CIFAR-10-sized members (real data if fetched, else random
# images, said so), the serving benchmark and a tiny experiment, on cuda with bf16 mixed precision, printing the figures. Run from the repository root on a machine with a GPU and the data
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

echo "== CIFAR-10 members: EDM with N=5 VGG-16-BN on 3x32x32 inputs, bf16-mixed"
if [ -d data/cifar-10-batches-py ] && [ -d data/SVHN ]; then
  start=$(date +%s)
  python main.py fit --config configs/edm.yaml "${GPU[@]}" --trainer.max_epochs 1 --trainer.logger false \
    --trainer.default_root_dir "$OUT/edm_cifar10" --trainer.callbacks.dirpath "$OUT/edm_cifar10/checkpoints" \
    --data.init_args.dataset cifar10 --data.init_args.ood_dataset svhn --data.init_args.train_size 5000 \
    --model.init_args.arch vgg16_bn 2>&1 | grep -E "val/|Error|error" | tail -3 || true
  echo "CIFAR-10 EDM fit (1 epoch on 5k images) wall time: $(( $(date +%s) - start )) s"
else
  echo "CIFAR-10 or SVHN is not fetched here (it needs internet): the VGG-16-BN ensemble takes three training steps"
  echo "on RANDOM images instead - a check that it runs on this GPU, not a result"
  python - <<'PY'
import time, torch
from edm_lightning.models import EnsembleModule
model = EnsembleModule(arch="vgg16_bn", num_members=5, input_shape=(3, 32, 32)).cuda().train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x, y, x_ood = torch.rand(128, 3, 32, 32).cuda(), torch.randint(0, 10, (128,)).cuda(), torch.rand(128, 3, 32, 32).cuda()
start = time.perf_counter()
for step in range(3):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        id_logits, ood_logits = model.member_logits(x, x_ood)
        ce = torch.nn.functional.cross_entropy(id_logits.flatten(0, 1).float(), y.repeat(5))
        loss = ce + model.diversity(ood_logits.float().softmax(dim=-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
torch.cuda.synchronize()
print(f"random-image steps ran: loss {loss.item():.3f}, {(time.perf_counter() - start) / 3 * 1000:.0f} ms a step (batch 128 + 128 OOD)")
PY
fi

echo "== Serving throughput on cuda at batch 64 (defended N=5 over one undefended member; at most 10 minutes)"
timeout 600 python benchmarks/serving.py --device cuda --batches 20 --repeats 5 \
  || echo "serving benchmark failed or ran past 10 minutes (exit $?)"

echo "== Experiment runner: a tiny experiment on cuda, bf16-mixed, 2 workers (a GPU each, or sharing one)"
start=$(date +%s)
python -m edm_lightning.experiment --config configs/experiment/fashionmnist.yaml --config configs/experiment/devices/gpu.yaml \
  --workers 2 --name gpu_check \
  --runs_dir "$OUT/experiments" --results_dir "$OUT/results" --wandb_project null --test_size 2000 \
  --target.train_size 10000 --target.epochs 1 --hashnet.epochs 1 --edm.train_size 10000 --edm.epochs 1 \
  --attacks '[{name: knockoff, surrogate: mnist, budgets: [5000], epochs: 2}]' 2>&1 | grep -E "^\[|error|Error" | tail -20
echo "experiment wall time: $(( $(date +%s) - start )) s"
cat "$OUT/results/gpu_check/results.md" | grep -E "^\| knockoff" || true
