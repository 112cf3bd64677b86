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

# vLLM's rule (vllm-project/vllm, vllm/sampling_params.py, ``_SAMPLING_EPS``): a temperature below
# 1e-5 means greedy. Dividing logits by a smaller one overflows to inf and the softmax to NaN.
GREEDY_BELOW = 1e-5


@dataclass
class RowSpec:
    """Per-request decoding settings. ``temperature`` below :data:`GREEDY_BELOW` means greedy."""

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
    # Set when this row failed on its own (its sampling, its text): only this row ends, with
    # finish_reason "error"; the detail is for the server log, not for the client.
    error: str | None = None


class RowFailed(Exception):
    """A failure that belongs to one row; the other rows of the batch go on."""


class _Row:
    def __init__(self, spec: RowSpec) -> None:
        self.spec = spec
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.done = False
        self.error: str | None = None
        self.reported = False  # its error event was sent
        self.generator = torch.Generator()
        try:
            self.generator.manual_seed(spec.seed if spec.seed is not None else random.randrange(2**63))
        except (RuntimeError, ValueError, OverflowError, TypeError) as e:  # a seed torch cannot take
            self.fail(f"seed {spec.seed!r}: {e}")
        # Hold back enough characters that a stop string split across steps is never half-sent.
        self.holdback = max((len(s) for s in spec.stop), default=1) - 1

    def fail(self, message: str) -> None:
        self.done, self.error = True, message


def _eos_ids(model: Any) -> set[int]:
    return set(eos_token_ids(model.tokenizer, model.base_model))


def _sample_row(logits: torch.Tensor, spec: RowSpec, generator: torch.Generator) -> int:
    """One row's next token: temperature + nucleus sampling with the row's own generator (so a
    seeded request is reproducible whatever it is batched with). Raises :class:`RowFailed` when
    the probabilities are not usable (NaN logits), never returns a token drawn from garbage."""
    probs = torch.softmax(logits / spec.temperature, dim=-1)
    if spec.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < spec.top_p
        # top-p always keeps the most likely token (as vLLM's sampler does), so a tiny top_p is
        # greedy rather than an empty distribution.
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    total = probs.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0.0:
        raise RowFailed(f"next-token probabilities are not finite (temperature {spec.temperature})")
    return int(torch.multinomial(probs / total, 1, generator=generator))


def _sample(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """Next token per row: greedy below :data:`GREEDY_BELOW`, else sampled. A row whose logits or
    sampling fail is marked failed (``row.error``) and the others are unaffected."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    nan_rows = torch.isnan(logits).any(-1).tolist()
    for b, row in enumerate(rows):
        if row.done:
            continue
        try:
            if nan_rows[b]:
                raise RowFailed("the model produced NaN logits for this row")
            if row.spec.temperature >= GREEDY_BELOW:
                out[b] = _sample_row(logits[b], row.spec, row.generator)
        except Exception as e:  # whatever broke, it broke this row only
            row.fail(f"{type(e).__name__}: {e}")
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

    def _advance(self, b: int, row: _Row, tok_id: int) -> RowEvent | None:
        """Add this step's token to one row; returns the row's event, if it has one."""
        reason = None
        if tok_id in self.eos:
            reason = "stop"
        else:
            row.ids.append(tok_id)
            if len(row.ids) >= row.spec.max_new_tokens:
                reason = "length"
        ev = self._text_event(b, row, reason)
        if ev is not None and reason is not None and tok_id in self.eos:
            ev.completion_tokens = len(row.ids) + 1  # the end token was generated too
        return ev

    def _step_events(self, next_ids: list[int]) -> list[RowEvent]:
        """This step's events; a row that fails here (or failed in sampling) ends alone with an
        ``error`` event, reported once. Finished rows are fed the pad token from now on."""
        events: list[RowEvent] = []
        for b, row in enumerate(self.rows):
            if not row.done:
                try:
                    ev = self._advance(b, row, next_ids[b])
                except Exception as e:  # one row's failure is that row's only
                    row.fail(f"{type(e).__name__}: {e}")
                    ev = None
                if ev is not None:
                    events.append(ev)
            if row.error is not None and not row.reported:
                row.reported = True
                events.append(RowEvent(b, "", True, "error", len(row.ids), error=row.error))
            if row.done:
                next_ids[b] = self.pad_id
        return events

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
                events = self._step_events(next_ids)
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
                past = output_cache(out)
                logits = out.logits[:, -1, :]
