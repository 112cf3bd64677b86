"""A batched decode loop that streams every row separately.

``model.generate`` returns whole replies; a server needs each row's new text as soon as it exists,
per-row sampling settings and per-row stopping. This loop does one prefill over the left-padded
batch and then one forward per step with the KV cache, the ten mixture weights of every row held
for all steps (routing is decided once per sequence, so the cache stays valid).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from personafuse.chat import eos_token_ids
from personafuse.moe.decoding import cache_kwarg, output_cache


@dataclass
class RowSpec:
    """Per-request decoding settings. ``temperature`` 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class RowEvent:
    row: int
    delta: str
    finished: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0


class _Row:
    def __init__(self, spec: RowSpec) -> None:
        self.spec = spec
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.done = False
        self.generator = torch.Generator().manual_seed(
            spec.seed if spec.seed is not None else random.randrange(2**63)
        )
        # Hold back enough characters that a stop string split across steps is never half-sent.
        self.holdback = max((len(s) for s in spec.stop), default=1) - 1


def _eos_ids(model: Any) -> set[int]:
    return set(eos_token_ids(model.tokenizer, model.base_model))


def _sample(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """Next token per row: greedy where temperature is 0, else temperature + nucleus sampling with
    the row's own generator (so a seeded request is reproducible whatever it is batched with)."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    for b, row in enumerate(rows):
        t = row.spec.temperature
        if row.done or t <= 0:
            continue
        probs = torch.softmax(logits[b] / t, dim=-1)
        if row.spec.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < row.spec.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        out[b] = int(torch.multinomial(probs / probs.sum(), 1, generator=row.generator))
    return out


class BatchDecode:
    """Iterate to decode: each step yields the events (text deltas, finishes) of that step.

    ``weights`` is [B, 10], one mixture per row. ``cancelled(row)`` lets a caller drop a row
    (a client that went away) without stopping the others.
    """

    def __init__(
        self,
        model: Any,
        prompts: Sequence[Any],
        weights: torch.Tensor,
        specs: Sequence[RowSpec],
        cancelled: Callable[[int], bool] | None = None,
    ) -> None:
        self.model = model
        self.enc = model.chat_inputs(list(prompts))
        self.weights = weights.to(model.device)
        self.rows = [_Row(s) for s in specs]
        self.cancelled = cancelled or (lambda _row: False)
        self.prompt_tokens: list[int] = self.enc["attention_mask"].sum(1).tolist()
        self.eos = _eos_ids(model)
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos), 0)
        self.steps = 0

    def _text_event(self, b: int, row: _Row, final_reason: str | None) -> RowEvent | None:
        text = self.model.tokenizer.decode(row.ids, skip_special_tokens=True).lstrip()
        reason = final_reason
        for s in row.spec.stop:
            cut = text.find(s)
            if cut != -1:
                text, reason = text[:cut], "stop"
        if reason is None:
            # Not finished: keep back a possible stop-string prefix and an incomplete UTF-8 char.
            limit = len(text) - row.holdback
            while limit > 0 and text[limit - 1] == "\ufffd":
                limit -= 1
            text = text[: max(limit, len(row.sent))]
        delta = text[len(row.sent) :] if text.startswith(row.sent) else ""
        row.sent += delta
        if reason is not None:
            row.done = True
            return RowEvent(b, delta, True, reason, len(row.ids))
        return RowEvent(b, delta, completion_tokens=len(row.ids)) if delta else None

    @torch.no_grad()
    def __iter__(self) -> Iterator[list[RowEvent]]:
        model = self.model
        ids = self.enc["input_ids"]
        mask = self.enc["attention_mask"]
        # Left padding: positions count real tokens only, exactly as HF generate does.
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with model.mixture_weights(self.weights):
            # logits_to_keep=1: only the last position's logits are needed (saves a [B, T, vocab] tensor).
            out = model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
            )
            cache_kw = cache_kwarg(model.base_model)
            past = output_cache(out)
            logits = out.logits[:, -1, :]
            last_pos = pos[:, -1:]
            while True:
                for b, row in enumerate(self.rows):
                    if not row.done and self.cancelled(b):
                        row.done = True
                next_ids = _sample(logits, self.rows)
                events: list[RowEvent] = []
                for b, row in enumerate(self.rows):
                    if row.done:
                        next_ids[b] = self.pad_id
                        continue
                    tok_id = next_ids[b]
                    reason = None
                    if tok_id in self.eos:
                        reason = "stop"
                    else:
                        row.ids.append(tok_id)
                        if len(row.ids) >= row.spec.max_new_tokens:
                            reason = "length"
                    ev = self._text_event(b, row, reason)
                    if ev is not None:
                        if reason is not None and tok_id in self.eos:
                            ev.completion_tokens = len(row.ids) + 1  # the end token was generated too
                        events.append(ev)
                self.steps += 1
                if events:
                    yield events
                if all(r.done for r in self.rows):
                    return
                step = torch.tensor(next_ids, device=ids.device).unsqueeze(1)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                last_pos = last_pos + 1
                out = model.base_model(
                    input_ids=step,
                    attention_mask=mask,
                    position_ids=last_pos,
                    use_cache=True,
                    **{cache_kw: past},
                )
                past = getattr(out, cache_kw)
                logits = out.logits[:, -1, :]
