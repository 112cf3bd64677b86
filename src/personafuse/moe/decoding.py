"""Greedy decoding that keeps the accelerator busy: static KV cache, no host sync per token.

``model.generate`` reads ``unfinished_sequences.max() == 0`` on the host after every token
(transformers defers that read only on Apple GPUs), so on CUDA each step waits for the device,
then spends its own Python time while the device idles: the step costs GPU time *plus* host
time. At batch 32 on an H100 with a compiled 8B model the host half was a third of the step
(docs/performance.md), and every microsecond a model adds on the host shows in tokens/s.

This loop queues step after step and looks at the device only every ``check_every`` tokens, so
host work overlaps GPU work and a step costs whichever is longer. It returns what greedy
``generate`` returns for the same inputs (same tokens, same padding after EOS, same length;
tested against it), for any causal LM that accepts a ``StaticCache``. Mixture weights are set
around it as around ``generate``: ``with state.use(weights): greedy_generate(model, ...)``.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import StaticCache


def generate_compile_options() -> dict[str, Any]:
    """The torch.compile options ``generate`` uses for a static cache (transformers' CompileConfig
    defaults: inductor, CUDA graphs), so that "compiled" means the same thing in both loops."""
    from transformers import CompileConfig

    return CompileConfig().to_dict()


def cache_kwarg(model: nn.Module) -> str:
    """The name ``model.forward`` takes its KV cache under: transformers renamed
    ``past_key_values`` to ``cache`` (the old name warns from 5.2x on). Every caller that hands a
    cache to a forward reads it here (decoding, the server's decode loop, the data teachers)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under the name this transformers gives it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _last_logits(model: nn.Module, cache_kw: str, input_ids, attention_mask, position_ids, cache, cache_position):
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache_position=cache_position,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
    )
    return out.logits[:, -1]


# Compiled decode steps per model, then per set of options (see _decode_step).
_compiled: weakref.WeakKeyDictionary[nn.Module, dict[str, Callable]] = weakref.WeakKeyDictionary()
# One static cache per model, reused by the next call of the same batch size: fresh cache tensors
# would make CUDA graphs re-record (new addresses), a longer one would recompile (new shapes).
_caches: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, int, StaticCache]] = weakref.WeakKeyDictionary()


def static_cache(model: nn.Module, batch: int, length: int, keep: bool) -> tuple[StaticCache, int]:
    """A cache for ``batch`` rows of at least ``length`` positions, and its length; ``keep`` holds it
    for the next call (else a held one is still used, but a new one is not held)."""
    p = next(model.parameters())
    kind = (batch, p.dtype, p.device)
    held = _caches.get(model)
    if held is not None and held[0] == kind and held[1] >= length:
        held[2].reset()
        return held[2], held[1]
    if keep:
        length = max(length, held[1] if held is not None and held[0] == kind else 0)
    cache = StaticCache(config=model.config, max_cache_len=length)
    if keep:
        _caches[model] = (kind, length, cache)
    return cache, length


# GenerationConfig fields that make generate choose other tokens than a plain argmax, with their
# neutral values (transformers 5.2x defaults them to None, older releases to the neutral number).
_LOGITS_PROCESSING: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "num_return_sequences": (None, 1),
    "penalty_alpha": (None,),  # contrastive search
    "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,),
    "remove_invalid_values": (None, False),
    "token_healing": (None, False),
}


def plain_greedy(generation_config: Any) -> bool:
    """Whether greedy ``generate`` under this config is a plain argmax, i.e. what
    :func:`greedy_generate` computes (no penalties, bans, forced tokens, beams or stop strings)."""
    if generation_config is None:
        return True
    return all(getattr(generation_config, f, None) in ok for f, ok in _LOGITS_PROCESSING.items())


