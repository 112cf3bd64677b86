"""A batched HFSubject call keeps each reply with its prompt (moved from tests/test_safety_net.py, issue 21's safety net: shown to fail on the planted bug its
docstring names)."""

from __future__ import annotations

from conftest import UNSORTED_PROMPTS as PROMPTS
from conftest import make_tokenizer, tiny_causal_lm
from personafuse.evaluation.subjects import HFSubject


def test_hf_subject_keeps_each_reply_with_its_prompt() -> None:
    """A batched call must return, at position k, the reply prompt k gets on its own. Planted bug
    caught: HFSubject.generate storing a batch's replies in sorted order (``out[s + j]``)."""
    subj = HFSubject(tiny_causal_lm(init_range=0.3), make_tokenizer(), batch_size=4)
    alone = [subj.generate([p], max_new_tokens=5)[0].text for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS), "replies must differ for the order to be observable"
    together = [g.text for g in subj.generate(PROMPTS, max_new_tokens=5)]
    assert together == alone
