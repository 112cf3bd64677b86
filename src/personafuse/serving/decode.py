"""Batched decoding that streams every row separately, with rows joining and leaving between steps.

``model.generate`` returns whole replies; a server needs each row's new text as soon as it exists,
per-row sampling settings and per-row stopping, and (under load) new requests joining the batch
that is already decoding. :class:`Running` is such a batch: the KV cache over its rows' left-padded
tokens, the attention mask, each row's next position and its own ten mixture weights (routing is
decided once per sequence, so a row's cache stays valid for its whole life). Between steps rows
leave (:meth:`Running.filter`: finished, failed or cancelled) and join (:meth:`Running.merge`: a
:class:`Prefill` of newcomers, run in chunks so that a long prompt holds the running rows up for
one chunk at a time). The layout is the one transformers' own batched generation uses (left
padding, positions counting real tokens only), so a row's tokens are those it gets decoded alone;
TGI's first scheduler (``Batch.concatenate`` / ``Batch.filter``) worked the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from personafuse.chat import eos_token_ids
from personafuse.moe.decoding import cache_kwarg, output_cache
from personafuse.sampling import GREEDY_BELOW, row_generator, sample_row


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
    row: Any  # the row's tag: the index in a BatchDecode, the job in a scheduler
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
    def __init__(self, spec: RowSpec, tag: Any = None) -> None:
        self.spec = spec
        self.tag = tag  # who the row belongs to (the scheduler's job; BatchDecode: the row index)
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.done = False
        self.error: str | None = None
        self.reported = False  # its error event was sent
        self.generator = torch.Generator()
        try:  # the shared sampler's generator (personafuse.sampling), as generate and HFSubject seed theirs
            self.generator = row_generator(spec.seed)
        except (RuntimeError, ValueError, OverflowError, TypeError) as e:  # a seed torch cannot take
            self.fail(f"seed {spec.seed!r}: {e}")
        # Hold back enough characters that a stop string split across steps is never half-sent.
        self.holdback = max((len(s) for s in spec.stop), default=1) - 1

    def fail(self, message: str) -> None:
        self.done, self.error = True, message


def new_row(spec: RowSpec, tag: Any) -> _Row:
    """A row's decoding state (its tokens, text, sampler), for a :class:`Prefill`."""
    return _Row(spec, tag)


def _eos_ids(model: Any) -> set[int]:
    return set(eos_token_ids(model.tokenizer, model.base_model))


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
                # the shared sampler (personafuse.sampling): the same draw as chat's and eval's
                out[b] = sample_row(logits[b], row.spec.temperature, row.spec.top_p, row.generator)
        except Exception as e:  # whatever broke, it broke this row only
            row.fail(f"{type(e).__name__}: {e}")
    return out


class _Text:
    """Turns a row's tokens into the text deltas it may hand out: stop strings cut the reply, a
    possible stop-string prefix and an incomplete UTF-8 character are held back until resolved."""

    def __init__(self, model: Any) -> None:
        self.tok = model.tokenizer
        self.eos = _eos_ids(model)

    def event(self, row: _Row, final_reason: str | None) -> RowEvent | None:
        text = self.tok.decode(row.ids, skip_special_tokens=True).lstrip()
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
            return RowEvent(row.tag, delta, True, reason, len(row.ids))
        return RowEvent(row.tag, delta, completion_tokens=len(row.ids)) if delta else None

    def advance(self, row: _Row, tok_id: int) -> RowEvent | None:
        """Add this step's token to one row; returns the row's event, if it has one."""
        reason = None
        if tok_id in self.eos:
            reason = "stop"
        else:
            row.ids.append(tok_id)
            if len(row.ids) >= row.spec.max_new_tokens:
                reason = "length"
        ev = self.event(row, reason)
        if ev is not None and reason is not None and tok_id in self.eos:
            ev.completion_tokens = len(row.ids) + 1  # the end token was generated too
        return ev

    def step_events(self, rows: Sequence[_Row], next_ids: list[int]) -> list[RowEvent]:
        """This step's events; a row that fails here (or failed in sampling) ends alone with an
        ``error`` event, reported once."""
        events: list[RowEvent] = []
        for b, row in enumerate(rows):
            if not row.done:
                try:
                    ev = self.advance(row, next_ids[b])
                except Exception as e:  # one row's failure is that row's only
                    row.fail(f"{type(e).__name__}: {e}")
                    ev = None
                if ev is not None:
                    events.append(ev)
            if row.error is not None and not row.reported:
                row.reported = True
                events.append(RowEvent(row.tag, "", True, "error", len(row.ids), error=row.error))
        return events


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros put before its entries along ``dim`` until that dim is ``width`` long."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") or not hasattr(layer, "values") for layer in layers):
        raise TypeError(f"{type(cache).__name__}: rows can join and leave only a cache of per-layer key/value tensors")
    return layers


