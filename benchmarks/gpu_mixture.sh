#!/usr/bin/env bash
# One-shot GPU measurement for docs/performance.md: random Llama-3.1-8B shapes, bf16, batch 32.
# Usage: OUT=results-dir bash benchmarks/gpu_mixture.sh
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
COMMON="--shape llama-3.1-8b --device cuda --dtype bfloat16 --batch 32 --prompt-len 32 --new-tokens 64"
timeout 300 python3 benchmarks/mixture_throughput.py $COMMON --repeats 2 --json "$OUT/gpu_eager.json" 2>&1 | grep -v -i warn
timeout 240 python3 benchmarks/mixture_throughput.py $COMMON --repeats 3 --compile --variants base,moe --json "$OUT/gpu_compile.json" 2>&1 | grep -v -i warn | tail -20
