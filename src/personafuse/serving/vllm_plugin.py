"""Per-request persona mixtures inside vLLM: a ``vllm.general_plugins`` entry point (``personafuse``).

``personafuse export DIR --stack`` writes the ten experts unweighted as one rank-10r LoRA. A
mixture is that adapter with its rank blocks scaled per sequence,
``y = W x + (alpha/r) B_cat diag(w ⊗ 1_r) A_cat x``: vLLM's Punica wrapper computes the shrink
``x A_cat^T`` into an fp32 buffer, then the expand; this plugin multiplies that buffer by a
per-token scale between the two. Each request sends its ten weights as
``vllm_xargs: {"personafuse_weights": [w_1, ..., w_10]}`` (``SamplingParams.extra_args``).

What is patched (read against vllm-project/vllm v0.32.0 as installed by ``make vllm-env``):

* ``PunicaWrapperCPU`` / ``PunicaWrapperGPU`` (``vllm/lora/punica_wrapper/punica_{cpu,gpu}.py``):
  ``__init__`` allocates the scale, ``[max_num_batched_tokens, max_lora_rank]`` fp32 ones, so it
  exists before any CUDA-graph capture or ``torch.compile``; ``add_shrink`` multiplies its output
  buffer by the scale's first ``num_tokens`` rows in place (one multiply by ones for tokens of
  other adapters or none).
* ``LoRAModelRunnerMixin.set_active_loras`` (``vllm/v1/worker/lora_model_runner_mixin.py``), called
  once per step with the step's ``InputBatch`` and tokens per request: the scale's rows are
  rewritten in place from each scheduled request's weights, in the batch's current order and for
  the tokens scheduled this step (a chunked prefill's chunk, one decode token), so reordering,
  chunking and finished requests (gone from the batch) need nothing more.
* ``InputProcessor.process_inputs`` (``vllm/v1/engine/input_processor.py``): a request for a stack
  adapter without valid weights is refused (HTTP 400) before it reaches the engine; the worker
  raises as well, should one get past (it would run all ten experts at full strength).
* ``_gen_lora_extra_hash_keys`` (``vllm/v1/core/kv_cache_utils.py``): prefix-cache block hashes
  include the weights, so two mixtures never share KV blocks.

The V1 model runner is patched; Model Runner V2 (``vllm/v1/worker/gpu/``, vLLM's GPU default when
Triton is present) keeps LoRA state elsewhere, so the plugin selects V1
(``VLLM_USE_V2_MODEL_RUNNER=0``) and refuses to run if V2 is asked for explicitly.

This module imports only the standard library at import time (vLLM loads every general plugin in
every process); torch and vLLM are imported inside :func:`register`.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

SUPPORTED_VLLM = "0.32"  # major.minor the patches were written against; pinned in requirements/vllm.txt
WEIGHTS_KEY = "personafuse_weights"
NUM_EXPERTS = 10
MIXTURE_FILE = "personafuse_mixture.json"
_PATCHED = "_personafuse_patched"


class VersionError(RuntimeError):
    """The running vLLM is not the minor version the patches were written for."""


def check_version(version: str) -> None:
    """Refuse any vLLM whose major.minor differs from :data:`SUPPORTED_VLLM`, naming both."""
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor != SUPPORTED_VLLM:
        raise VersionError(
            f"the personafuse vLLM plugin supports vLLM {SUPPORTED_VLLM}.x, but vLLM {version} is installed: "
            f"install vllm=={SUPPORTED_VLLM}.* (make vllm-env), or uninstall personafuse from this environment"
        )


def parse_weights(extra_args: dict[str, Any] | None) -> list[float] | None:
    """The request's ten weights from ``SamplingParams.extra_args``; None when it sends none; a
    ValueError naming the field when they are malformed."""
    if not extra_args or WEIGHTS_KEY not in extra_args:
        return None
    raw = extra_args[WEIGHTS_KEY]
    where = f"vllm_xargs.{WEIGHTS_KEY}"
    if not isinstance(raw, list | tuple) or len(raw) != NUM_EXPERTS:
        n = len(raw) if isinstance(raw, list | tuple) else type(raw).__name__
        raise ValueError(f"{where} must be a list of {NUM_EXPERTS} numbers, got {n}")
    out = []
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}[{i}] must be a finite number >= 0, got {v!r}")
        out.append(float(v))
    if not any(out):
        raise ValueError(f"{where} are all zero: a mixture needs at least one expert")
    return out


@lru_cache(maxsize=64)
def stack_info(lora_path: str) -> dict[str, Any] | None:
    """The stack adapter's ``personafuse_mixture.json`` (``"stack": true``), or None for any other
    adapter (a fixed persona, a foreign LoRA)."""
    f = Path(lora_path) / MIXTURE_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("stack") else None


def request_weights(lora_request: Any, extra_args: dict[str, Any] | None) -> list[float] | None:
    """The scale row's source for one request: its weights when it uses the stack adapter (an
    error when it sends none), None otherwise (weights sent with another adapter are ignored)."""
    if lora_request is None or stack_info(lora_request.lora_path) is None:
        return None
    w = parse_weights(extra_args)
    if w is None:
        raise ValueError(
            f"request for the personafuse stack adapter {lora_request.lora_name!r} sent no weights: "
            f"send vllm_xargs={{\"{WEIGHTS_KEY}\": [ten numbers]}} (personafuse serve --engine vllm does)"
        )
    return w


def scale_row(weights: list[float], expert_rank: int, width: int) -> list[float]:
    """w ⊗ 1_r, padded with ones to the buffer's width (the padding rank columns are zero in A)."""
    row = [w for w in weights for _ in range(expert_rank)]
    return row + [1.0] * (width - len(row))


