#!/usr/bin/env bash
# One GPU benchmark session on one card: CIFAR-10 Config E (bf16, eager and torch.compile) against edm2-multi-gpu,
# Config G against NVIDIA's EDM2, the trainer end to end against its bare step (eager and compiled), and 18-step
# sampling against edm2-multi-gpu's sampler. Usage: benchmarks/run_gpu.sh MULTIGPU_CHECKOUT EDM2_CHECKOUT OUT_DIR [BATCH]
set -euo pipefail
multigpu=$1; official=$2; out=$3; batch=${4:-128}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
common=(--batch_size "$batch" --precision bf16 --min_run_time 2)
python3 benchmarks/benchmark_edm2.py --config configs/cifar10/E.yaml "${common[@]}" --compile \
  --compare_multigpu "$multigpu" --json "$out/cifar10_E_bf16_compile.json"
python3 benchmarks/benchmark_edm2.py --config configs/cifar10/E.yaml "${common[@]}" \
  --compare_multigpu "$multigpu" --json "$out/cifar10_E_bf16_eager.json"
python3 benchmarks/benchmark_edm2.py --config configs/cifar10/G.yaml "${common[@]}" --compile \
  --compare_official "$official" --json "$out/cifar10_G_bf16_compile.json"
python3 benchmarks/benchmark_edm2.py --config configs/cifar10/G.yaml "${common[@]}" \
  --compare_official "$official" --json "$out/cifar10_G_bf16_eager.json"
python3 benchmarks/benchmark_trainer.py --config configs/cifar10/E.yaml --batch_size "$batch" --steps 30 \
  --generated $((batch * 8)) --json "$out/trainer_cifar10_E.json"
python3 benchmarks/benchmark_trainer.py --config configs/cifar10/E.yaml --batch_size "$batch" --steps 30 \
  --generated $((batch * 8)) --set training.torch_compile=true --warmup 5 --json "$out/trainer_cifar10_E_compile.json"
python3 benchmarks/benchmark_trainer.py --config configs/digits/G.yaml --steps 100 --json "$out/trainer_digits_G.json"
for mode in "" --compile; do
  python3 benchmarks/benchmark_sampling.py --config configs/cifar10/E.yaml --compare_multigpu "$multigpu" \
    --batch_size "$batch" --precision bf16 $mode --json "$out/sampling_cifar10_E_bf16${mode/--/_}.json"
done
