"""The situation-aware router: persona encoder f_theta, projection to h_e, ten expert embeddings.

    h = proj(pool(f_theta(query)) - c)        pooling: last token (decoder LMs) or mean (encoders)
    w_i = softmax_i(cos(h, e_i) / tau)         paper eq. (1)

Everything here is trainable end to end (paper §4.1: the encoder is not frozen). ``c`` is a fixed
centre (the mean pooled encoding of the ten pole descriptions, set when a model is built): a decoder's
last-token states share one large direction (SmolLM2's pooled queries have a mean pairwise cosine of
0.81), and without removing it every query sits at nearly the same cosine to every expert, so the
weights stay flat and Openness-vs-Conscientiousness situations never separate (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personafuse.chat import Prompt, as_messages


def router_text(prompt: Prompt) -> str:
    """What the router reads: the whole conversation (system prompts excluded), oldest first, each
    turn prefixed by its role, so the latest user turn is last and survives left truncation. A
    training record's query is a one-turn conversation, so it reads as the query itself."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in as_messages(prompt) if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def router_inputs(encoder_tokenizer: Any, prompts: Sequence[Prompt], max_length: int) -> dict[str, torch.Tensor]:
    """The encoder's ``input_ids`` / ``attention_mask`` for these prompts: the one tokenisation
    used by training (stages 2 and 3) and inference (``PersonaFuseModel.route``). The tokenizer
    truncates from the left (set when the model is built), keeping the latest turn."""
    enc = encoder_tokenizer(
        [router_text(p) for p in prompts], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def is_decoder_backbone(backbone: nn.Module) -> bool:
    cfg = backbone.config
    archs = getattr(cfg, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if getattr(cfg, "is_decoder", False):
        return True
    # Models loaded from GGUF carry no architectures; fall back on the model type.
    return cfg.model_type in {
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "gpt2",
    }


class PersonaEncoder(nn.Module):
    """Any Hugging Face backbone + pooling + a linear projection to ``embed_dim``."""

    def __init__(self, backbone: nn.Module, embed_dim: int, pooling: str = "auto") -> None:
        super().__init__()
        if getattr(backbone, "pooler", None) is not None:
            # BERT-style pooler output is never used (we pool last_hidden_state ourselves); left in,
            # its weights would get no gradient and DDP would wait for them forever.
            backbone.pooler = None
        self.backbone = backbone
        if pooling == "auto":
            pooling = "last" if is_decoder_backbone(backbone) else "mean"
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last', 'mean' or 'auto', got {pooling!r}")
        self.pooling = pooling
        hidden = backbone.config.hidden_size
        self.proj = nn.Linear(hidden, embed_dim, bias=False, dtype=next(backbone.parameters()).dtype)
        # Zero (no centring) until set: checkpoints saved before it existed route as they did.
        self.register_buffer("center", torch.zeros(hidden, dtype=torch.float32))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        # Last real token, whichever side the padding is on.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.pool(out.last_hidden_state, attention_mask)
        return self.proj(pooled - self.center.to(pooled.dtype))

    @torch.no_grad()
    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled encoding before centring and projection."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.pool(out.last_hidden_state, attention_mask)


class Router(nn.Module):
    """Maps tokenised queries to a distribution over the ten experts."""

    def __init__(self, encoder: PersonaEncoder, num_experts: int, embed_dim: int, tau: float | Any = 1.0) -> None:
        """``tau``: a number, or an object whose ``.tau`` is read at every call: the model passes its
        config, so ``model.config.tau = x`` takes effect (one temperature, not a copy of it)."""
        super().__init__()
        self.encoder = encoder
        self.expert_embeddings = nn.Parameter(torch.randn(num_experts, embed_dim))
        self.tau_source: Any = tau if hasattr(tau, "tau") else SimpleNamespace(tau=float(tau))

    @property
    def tau(self) -> float:
        return self.tau_source.tau

    @tau.setter
    def tau(self, value: float) -> None:
        self.tau_source.tau = value

    def similarities(self, h: torch.Tensor) -> torch.Tensor:
        """s_bi = cos(h_b, e_i): [B, E], in float32 (bf16 cosines are coarse next to a small tau)."""
        e = self.expert_embeddings.float()
        return F.normalize(h.float(), dim=-1) @ F.normalize(e, dim=-1).T

    def weights_from_embeddings(self, h: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        tau = self.tau if tau is None else tau
        if not tau > 0:  # 0 divides by zero, a negative one turns the routing upside down
            raise ValueError(f"router temperature tau must be positive, got {tau!r}")
        return torch.softmax(self.similarities(h) / tau, dim=-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tau: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(weights [B, E], persona embeddings h [B, h_e])``."""
        h = self.encoder(input_ids, attention_mask)
        return self.weights_from_embeddings(h, tau), h