# ------------------------------------------------------------------------------------ patches
def _patch_wrapper(cls: Any) -> None:
    import torch

    if getattr(cls, _PATCHED, False):
        return
    init, shrink = cls.__init__, cls.add_shrink

    def __init__(self: Any, max_num_batched_tokens: int, max_batches: int, device: Any, **kwargs: Any) -> None:
        init(self, max_num_batched_tokens, max_batches, device, **kwargs)
        cfg = kwargs.get("lora_config")
        width = int(getattr(cfg, "max_lora_rank", 0) or 512)  # 512: vLLM's largest rank
        # allocated here, before capture or compilation; only ever written in place afterwards
        self.personafuse_scale = torch.ones(max_num_batched_tokens, width, dtype=torch.float32, device=device)

    def add_shrink(self: Any, y: Any, x: Any, lora_a_stacked: Any, scale: float, **kwargs: Any) -> None:
        shrink(self, y, x, lora_a_stacked, scale, **kwargs)
        n = x.reshape(-1, x.shape[-1]).size(0)
        for buf in (y,) if isinstance(y, torch.Tensor) else y:  # GPU: [slices, n, r]; CPU: a tuple of [n, r]
            buf.mul_(self.personafuse_scale[:n, : buf.shape[-1]])

    cls.__init__, cls.add_shrink = __init__, add_shrink
    setattr(cls, _PATCHED, True)


def _wrappers(runner: Any) -> list[Any]:
    manager = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    return list(getattr(manager, "punica_wrapper_mapping", {}).values())


def _step_scale(runner: Any, input_batch: Any, num_scheduled_tokens: Any, width: int) -> Any:
    """[tokens this step, width] rows: each request's w ⊗ 1_r, repeated over its scheduled tokens."""
    import torch

    rows = []
    for req_id, n in zip(input_batch.req_ids, num_scheduled_tokens.tolist(), strict=False):
        state = runner.requests[req_id]
        params = state.sampling_params
        try:
            w = request_weights(state.lora_request, getattr(params, "extra_args", None))
        except ValueError as e:  # past the API's check (an offline engine, another entry point): loudly
            raise RuntimeError(f"personafuse plugin, request {req_id}: {e}") from None
        if w is None:
            row = [1.0] * width
        else:
            row = scale_row(w, int(stack_info(state.lora_request.lora_path)["expert_rank"]), width)  # type: ignore[index]
        rows.append(torch.tensor(row, dtype=torch.float32).expand(int(n), width))
    return torch.cat(rows) if rows else torch.empty(0, width)


def _patch_runner() -> None:
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    if getattr(LoRAModelRunnerMixin, _PATCHED, False):
        return
    original = LoRAModelRunnerMixin.set_active_loras

    def set_active_loras(self: Any, input_batch: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any) -> None:
        for wrapper in _wrappers(self):
            buf = wrapper.personafuse_scale
            rows = _step_scale(self, input_batch, num_scheduled_tokens, buf.shape[1])
            buf.fill_(1.0)
            buf[: rows.shape[0]].copy_(rows, non_blocking=True)
        return original(self, input_batch, num_scheduled_tokens, *args, **kwargs)

    LoRAModelRunnerMixin.set_active_loras = set_active_loras  # type: ignore[method-assign]
    setattr(LoRAModelRunnerMixin, _PATCHED, True)


def _patch_input_processor() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, _PATCHED, False):
        return
    original = InputProcessor.process_inputs

    def process_inputs(self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        lora_request = kwargs.get("lora_request", args[2] if len(args) > 2 else None)
        try:
            request_weights(lora_request, getattr(params, "extra_args", None))
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        return original(self, request_id, prompt, params, *args, **kwargs)

    InputProcessor.process_inputs = process_inputs  # type: ignore[method-assign]
    setattr(InputProcessor, _PATCHED, True)


def _patch_prefix_cache() -> None:
    from vllm.v1.core import kv_cache_utils

    original = kv_cache_utils._gen_lora_extra_hash_keys
    if getattr(original, _PATCHED, False):
        return

    def keys(request: Any) -> list[Any]:
        out = list(original(request))
        try:
            w = parse_weights(getattr(request.sampling_params, "extra_args", None))
        except ValueError:
            w = None  # refused at the API; never cached under a wrong key
        if w is not None and request.lora_request is not None:
            out.append(("personafuse", tuple(w)))
        return out

    setattr(keys, _PATCHED, True)
    kv_cache_utils._gen_lora_extra_hash_keys = keys


def _select_v1_runner() -> None:
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value is not None and value.strip().lower() in ("1", "true"):
        raise RuntimeError(
            "the personafuse vLLM plugin patches the V1 model runner; VLLM_USE_V2_MODEL_RUNNER=1 asks for V2: unset it"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # inherited by the engine and worker processes


def register() -> None:
    """The entry point vLLM calls in every process (``vllm.general_plugins``: ``personafuse``)."""
    import vllm

    check_version(vllm.__version__)
    _select_v1_runner()
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    _patch_wrapper(PunicaWrapperCPU)
    try:  # the Triton kernels behind it import only where Triton does
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
    except ImportError:
        PunicaWrapperGPU = None  # noqa: N806
    if PunicaWrapperGPU is not None:
        _patch_wrapper(PunicaWrapperGPU)
    _patch_runner()
    _patch_input_processor()
    _patch_prefix_cache()
