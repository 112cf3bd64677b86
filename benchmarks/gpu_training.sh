#!/usr/bin/env bash
# One-shot GPU measurement of the stage-1 warm-up (docs/performance.md): one batched job vs ten
# sequential peft runs, random weights in the embedded SmolLM2-135M's shapes (only its config and
# tokenizer travel: `make gpu-assets` writes them to gpu-assets/smollm2, 3.4 MB; carry that folder).
# Usage on the GPU machine: OUT=results-dir bash benchmarks/gpu_training.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
W="python3 benchmarks/warmup_batched.py --model gpu-assets/smollm2 --random-init --steps 6"
timeout 200 $W --batch 2 --micro-batch 16 --json "$OUT/warmup_batched_gpu_b2.json" 2>&1 | grep -v -i "warn\|warmup:" | tail -6
timeout 200 $W --batch 8 --micro-batch 64 --json "$OUT/warmup_batched_gpu_b8.json" 2>&1 | grep -v -i "warn\|warmup:" | tail -6
