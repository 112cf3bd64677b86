#!/usr/bin/env bash
# GPU figures for the open issues, in one command that fits one lent device session (the device
# tool allows 600 s per command; each part has its own time box and writes its JSON as soon as it
# finishes, so a part that runs out of time loses only itself; the mixture parts rewrite theirs after
# every timed round, so one cut short keeps its finished rounds: "rounds_completed" in the JSON).
#
#   run(command="OUT=$OUT bash benchmarks/gpu_session.sh", timeout_s=560)      # the default parts, <= 9 min
#   make gpu-assets    # here, only for WARMUP=1: SmolLM2's config + tokenizer (3.4 MB); then carry=["gpu-assets"]
#
# Default part (issue 2, 2026-11-27: the figures the changes since the last device session move):
#   mixture decode, static cache + torch.compile: random Llama-3.1-8B shapes, bf16, batch 32,
#   128 new tokens, 5 rounds (~70 s of compilation per variant on an H100, ~80 s of tile timing),
#   through personafuse.moe.decoding.greedy_generate (no host sync per token): base vs moe vs
#   moe_tuned_act (the fused expand with tile sizes timed on the device, and the MLP's activation
#   fused into the gate/up expand); gpu_compile_personafuse.json. What tuning alone gains per kernel
#   is in its expand_tuned_configs (default_ms / best_ms); COMPILE_VARIANTS=base,moe,moe_tuned,
#   moe_tuned_act separates the two levers in tokens/s (~90 s more).
#   DECODERS=personafuse,generate adds transformers' generate (base vs moe; gpu_compile.json),
#   measured in run D (0.91x), ~3 min more.
#   Then, with whatever is left of the session's box (SESSION_BOX, 540 s) if that is >= 120 s,
#   profile_decode (PROFILE=auto): base, moe_tuned_act, moe, one compiled decode-shaped step each,
#   kernel time as CUDA-graph replay (profile_decode.json, rewritten after every variant), so a
#   ratio short of the target comes back with where the step's time went.
# Opt-in parts, measured on 2026-11-26 (docs/performance.md):
#   PROFILE=1 profile_decode whatever the time left: one compiled decode-shaped step, kernel by
#             kernel, CUDA-graph replay, and the host time torch.compile spends per call (~50 s a
#             variant; PROFILE=0 skips it)
#   EAGER=1   mixture decode, eager: default / fused / unfused expand (64 new tokens)
#   KERNEL=1  one layer's seven projections per inference layout, eager and CUDA graph, fp64 errors
#   WARMUP=1  stage-1 warm-up, one batched job vs ten peft runs (issue 4), SmolLM2 shapes, random weights
#   STAGES=1  peak memory of the warm-up and joint stages at batch 32 x 512 (issue 4)
# MIXTURE=0 skips the default parts; DECODERS / COMPILE_VARIANTS / GENERATE_VARIANTS / COMPILE_LIMIT /
# GENERATE_LIMIT / NEW_TOKENS / REPEATS adjust the compiled parts.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
SMALL=${SMALL:-0}  # SMALL=1: tiny shapes, for checking this script on a CPU
KERNEL=${KERNEL:-0}
MIXTURE=${MIXTURE:-1}
PROFILE=${PROFILE:-auto}  # auto: only if >= 120 s of SESSION_BOX are left after the parts before it
PROFILE_VARIANTS=${PROFILE_VARIANTS:-base,moe_tuned_act,moe}
SESSION_BOX=${SESSION_BOX:-540}  # seconds for the whole script (the device's run timeout minus a margin)
WARMUP=${WARMUP:-0}
STAGES=${STAGES:-0}
EAGER=${EAGER:-0}
COMPILE_VARIANTS=${COMPILE_VARIANTS:-base,moe,moe_tuned_act}  # the personafuse loop
GENERATE_VARIANTS=${GENERATE_VARIANTS:-base,moe}  # transformers' generate
COMPILE_LIMIT=${COMPILE_LIMIT:-450}
GENERATE_LIMIT=${GENERATE_LIMIT:-180}
DECODERS=${DECODERS:-personafuse}
NEW_TOKENS=${NEW_TOKENS:-}  # compiled part; default 128 (8 with SMALL=1)
REPEATS=${REPEATS:-5}  # timed rounds of the compiled part: ~1.3 s each per variant after ~70 s of compiling
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
start=$SECONDS
part() {  # part NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, show the tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start))s"
    grep -v -i "warn" "$OUT/$name.log" | tail -10
    return $rc
}