def _decode_step(model: nn.Module, options: dict[str, Any]) -> Callable:
    """The compiled decode step for this model and options.

    Each model gets its own copy of the step's code: Dynamo caches graphs, and counts recompiles
    against ``torch._dynamo.config.recompile_limit`` (8), per code object, and every model needs
    graphs of its own, so with one shared code object the ninth model of a process would silently
    decode eagerly. The copy, and the graphs cached on it, go when the model does."""
    steps = _compiled.setdefault(model, {})
    key = repr(sorted(options.items()))
    if key not in steps:
        fn = _last_logits
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
        steps[key] = torch.compile(own, **options)
    return steps[key]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    compile: bool | dict[str, Any] = False,
    check_every: int = 16,
    keep_cache: bool | None = None,
    cache_len: int | None = None,
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Greedy continuation of left-padded ``input_ids`` [B, T]; returns [B, T + n], n <= max_new_tokens.

    ``pick``: the next tokens [B] from the last logits [B, V] instead of their argmax: the shared
    sampler (:class:`personafuse.sampling.BatchSampler`) for sampled replies, on the same loop.

    ``eos_token_id`` / ``pad_token_id`` default to the model's generation config, as in ``generate``.
    ``compile``: True compiles the decode step with the options ``generate(cache_implementation=
    "static")`` uses (CUDA graphs); a dict gives ``torch.compile`` options of its own (e.g.
    ``{"backend": "eager"}``).
    The prefill runs eagerly, as in ``generate``. ``keep_cache`` (default: when compiling) holds
    the static cache for the next call of the same batch size, so CUDA graphs keep their addresses.
    ``cache_len``: positions of the static cache, at least ``T + max_new_tokens`` (the default);
    calls of different lengths that fit one size share one compiled graph (the cache's length is
    a shape the graph is specialised on), at the price of attending over the unused positions.

    Only the model's EOS and padding settings are read from its generation config; where that config
    processes logits (see :func:`plain_greedy`), use ``generate``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}")
    gen_config = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_config is not None:
        eos_token_id = gen_config.eos_token_id
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = getattr(gen_config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)

    batch, prompt_len = input_ids.shape
    device = input_ids.device
    total = prompt_len + max_new_tokens
    if cache_len is not None and cache_len < total:
        raise ValueError(f"cache_len {cache_len} is shorter than the prompt plus max_new_tokens ({total})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Inputs of fixed shapes, so one compiled graph serves every step: the mask covers the whole
    # cache (causality hides the positions not written yet), the token and positions are [B, 1].
    options = generate_compile_options() if compile is True else compile
    keep = bool(options) if keep_cache is None else keep_cache
    cache, cache_len = static_cache(model, batch, cache_len or total, keep)
    mask = attention_mask.new_ones(batch, cache_len)
    mask[:, :prompt_len] = attention_mask
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)  # as generate does for left padding
    next_position = positions[:, -1:] + 1
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    out = input_ids.new_full((batch, total), pad_token_id)
    out[:, :prompt_len] = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    finished_at = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)

    step = _decode_step(model, options) if options else _last_logits
    cache_kw = cache_kwarg(model)
    logits = _last_logits(model, cache_kw, input_ids, mask, positions, cache, torch.arange(prompt_len, device=device))
    cache_position = torch.tensor([prompt_len], device=device)
    for s in range(max_new_tokens):
        if s < min_new_tokens and len(eos):
            logits = logits.index_fill(1, eos, -float("inf"))  # as generate's min_new_tokens
        token = torch.where(unfinished, logits.argmax(-1) if pick is None else pick(logits), pad_token_id)
        out[:, prompt_len + s] = token
        if len(eos):
            stopped = unfinished & torch.isin(token, eos)
            finished_at.masked_fill_(stopped, s)
            unfinished &= ~stopped
            # The only host sync: every check_every tokens, is anything still running?
            if (s + 1) % check_every == 0 and not bool(unfinished.any()):
                break
        if s + 1 < max_new_tokens:
            if options:  # the previous step's outputs are consumed: CUDA graphs may reuse them
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(model, cache_kw, token[:, None], mask, next_position, cache, cache_position)
            next_position += 1
            cache_position += 1
    # generate stops after the step where the last row finished: cut the same columns
    n = min(int(finished_at.max()) + 1, max_new_tokens)
    return out[:, : prompt_len + n]
