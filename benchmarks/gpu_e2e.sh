#!/usr/bin/env bash
# The whole pipeline on a lent GPU, end to end, in under 5 minutes (issue 29, item 6): a short
# reproduce grid (queries -> Persona-CoT data from a stand-in teacher on loopback -> PersonaFuse
# trained -> base and PersonaFuse evaluated and replying) on a random model of
# Llama-3.1-8B width with few layers, then `personafuse serve --device cuda` under
# benchmarks/serve_load.py --compare. Prints every cell's device (what its model's parameters say)
# and time. The weights are made on the device (benchmarks/standins.py): nothing large is carried.
#
#   run(command="OUT=$OUT bash benchmarks/gpu_e2e.sh", timeout_s=420)      # on a lent GPU
#   bash benchmarks/gpu_e2e.sh --device cpu                               # here: tiny width, same path
#
# WIDTH (8b | 1.7b | tiny; default 8b on cuda, tiny on cpu), LAYERS (2), SERVE=0 skips the serving part.
set -euo pipefail
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
unset OPENAI_API_KEY OPENAI_BASE_URL
PY=${PY:-python3}
OUT=${OUT:-gpu-results}/e2e
LAYERS=${LAYERS:-2}
SERVE=${SERVE:-1}
if [ "$DEVICE" = cpu ]; then WIDTH=${WIDTH:-tiny}; DTYPE=float32; else WIDTH=${WIDTH:-8b}; DTYPE=bfloat16; fi
rm -rf "$OUT"; mkdir -p "$OUT"
t0=$SECONDS
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

# 1. stand-ins, made where they run
$PY benchmarks/standins.py --out "$OUT/assets" --family llama3 --width "$WIDTH" --layers "$LAYERS" --device "$DEVICE" --dtype "$DTYPE"
echo "assets: $((SECONDS - t0)) s"

# 2. the teacher on loopback
PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
$PY tests/stub_teacher.py --port "$PORT" --latency 0 > "$OUT/teacher.log" 2>&1 &
TEACHER=$!
trap 'kill $TEACHER 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  $PY -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break
  sleep 0.2
done

# 3. a short grid of the 8B preset, every model-loading cell on $DEVICE
mapfile -t SETS < <($PY - "$OUT" "$PORT" "$DEVICE" "$DTYPE" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import standins

out, port, device, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
url = f"http://127.0.0.1:{port}/v1"
sets = standins.preset_sets(out / "assets", url, url, launcher="", benchdata=Path("tests/fixtures/benchdata"))
sets = [s for s in sets if not s.startswith(("train_launcher=", "eval.judge_base_url=", "train.model.dtype=", "train.mixed_precision="))]
sets += ["train_launcher=null", "variants=[base, personafuse]", "eval.benchmarks=[tombench, gsm8k]",
         "eval.judge=null", f"train.model.dtype={dtype}", "train.mixed_precision=auto", f"eval.device={device}",
         f"eval.dtype={dtype}", "data.limit=304"]
print("\n".join(sets))
EOF
)
ARGS=()
for s in "${SETS[@]}"; do ARGS+=(--set "$s"); done
g0=$SECONDS
$PY -m personafuse.cli reproduce --config configs/reproduce/llama-3.1-8b.yaml --out "$OUT/grid" "${ARGS[@]}" 2> "$OUT/grid.stderr" \
  || { tail -40 "$OUT/grid.stderr"; tail -60 "$OUT/grid/reproduce.log" 2>/dev/null; exit 1; }
echo "grid: $((SECONDS - g0)) s"

# 4. each cell's device (the first line a model-loading command prints, read from its parameters;
#    a training cell's stage line) and time
$PY - "$OUT/grid" "$DEVICE" <<'EOF'
import json
import re
import sys
from pathlib import Path

grid, want = Path(sys.argv[1]), sys.argv[2]
log = (grid / "reproduce.log").read_text()
rows, wrong = [], []
for block in re.split(r"\n=== ", log)[1:]:
    name = block.split()[0]
    # eval / replies: the first line, from the model's parameters; training: each stage's line
    m = re.search(r"device (\S+), dtype (\S+)", block) or re.search(r"(?:process|\)) on (\w+), mixed precision", block)
    device = m.group(1).rstrip(",") if m else "-"
    done = grid / name / "done.json"
    seconds = json.loads(done.read_text())["seconds"] if done.is_file() else None
    rows.append((name, device, m.group(2) if m and m.lastindex == 2 else "", seconds))
    if m and not device.startswith(want):
        wrong.append(name)
print(f"{'cell':36} {'device':10} {'dtype':10} seconds")
for name, device, dtype, seconds in rows:
    print(f"{name:36} {device:10} {dtype:10} {seconds}")
if wrong:
    sys.exit(f"cells not on {want}: {', '.join(wrong)}")
EOF

# 5. the trained PersonaFuse served on the device, under load, beside the other schedulers
if [ "$SERVE" = 1 ]; then
  s0=$SECONDS
  $PY benchmarks/serve_load.py --model "pf:$OUT/grid/train/personafuse/seed0/joint/model" --device "$DEVICE" --compare \
    --port "$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")" \
    --clients 8 --requests 1 --open-requests 0 --sequential 2 --max-tokens 16 --time-limit 60 --json "$OUT/serve_load.json"
  echo "serve: $((SECONDS - s0)) s"
fi
echo "gpu_e2e on $DEVICE: $((SECONDS - t0)) s in all (target: under 300 s on a GPU)"
