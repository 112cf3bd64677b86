"""Training objectives (paper §4.3, SPEC §4).

    L_contrastive = 1/B sum_i [ sum_{j in P_i} (1 - s_ij)^2 + sum_{j in N_i} max(0, s_ij - m)^2 ]   eq. (3)
    L_trait       = 2/(B(B-1)) sum_{i<j} (1 - cos(h_i, h_j))                                      eq. (5)
    L_router      = L_contrastive + beta * L_trait                                                 eq. (6)
    L_joint       = L_lm + gamma * L_router                                                        eq. (2)

with s_ij = cos(h_i, e_j), P_i the poles active in p_i and N_i the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_MARGIN = 0.0  # not given in the paper: negatives are pushed to be orthogonal or opposite


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def contrastive_loss(
    h: torch.Tensor, expert_embeddings: torch.Tensor, p: torch.Tensor, margin: float = DEFAULT_MARGIN
) -> torch.Tensor:
    """Eq. (3): pull h_i towards its active experts' embeddings, push it below ``margin`` from the rest."""
    s = cosine_matrix(h, expert_embeddings.to(h.dtype))
    p = p.to(s.dtype)
    pos = p * (1 - s).pow(2)
    neg = (1 - p) * (s - margin).clamp(min=0).pow(2)
    return (pos + neg).sum(dim=1).mean()


def trait_consistency_loss(h: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (5): mean pairwise cosine distance within a batch whose queries share one p.

    With ``p`` given, only pairs whose activation vectors are identical count (for batches that
    mix vectors, e.g. stage 3 or pooled rare vectors); on a same-p batch this is exactly eq. (5).
    Zero when there is no such pair.
    """
    b = h.shape[0]
    if b < 2:
        return h.sum() * 0.0
    sim = cosine_matrix(h, h)
    iu = torch.triu_indices(b, b, offset=1, device=h.device)
    dist = 1 - sim[iu[0], iu[1]]
    if p is None:
        return dist.mean()
    same = (p[iu[0]] == p[iu[1]]).all(dim=-1).to(dist.dtype)
    return (dist * same).sum() / same.sum().clamp(min=1)


def router_loss(
    h: torch.Tensor,
    expert_embeddings: torch.Tensor,
    p: torch.Tensor,
    beta: float = 1.0,
    margin: float = DEFAULT_MARGIN,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. (6), L_router = L_contrastive + beta * L_trait: the one composition stages 2 and 3 train
    with. L_trait counts only pairs of queries that share their activation vector (the stage-2
    batches share one; the joint stage's uniform batches mostly do not). Returns the loss and its
    parts (as floats, for logging)."""
    lc = contrastive_loss(h, expert_embeddings, p, margin)
    lt = trait_consistency_loss(h, p)
    loss = lc + beta * lt
    return loss, {"contrastive": float(lc.detach()), "trait": float(lt.detach()), "router": float(loss.detach())}


def lm_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed next-token cross-entropy over positions whose label is not -100
    (response tokens only), and the number of such tokens. Summing first and normalising per step
    is what lets a step be split into micro-batches, processes, or per-expert groups exactly."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).to(tok.dtype)
    return (tok * mask).sum(1), mask.sum(1)


# Output-layer options that change logits after the LM head; models that set one take the plain path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_loss_sums(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lm_loss_sums` of ``model``'s logits, projecting only the positions that are scored.

    Prompt and padding positions never reach the LM head: with a masked prompt that skips most of
    the head's matmul and never builds the [batch, length, vocab] fp32 logits (8 GB at batch 32 x
    512 with Llama-3's 128k vocabulary). Same value as the plain path up to rounding; models whose
    logits are post-processed (soft-capping, scaling) take the plain path.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    config = getattr(lm, "config", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if head is None or body is None or any(getattr(config, a, None) for a in _LOGIT_POSTPROCESSING):
        return lm_loss_sums(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, labels)
    # use_cache=False: a loss needs no KV cache, and an activation-checkpointed layer that is handed
    # one appends to it again when its forward is replayed in backward
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    shift_labels = labels[:, 1:]
    keep = shift_labels != -100
    rows = keep.nonzero()[:, 0]
    logits = head(hidden[:, :-1][keep]).float()
    tok = F.cross_entropy(logits, shift_labels[keep], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return sums, keep.sum(1).to(tok.dtype)
