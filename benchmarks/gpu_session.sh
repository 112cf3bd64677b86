#!/usr/bin/env bash
# Every GPU figure the open issues need, in one command that fits one lent device session
# (the device tool allows 600 s per command; each part has its own time box and writes its JSON
# as soon as it finishes, so a part that runs out of time loses only itself).
#
#   make gpu-assets                       # here: SmolLM2's config + tokenizer (3.4 MB) for part 4
#   run(command="OUT=$OUT bash benchmarks/gpu_session.sh", carry=["gpu-assets"], timeout_s=600)
#
# 1. one layer's seven projections per inference layout, eager and CUDA graph, with fp64 errors
# 2. mixture decode, eager (issue 2): random Llama-3.1-8B shapes, bf16, batch 32
# 3. mixture decode, static cache + torch.compile (issue 2)
# 4. stage-1 warm-up, one batched job vs ten peft runs (issue 4), SmolLM2 shapes, random weights
# STAGES=1 adds 5. peak memory of the warm-up and joint stages at batch 32 x 512 (issue 4;
# measured 2026-11-26 on an H100: docs/performance.md).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
SMALL=${SMALL:-0}  # SMALL=1: tiny shapes, for checking this script on a CPU
STAGES=${STAGES:-0}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
start=$SECONDS
part() {  # part NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, show the tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start))s"
    grep -v -i "warn" "$OUT/$name.log" | tail -10
}

if [ "$SMALL" = 1 ]; then
    KERNEL="--device cpu --dtype float32 --hidden 256 --kv 64 --inter 512 --rows 8 --iters 5"
    MIX="--device cpu --dtype float32 --batch 4 --prompt-len 8 --new-tokens 8"
    STAGE="--shape tiny --encoder-shape tiny --device cpu --dtype float32 --batch 4 --seq 64"
    WARM="--steps 2"
else
    KERNEL="--rows 32,512"
    MIX="--shape llama-3.1-8b --device cuda --dtype bfloat16 --batch 32 --prompt-len 32 --new-tokens 64"
    STAGE="--shape llama-3.1-8b --encoder-shape qwen2.5-0.5b --device cuda --dtype bfloat16 --batch 32 --seq 512"
    WARM="--steps 30"
fi

part expand_kernel 40 $PY benchmarks/expand_kernel.py $KERNEL --json "$OUT/expand_kernel.json"
part mixture_eager 80 $PY benchmarks/mixture_throughput.py $MIX --repeats 2 \
    --variants base,moe,moe_unfused --json "$OUT/gpu_eager.json"
part mixture_compile 220 $PY benchmarks/mixture_throughput.py $MIX --repeats 2 --compile \
    --variants base,moe,moe_unfused --json "$OUT/gpu_compile.json"
if [ -d gpu-assets/smollm2 ]; then
    part warmup_batched 110 $PY benchmarks/warmup_batched.py --model gpu-assets/smollm2 --random-init $WARM \
        --batch 8 --micro-batch 64 --json "$OUT/warmup_batched_gpu.json"
else
    echo "== warmup_batched skipped: gpu-assets/smollm2 missing (make gpu-assets, then carry it)"
fi
if [ "$STAGES" = 1 ]; then
    part stage_memory 120 $PY benchmarks/stage_throughput.py $STAGE --steps 1 --stages warmup,joint \
        --json "$OUT/stages_gpu.json"
fi
echo "== done in $((SECONDS - start))s; results in $OUT"
ls -l "$OUT"
