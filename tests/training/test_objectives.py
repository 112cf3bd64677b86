"""The joint objective's L_lm reaches the router through the mixture weights, checked against
finite differences (moved from tests/test_safety_net.py, issue 21's safety net: shown to fail on the planted bug its
docstring names)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import build_tiny, records_on_disk, train_config
from personafuse.training.config import StageConfig
from personafuse.training.stages import Featurizer, run_joint


def _no_dropout(module: nn.Module) -> None:
    # The step runs in train mode; finite differences need the same function it differentiated.
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _lm_loss(pf, feats: Featurizer, ks: list[int]) -> float:
    """L_lm of the joint stage on rows ``ks`` (token mean over the step), the mixture from the
    router, computed here in float64 from the model's logits (not with the training loss code)."""
    b, enc = feats.lm_batch(ks, "cpu"), feats.enc_batch(ks, "cpu")
    with torch.no_grad():
        w, _ = pf.router(enc["enc_ids"], enc["enc_mask"])
        logits = pf(b["input_ids"], weights=w, attention_mask=b["attention_mask"]).logits.double()
    labels = b["labels"][:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp[keep].gather(1, labels[keep].unsqueeze(1))
    return float(nll.sum() / keep.sum())


# Directions the gradient is checked along: the whole step, then each block of the router on its
# own (a block whose gradient were lost or mis-scaled shows there even if the total looks right).
BLOCKS = {
    "all": "router.",
    "expert embeddings": "router.expert_embeddings",
    "projection": "router.encoder.proj.",
    "encoder backbone": "router.encoder.backbone.",
}


def _fd_along(before, v: dict[str, torch.Tensor], feats: Featurizer, ks: list[int], eps: float) -> float:
    f = []
    for sign in (1, -1):
        probe = copy.deepcopy(before)
        with torch.no_grad():
            for n, p in probe.named_parameters():
                if n in v:
                    p.add_(sign * eps * v[n])
        f.append(_lm_loss(probe, feats, ks))
    return (f[0] - f[1]) / (2 * eps)


def test_joint_lm_loss_reaches_the_router_through_the_mixture_weights(tmp_path: Path) -> None:
    """One joint SGD step with gamma=0 (L_lm only): the router's update must be -lr times the
    finite-difference gradient of L_lm. Planted bug caught: ``self.pf.state.set(w.detach())`` in
    JointObjective.forward (the router then never moves)."""
    records = records_on_disk(tmp_path, 6, seed=5)
    lr = 1.0
    sc = StageConfig(steps=1, batch_size=6, micro_batch_size=6, lr=lr, optimizer="sgd", scheduler="constant",
                     warmup_ratio=0.0, max_grad_norm=None)
    tc = train_config(tmp_path, joint=sc, gamma=0.0, save_every=1000)
    pf = build_tiny(init_range=0.3).double()  # float64 LM; the router's cosines stay float32
    _no_dropout(pf)
    before = copy.deepcopy(pf)
    run_joint(pf, records, tc)

    names = [n for n, _ in pf.named_parameters() if n.startswith("router.")]
    after, start = dict(pf.named_parameters()), dict(before.named_parameters())
    step = {n: (after[n] - start[n]).detach() for n in names}  # = -lr * dL_lm/dtheta
    feats = Featurizer.for_model(records, before, tc)
    for block, prefix in BLOCKS.items():
        part = {n: d for n, d in step.items() if n.startswith(prefix)}
        size = float(torch.sqrt(sum((d**2).sum() for d in part.values())))
        assert size > 1e-3, f"{block}: L_lm did not reach it (update norm {size})"
        # Along the unit direction of the update, dL/dv = -|update| / lr. eps: the float32 cosines
        # make smaller steps rounding noise, larger ones curvature (measured: 0.05 % off at 1e-3).
        fd = _fd_along(before, {n: d / size for n, d in part.items()}, feats, list(range(len(records))), 1e-3)
        assert -size / lr == pytest.approx(fd, rel=5e-3), block
