"""Sentence embeddings with plain transformers: mean pooling over tokens, then L2 normalisation —
the same vectors sentence-transformers gives for all-MiniLM-L6-v2 (Shop-MMLU's scorer) — and
last-token pooling for decoder LMs (the persona encoder's pooling)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SentenceEmbedder:
    model: object
    tokenizer: object
    pooling: str = "mean"  # "mean" | "last" | "cls"
    normalize: bool = True
    batch_size: int = 32
    max_length: int = 256

    @classmethod
    def from_pretrained(cls, path: str | None = None, *, pooling: str = "mean", **kw: object) -> SentenceEmbedder:
        from transformers import AutoModel, AutoTokenizer

        from personafuse.embedded import resolve

        path = path or resolve("minilm").path
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
        model.eval()
        return cls(model, tok, pooling=pooling, **kw)  # type: ignore[arg-type]

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        outs = []
        tok = self.tokenizer
        params = getattr(self.model, "parameters", None)
        device = next(params()).device if params is not None else None  # where the model is (--device)
        if self.pooling == "last":
            tok.padding_side = "left"  # type: ignore[attr-defined]
            if tok.pad_token is None:  # type: ignore[attr-defined]
                tok.pad_token = tok.eos_token  # type: ignore[attr-defined]
        for i in range(0, len(texts), self.batch_size):
            batch = [t if t else " " for t in texts[i : i + self.batch_size]]
            enc = tok(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")  # type: ignore[operator]
            if device is not None:
                enc = {k: v.to(device) for k, v in enc.items()}
            out = self.model(**enc)  # type: ignore[operator]
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            if self.pooling == "mean":
                v = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            elif self.pooling == "cls":
                v = h[:, 0]
            elif self.pooling == "last":
                v = h[:, -1]  # left padding puts every sequence's last token at the end
            else:
                raise ValueError(f"unknown pooling {self.pooling!r}; use mean, last or cls")
            if self.normalize:
                v = torch.nn.functional.normalize(v, p=2, dim=-1)
            outs.append(v.float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0)
