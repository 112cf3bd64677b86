"""Replies from a :class:`~personafuse.moe.model.PersonaFuseModel` (its ``generate``), and the
weights arguments every entry point takes.

Greedy replies run :func:`personafuse.moe.decoding.greedy_generate`; sampled ones run the same loop
with the shared sampler (:mod:`personafuse.sampling`: one generator per row seeded with ``seed``,
as the server and ``HFSubject`` sample). A base model whose generation config processes logits
(repetition penalty and the like) replies through transformers' ``generate``, which applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import CompileConfig

from personafuse.chat import Generation, eos_token_ids
from personafuse.moe.decoding import cache_kwarg, greedy_generate, plain_greedy, static_cache
from personafuse.moe.router import router_text
from personafuse.sampling import BatchSampler
from personafuse.traits import TraitError, weights_dict, weights_from_any

# Compiled generation sizes its KV cache in steps of this many positions: one graph serves prompts
# of any length within a step, for attention over at most this many unused positions.
CACHE_STEP = 256

Prompt = str | Sequence[Mapping[str, str]]

Weights = torch.Tensor | Sequence[float] | Sequence[Sequence[float]] | Mapping[str, float] | Sequence[Mapping[str, float]]


def weights_matrix(weights: Weights, what: str = "weights") -> torch.Tensor:
    """[rows, 10] float32 mixture weights from one vector or one per row: a tensor ([10] or
    [B, 10]), ten numbers, a ``{pole: weight}`` mapping, or a list of such rows. Every row is
    checked as :func:`~personafuse.traits.weights_from_any` checks one (length, poles, values >= 0,
    finite), and a bad one raises :class:`~personafuse.traits.TraitError` naming its row and entry."""
    if isinstance(weights, torch.Tensor):
        if weights.dim() not in (1, 2):
            raise TraitError(f"{what} must have shape [10] or [rows, 10], got {tuple(weights.shape)}")
        t = weights.detach().float().cpu()
        rows: list = [t.tolist()] if t.dim() == 1 else t.tolist()
    elif isinstance(weights, Mapping | str | bytes):
        rows = [weights]
    else:
        rows = list(weights)
        if not rows or not all(isinstance(r, Mapping) or _is_sequence(r) for r in rows):
            rows = [rows]  # one vector of numbers (or a bad one: weights_from_any names the entry)
    if len(rows) == 1:
        return torch.tensor([weights_from_any(rows[0], what=what)], dtype=torch.float32)
    return torch.tensor([weights_from_any(r, what=f"{what}[{i}]") for i, r in enumerate(rows)], dtype=torch.float32)


def _is_sequence(x: object) -> bool:
    return isinstance(x, Sequence | torch.Tensor) and not isinstance(x, str | bytes)


def prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a string or one conversation) or a batch of them, as a batch."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], Mapping)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def generate(model: Any, prompts: Prompt | Sequence[Prompt], routing: Any = None, *, weights: Weights | None = None,
             max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int = 8, seed: int | None = None, compile: bool | dict[str, Any] = False) -> list[Generation]:  # fmt: skip
    """``PersonaFuseModel.generate`` (its docstring says what each argument does)."""
    prompts = prompt_list(prompts)
    if not prompts:
        return []
    if weights is not None:
        w_all = weights_matrix(weights)
        if w_all.shape[0] == 1:
            w_all = w_all.expand(len(prompts), -1)
        if w_all.shape[0] != len(prompts):
            raise TraitError(f"weights has {w_all.shape[0]} rows for {len(prompts)} prompts")
    else:
        w_all = model.resolve_weights(prompts, routing)
    if seed is not None:
        torch.manual_seed(seed)  # transformers' generate (a base whose config processes logits) draws from it
    results: list[Generation | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(router_text(prompts[i])))
    sampling = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # filler rows repeat a prompt of the batch, so the real rows' padding stays as it is
        rows = idx + [idx[-1]] * (batch_size - len(idx)) if compile else idx
        enc = model.chat_inputs([prompts[i] for i in rows])
        with model.state.use(w_all[rows].to(model.device)):
            out = _decode(model, enc, max_new_tokens, compile, **sampling)
        new = out[:, enc["input_ids"].shape[1] :]
        for row, i in enumerate(idx):
            results[i] = _reply(model, new[row], w_all[i], int(enc["attention_mask"][row].sum()))
    return results  # type: ignore[return-value]


def _decode(model: Any, enc: dict[str, torch.Tensor], max_new_tokens: int, compile: bool | dict[str, Any], *,
            do_sample: bool, temperature: float, top_p: float, seed: int | None) -> torch.Tensor:  # fmt: skip
    """One batch's token ids (prompt and reply), the mixture weights already held."""
    base, pad = model.base_model, model.tokenizer.pad_token_id
    rows, prompt_len = enc["input_ids"].shape
    cache_len = -(-(prompt_len + max_new_tokens) // CACHE_STEP) * CACHE_STEP
    if plain_greedy(getattr(base, "generation_config", None)):
        pick = BatchSampler(rows, temperature, top_p, seed) if do_sample else None
        return greedy_generate(base, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                               pad_token_id=pad, compile=compile, cache_len=cache_len if compile else None, pick=pick)  # fmt: skip
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad}
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if compile:
        # the same held static cache: transformers compiles its forward for it (on CUDA) and, its
        # shape fixed, keeps that graph for the next call
        gen_kwargs[cache_kwarg(base)] = static_cache(base, rows, cache_len, keep=True)[0]
        if isinstance(compile, dict):
            gen_kwargs["compile_config"] = CompileConfig(**compile)
    return base.generate(**enc, **gen_kwargs)


def _reply(model: Any, ids: torch.Tensor, w: torch.Tensor, prompt_tokens: int) -> Generation:
    tok = model.tokenizer
    # every id that ends a reply, as the decoding loops stop on any of them
    eos = torch.tensor(sorted(eos_token_ids(tok, model.base_model)), dtype=torch.long, device=ids.device)
    n = int((ids != tok.pad_token_id).sum()) if tok.pad_token_id is not None else len(ids)
    stops = torch.isin(ids, eos).nonzero()
    eos_hit = len(stops) > 0
    return Generation(
        text=tok.decode(ids, skip_special_tokens=True).strip(),
        weights=weights_dict(w.tolist()),
        prompt_tokens=prompt_tokens,
        # the stop token counts, also where padding uses the same id
        completion_tokens=n + int(eos_hit and int(ids[stops[0, 0]]) == tok.pad_token_id),
        finish_reason="stop" if eos_hit else "length",
    )
