"""What each stage minimises (paper §4.3, SPEC §4): one ``nn.Module`` per objective, whose
``forward`` returns one micro-batch's part of the step's loss, ready for ``backward``.

They are modules so that DDP / FSDP (through accelerate) see every parameter used in forward;
``trainable()`` names the parameters the stage trains.

The normalisation rule, shared by every objective: **a step's loss is the token-mean of its LM
loss over the step's response tokens, plus the row-mean of its router loss over the step's
rows.** A micro-batch contributes

    LM part      its summed token losses / the response tokens of the whole step (every
                 micro-batch, every process) x the number of processes
    router part  its batch-mean router loss x its share of this process's rows

so the parts of all micro-batches add up to the step's loss. The process factor undoes DDP's
gradient average over processes for the LM part, whose denominator already spans every process;
the router part has none because each process's parts already add up to its own row-mean, and
DDP's average over processes is the mean of those. The LM part is exact however a step is split
(micro-batches, processes: nothing but rounding changes). The router part is exact for
L_contrastive (a per-row mean) when processes hold equal numbers of rows; L_trait compares pairs
within one micro-batch only, so a ``micro_batch_size`` below the step's rows leaves out the pairs
that straddle micro-batches.

Where the stages differ, and why:

- warm-up: the token-mean is taken per expert, over that expert's rows of the step, and summed over
  the experts, so the batched job of ten experts is exactly ten separate runs (each expert's loss
  does not depend on how many tokens the other experts' records have);
- router: the router part alone (the experts are frozen);
- joint: both parts, ``L_joint = L_lm + gamma * L_router`` (:class:`JointObjective`);
- Random Route and SFT: the LM part alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from personafuse.moe.model import PersonaFuseModel
from personafuse.moe.routing import Routing
from personafuse.training.losses import causal_lm_loss_sums, router_loss


def lm_part(sums: torch.Tensor, step_tokens: int, processes: int) -> torch.Tensor:
    """One micro-batch's part of the step's token-mean LM loss (see the module's rule): its
    per-row token-loss sums over the step's response tokens, times the number of processes."""
    return sums.sum() / max(step_tokens, 1) * processes


class WarmupObjective(nn.Module):
    """Stage 1: ``sum_i L_lm(expert i)``, each expert's LM loss a token-mean over that expert's rows
    of the step, each row run through its own expert only."""

    def __init__(self, pf: PersonaFuseModel) -> None:
        super().__init__()
        self.pf = pf

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.pf.expert_parameters()

    def forward(
        self, input_ids, attention_mask, labels, experts, *, expert_tokens: Sequence[int], processes: int
    ) -> torch.Tensor:
        """``experts``: each row's expert; ``expert_tokens``: for each row, the step's response
        tokens of that row's expert (plain numbers: FSDP would cast a float tensor input)."""
        # set_experts(), not use(): the experts must stay in place for activation-checkpointing
        # recompute during backward. One expert per row: only its rank-r adapter runs.
        self.pf.state.set_experts(experts)
        sums, _ = causal_lm_loss_sums(self.pf.base_model, input_ids, attention_mask, labels)
        denom = torch.tensor(list(expert_tokens), dtype=torch.float32, device=sums.device)
        return (sums / denom.clamp(min=1)).sum() * processes


class RouterObjective(nn.Module):
    """Stage 2: ``L_router = L_contrastive + beta * L_trait`` (:func:`losses.router_loss`) of the
    router's query embeddings against the expert embeddings; the experts are not involved."""

    def __init__(self, pf: PersonaFuseModel, beta: float, margin: float) -> None:
        super().__init__()
        self.pf, self.beta, self.margin = pf, beta, margin

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.pf.router_parameters()

    def forward(self, enc_ids, enc_mask, p, *, row_share: float) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's part of the step's L_router, and its batch-mean parts (floats, to log)."""
        h = self.pf.router.encoder(enc_ids, enc_mask)
        l_router, parts = router_loss(h, self.pf.router.expert_embeddings, p, self.beta, self.margin)
        return l_router * row_share, parts


class JointObjective(nn.Module):
    """Stage 3, the joint loss (paper eq. 2):

        L_joint  = L_lm + gamma * L_router
        L_router = L_contrastive + beta * L_trait      (losses.router_loss, eq. 6)

    with the mixture live: the router's weights ``w`` mix the experts in the base model, so L_lm
    reaches the router through ``w`` as well as L_router does directly. L_lm is the token-mean over
    the step's response tokens, L_router the row-mean over its rows (the module's rule)."""

    def __init__(self, pf: PersonaFuseModel, beta: float, margin: float, gamma: float) -> None:
        super().__init__()
        self.pf, self.beta, self.margin, self.gamma = pf, beta, margin, gamma

    def trainable(self) -> dict[str, nn.Parameter]:
        return {**self.pf.expert_parameters(), **self.pf.router_parameters()}

    def forward(
        self,
        input_ids,
        attention_mask,
        labels,
        enc_ids,
        enc_mask,
        p,
        *,
        step_tokens: int,
        row_share: float,
        processes: int,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """This micro-batch's part of L_joint (to backward), its LM part (detached, to log) and its
        router loss's batch-mean parts (floats, to log)."""
        w, h = self.pf.router(enc_ids, enc_mask)
        # The LM loss reaches the router through w (tests/test_safety_net.py); kept set for
        # activation-checkpointing recompute (see WarmupObjective).
        self.pf.state.set(w)
        sums, _ = causal_lm_loss_sums(self.pf.base_model, input_ids, attention_mask, labels)
        l_lm = lm_part(sums, step_tokens, processes)
        l_router, parts = router_loss(h, self.pf.router.expert_embeddings, p, self.beta, self.margin)
        return l_lm + self.gamma * l_router * row_share, l_lm.detach(), parts


class RandomRouteObjective(nn.Module):
    """The joint stage of the Random Route k baseline: L_lm alone (token-mean over the step's
    response tokens) under k experts drawn at random per sequence (weights from
    :func:`random_route_weights`) in place of the router's; only the experts train."""

    def __init__(self, pf: PersonaFuseModel) -> None:
        super().__init__()
        self.pf = pf

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.pf.expert_parameters()

    def forward(self, input_ids, attention_mask, labels, weights, *, step_tokens: int, processes: int) -> torch.Tensor:
        self.pf.state.set(weights)  # kept set for activation-checkpointing recompute
        sums, _ = causal_lm_loss_sums(self.pf.base_model, input_ids, attention_mask, labels)
        return lm_part(sums, step_tokens, processes)


def random_route_weights(k: int, seed: int, step: int, rows: Sequence[int]) -> torch.Tensor:
    """[len(rows), 10]: k distinct experts at 1/k for each record of this step, drawn as inference's
    ``Routing("random", k, seed)`` draws them, keyed by (step, record): the same however the step
    is split into micro-batches or processes, and after a resume."""
    return Routing("random", k=k, seed=seed).resolve(len(rows), keys=[f"step{step}:record{r}" for r in rows])


class SFTObjective(nn.Module):
    """The single-LoRA baselines: L_lm alone, token-mean over the step's response tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def trainable(self) -> dict[str, nn.Parameter]:
        # peft marks its adapter trainable and freezes the rest (get_peft_model)
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def forward(self, input_ids, attention_mask, labels, *, step_tokens: int, processes: int) -> torch.Tensor:
        sums, _ = causal_lm_loss_sums(self.model, input_ids, attention_mask, labels)
        return lm_part(sums, step_tokens, processes)