if [ "$SMALL" = 1 ]; then
    KERNEL_ARGS="--device cpu --dtype float32 --hidden 256 --kv 64 --inter 512 --rows 8 --iters 5"
    PROFILE_ARGS="--shape tiny --device cpu --dtype float32 --backend eager"
    MIX="--device cpu --dtype float32 --batch 4 --prompt-len 8 --new-tokens 8"
    NEW_TOKENS=${NEW_TOKENS:-8}
    STAGE="--shape tiny --encoder-shape tiny --device cpu --dtype float32 --batch 4 --seq 64"
    WARM="--steps 2"
else
    KERNEL_ARGS="--rows 32,512"
    PROFILE_ARGS=""
    MIX="--shape llama-3.1-8b --device cuda --dtype bfloat16 --batch 32 --prompt-len 32 --new-tokens 64"
    NEW_TOKENS=${NEW_TOKENS:-128}
    STAGE="--shape llama-3.1-8b --encoder-shape qwen2.5-0.5b --device cuda --dtype bfloat16 --batch 32 --seq 512"
    WARM="--steps 30"
fi

if [ "$KERNEL" = 1 ]; then
    part expand_kernel 40 $PY benchmarks/expand_kernel.py $KERNEL_ARGS --json "$OUT/expand_kernel.json"
fi
if [ "$MIXTURE" = 1 ]; then
    if [ "$EAGER" = 1 ]; then
        part mixture_eager 90 $PY benchmarks/mixture_throughput.py $MIX --repeats 2 \
            --variants base,moe,moe_fused,moe_unfused --json "$OUT/gpu_eager.json"
    fi
    for decoder in ${DECODERS//,/ }; do
        json="$OUT/gpu_compile_$decoder.json" limit=$COMPILE_LIMIT variants=$COMPILE_VARIANTS
        [ "$decoder" = generate ] && json="$OUT/gpu_compile.json" limit=$GENERATE_LIMIT variants=$GENERATE_VARIANTS
        # a failed part ends the session's mixture work: the device time left goes to a fix and a rerun
        part "mixture_compile_$decoder" "$limit" $PY benchmarks/mixture_throughput.py $MIX --new-tokens "$NEW_TOKENS" \
            --repeats "$REPEATS" --compile --decoder "$decoder" --variants "$variants" --json "$json" || break
    done
fi
profile_limit=150
if [ "$PROFILE" = auto ]; then
    profile_limit=$((SESSION_BOX - (SECONDS - start)))
    if [ "$profile_limit" -ge 120 ]; then PROFILE=1; else echo "== profile_decode skipped: ${profile_limit}s left"; fi
fi
if [ "$PROFILE" = 1 ]; then
    part profile_decode "$profile_limit" $PY benchmarks/profile_decode.py $PROFILE_ARGS --variants "$PROFILE_VARIANTS" \
        --json "$OUT/profile_decode.json"
fi
if [ "$WARMUP" = 1 ]; then
    if [ -d gpu-assets/smollm2 ]; then
        part warmup_batched 110 $PY benchmarks/warmup_batched.py --model gpu-assets/smollm2 --random-init $WARM \
            --batch 8 --micro-batch 64 --json "$OUT/warmup_batched_gpu.json"
    else
        echo "== warmup_batched skipped: gpu-assets/smollm2 missing (make gpu-assets, then carry it)"
    fi
fi
if [ "$STAGES" = 1 ]; then
    part stage_memory 120 $PY benchmarks/stage_throughput.py $STAGE --steps 1 --stages warmup,joint \
        --json "$OUT/stages_gpu.json"
fi
for f in "$OUT"/gpu_compile*.json; do  # the figures to record, one line per decoding loop
    [ -f "$f" ] && $PY -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1], r.get('setup', {}).get('decoder'), 'rounds', r.get('rounds_completed'), {k: round(v, 3) for k, v in r['ratios'].items()}, {k: round(v, 1) for k, v in r.get('tokens_per_s', {}).items()}, 'warm-up', r.get('warmup_s'), 'tuning', r.get('expand_tuning_s'), r.get('expand_tuned_configs'))" "$f"
done
echo "== done in $((SECONDS - start))s; results in $OUT"
ls -l "$OUT"