class Running:
    """Rows decoding together: see the module docstring. Built by :class:`Prefill`; rows leave with
    :meth:`filter` and join with :meth:`merge`; :meth:`step` samples every row's next token and runs
    the forward that gives the next logits."""

    def __init__(self, model: Any, rows: list[_Row], cache: Any, mask: torch.Tensor, next_pos: torch.Tensor,
                 weights: torch.Tensor, logits: torch.Tensor, mixture: bool = True) -> None:  # fmt: skip
        self.model, self.rows, self.cache = model, rows, cache
        self.mask, self.next_pos, self.weights, self.logits = mask, next_pos, weights, logits
        self.mixture = mixture  # False: the base model alone (experts off), the load benchmark's anchor
        self.text = _Text(model)
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.text.eos), 0)
        self.cache_kw = cache_kwarg(model.base_model)
        self.last_tokens = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Columns of the cache (the longest row's tokens, plus left padding)."""
        return self.mask.shape[1]

    def merge(self, other: Running) -> None:
        """Take ``other``'s rows into this batch: both sides are left-padded to one width (cache,
        mask), then stacked. Padding is masked, so no row's attention changes."""
        width = max(self.width, other.width)
        for mine, theirs in zip(_cache_layers(self.cache), _cache_layers(other.cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.weights = torch.cat([self.weights, other.weights.to(self.weights)])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows

    def filter(self) -> list[_Row]:
        """Drop the rows that are done; returns them. Columns that only the dropped rows used
        (all padding now) are cut from the left of the cache."""
        keep = [b for b, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return []
        gone = [row for row in self.rows if row.done]
        self.rows = [self.rows[b] for b in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        used = self.mask[idx].any(0).nonzero()
        start = int(used[0]) if len(used) else self.width
        for layer in _cache_layers(self.cache):
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]
        self.mask = self.mask[idx, start:]
        self.next_pos, self.weights, self.logits = self.next_pos[idx], self.weights[idx], self.logits[idx]
        return gone

    @torch.no_grad()
    def step(self, cancelled: Callable[[_Row], bool] | None = None) -> list[RowEvent]:
        """One decoding step: cancelled rows end, every other row gets its next token (events),
        finished rows leave, and the rest run one forward for their next logits."""
        for row in self.rows:
            if not row.done and cancelled is not None and cancelled(row):
                row.done = True
        self.last_tokens = sum(1 for row in self.rows if not row.done)  # tokens this step makes
        next_ids = _sample(self.logits, self.rows)
        events = self.text.step_events(self.rows, next_ids)
        alive = [b for b, row in enumerate(self.rows) if not row.done]
        tokens = [next_ids[b] for b in alive]
        self.filter()
        if self.rows:
            self._forward(torch.tensor(tokens, dtype=torch.long, device=self.mask.device)[:, None])
        return events

    def _forward(self, step: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        with self.model.mixture_weights(self.weights if self.mixture else None):
            out = self.model.base_model(
                input_ids=step, attention_mask=self.mask, position_ids=self.next_pos[:, None], use_cache=True,
                **{self.cache_kw: self.cache},
            )  # fmt: skip
        self.cache = output_cache(out)
        self.logits = out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1


class Prefill:
    """Newcomers' prompts through the model, ``chunk`` columns per :meth:`advance` (their left-padded
    width in one go when ``chunk`` is None), under each newcomer's own mixture weights. The last
    chunk returns a :class:`Running` batch of them, ready to step or to merge into another."""

    def __init__(self, model: Any, prompts: Sequence[Any], weights: torch.Tensor, rows: list[_Row], chunk: int | None = None,
                 mixture: bool = True) -> None:  # fmt: skip
        self.model, self.rows, self.chunk, self.mixture = model, rows, chunk, mixture
        enc = model.chat_inputs(list(prompts))
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        # Left padding: positions count real tokens only, exactly as HF generate does.
        self.pos = (self.mask.long().cumsum(-1) - 1).clamp(min=0)
        self.weights = weights.to(model.device)
        self.prompt_tokens: list[int] = self.mask.sum(1).tolist()
        self.done_cols = 0
        self.cache: Any = None
        self.cache_kw = cache_kwarg(model.base_model)

    @property
    def columns(self) -> int:
        return self.ids.shape[1]

    @torch.no_grad()
    def advance(self) -> Running | None:
        """Run the next chunk; the finished batch after the last one, else None."""
        start = self.done_cols
        end = self.columns if self.chunk is None else min(start + self.chunk, self.columns)
        kwargs = {self.cache_kw: self.cache} if self.cache is not None else {}
        with self.model.mixture_weights(self.weights if self.mixture else None):
            # logits_to_keep=1: only the last position's logits are needed (no [B, T, vocab] tensor).
            out = self.model.base_model(
                input_ids=self.ids[:, start:end], attention_mask=self.mask[:, :end], position_ids=self.pos[:, start:end],
                use_cache=True, logits_to_keep=1, **kwargs,
            )  # fmt: skip
        self.cache, self.done_cols = output_cache(out), end
        if end < self.columns:
            return None
        return Running(self.model, self.rows, self.cache, self.mask, self.pos[:, -1] + 1, self.weights, out.logits[:, -1, :],
                       self.mixture)  # fmt: skip


class BatchDecode:
    """Run-to-completion decoding of one batch (``personafuse serve --scheduler batch``, and the
    tests' reference): iterate to decode; each step yields the events (text deltas, finishes) of
    that step, ``RowEvent.row`` being the row's index.

    ``weights`` is [B, 10], one mixture per row. ``cancelled(row)`` lets a caller drop a row
    (a client that went away) without stopping the others."""

    def __init__(
        self,
        model: Any,
        prompts: Sequence[Any],
        weights: torch.Tensor,
        specs: Sequence[RowSpec],
        cancelled: Callable[[int], bool] | None = None,
    ) -> None:
        self.prefill = Prefill(model, prompts, weights, [_Row(s, tag=b) for b, s in enumerate(specs)])
        self.prompt_tokens = self.prefill.prompt_tokens
        self.cancelled = cancelled or (lambda _row: False)
        self.steps = 0

    def __iter__(self) -> Iterator[list[RowEvent]]:
        batch = None
        while batch is None:
            batch = self.prefill.advance()
        while len(batch):
            events = batch.step(lambda row: self.cancelled(row.tag))
            self.steps += 1
            if events:
                yield events
