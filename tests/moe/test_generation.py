"""PersonaFuseModel.generate keeps each reply with its prompt and its weights (moved from tests/test_safety_net.py, issue 21's safety net: shown to fail on the planted bug its
docstring names)."""

from __future__ import annotations

import torch

from conftest import UNSORTED_PROMPTS as PROMPTS
from conftest import build_tiny
from personafuse.traits import weights_dict


def test_personafuse_generate_keeps_each_reply_with_its_prompt_and_weights() -> None:
    """Per-prompt weights: reply k must carry row k and equal prompt k generated alone with it.
    Planted bug caught: PersonaFuseModel.generate storing replies by batch row (``results[start + row]``)."""
    pf = build_tiny(init_range=0.3)
    w = torch.eye(10)[[3, 0, 7, 5, 1, 9]]  # one expert each: rows are told apart by weights
    alone = [pf.generate([p], weights=w[k], max_new_tokens=5)[0] for k, p in enumerate(PROMPTS)]
    assert len({g.text for g in alone}) == len(PROMPTS), "replies must differ for the order to be observable"
    together = pf.generate(PROMPTS, weights=w, max_new_tokens=5, batch_size=4)
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.weights for g in together] == [weights_dict(row.tolist()) for row in w]
