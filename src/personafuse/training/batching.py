"""Batching: records to padded tensors, and a step's rows to micro-batches.

:class:`Featurizer` tokenises every record once, on the LM side (query and response, prompt masked)
and the router side, and pads micro-batches. :func:`micro_batches` is the one accumulation pattern
of every stage: this process's share of a step's rows, in chunks, with DDP's gradient all-reduce
on the last chunk only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from personafuse.moe.model import PersonaFuseModel
from personafuse.moe.router import router_inputs
from personafuse.training.config import TrainConfig
from personafuse.training.plans import Row
from personafuse.training.records import Record, encode_record
from personafuse.traits import NUM_POLES


class Featurizer:
    """Tokenises records once (LM side and router side) and pads micro-batches."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        encoder_tokenizer: Any,
        max_length: int,
        encoder_max_length: int,
    ) -> None:
        self.records, self.tok, self.enc_tok = records, tokenizer, encoder_tokenizer
        self.max_length, self.encoder_max_length = max_length, encoder_max_length
        self._lm: dict[int, tuple[list[int], list[int]]] = {}

    @classmethod
    def for_model(cls, records: Sequence[Record], pf: PersonaFuseModel, tc: TrainConfig) -> Featurizer:
        return cls(records, pf.tokenizer, pf.encoder_tokenizer, tc.max_length, pf.config.encoder_max_length)

    def lm(self, k: int) -> tuple[list[int], list[int]]:
        if k not in self._lm:
            r = self.records[k]
            self._lm[k] = encode_record(self.tok, r.query, r.response, self.max_length)
        return self._lm[k]

    def lm_batch(self, ks: Sequence[int], device) -> dict[str, torch.Tensor]:
        pairs = [self.lm(k) for k in ks]
        width = max(len(ids) for ids, _ in pairs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(ks), width), pad, dtype=torch.long)
        labels = torch.full((len(ks), width), -100, dtype=torch.long)
        mask = torch.zeros((len(ks), width), dtype=torch.long)
        for row, (i, lab) in enumerate(pairs):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def response_tokens(self, k: int) -> int:
        return sum(1 for x in self.lm(k)[1][1:] if x != -100)

    def enc_batch(self, ks: Sequence[int], device) -> dict[str, torch.Tensor]:
        # The router's own input format (router_inputs), as PersonaFuseModel.route reads queries.
        enc = router_inputs(self.enc_tok, [self.records[k].query for k in ks], self.encoder_max_length)
        return {"enc_ids": enc["input_ids"].to(device), "enc_mask": enc["attention_mask"].to(device)}

    def p_batch(self, ks: Sequence[int], device) -> torch.Tensor:
        return torch.tensor(
            [list(self.records[k].p or (0,) * NUM_POLES) for k in ks], dtype=torch.float32, device=device
        )


def _chunks(rows: list[Row], size: int) -> list[list[Row]]:
    return [rows[i : i + size] for i in range(0, len(rows), max(size, 1))]


def by_length(feats: Featurizer, rows: list[Row]) -> list[Row]:
    """Rows sorted by token length, so micro-batches pad little. Only for losses that are sums of
    per-row terms (warm-up, SFT): there the grouping changes nothing but rounding."""
    return sorted(rows, key=lambda row: len(feats.lm(row[0])[0]))


def _sync_last(acc, objective: nn.Module, chunk: int, n_chunks: int):
    """Skip DDP's gradient all-reduce on every micro-batch but a step's last."""
    return acc.no_sync(objective) if chunk < n_chunks - 1 else contextlib.nullcontext()


def _shard(acc, rows: list[Row]) -> list[Row]:
    return rows[acc.process_index :: acc.num_processes]


def micro_batches(
    acc, objective: nn.Module, rows: list[Row], size: int, order: Callable[[list[Row]], list[Row]] | None = None
) -> Iterator[tuple[list[Row], float]]:
    """The one micro-batch / accumulation pattern of every stage: this process's share of a step's
    rows (``order`` may sort it), in chunks of ``size``, each with its fraction of that share; the
    caller's forward and backward run inside DDP's ``no_sync`` for every chunk but the last, so
    gradients are all-reduced once per step."""
    mine = _shard(acc, rows)
    if order is not None:
        mine = order(mine)
    chunks = _chunks(mine, size)
    for c, chunk in enumerate(chunks):
        with _sync_last(acc, objective, c, len(chunks)):
            yield chunk, len(chunk) / max(len(mine), 1)


def add_router_parts(totals: dict[str, float], parts: dict[str, float], frac: float) -> None:
    """Add one micro-batch's router-loss parts (losses.router_loss), weighted by its share of the
    step, to the step's ``loss_router`` / ``loss_contrastive`` / ``loss_trait``."""
    for k in ("router", "contrastive", "trait"):
        totals[f"loss_{k}"] = totals.get(f"loss_{k}", 0.0) + parts[k] * frac
