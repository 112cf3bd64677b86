"""One sampler (issue 33): the same prompt, settings and seed give the same sampled text in ``chat``
(``PersonaFuseModel.generate``), ``serve`` and ``eval`` (its PersonaFuse and HF subjects)."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import build_tiny
from personafuse.evaluation.subjects import HFSubject, PersonaFuseSubject
from personafuse.sampling import BatchSampler, sample_row
from personafuse.serving import ServeConfig, create_app
from serve_support import LiveServer

PROMPT = "i feel so anxious about my exam"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(init_range=0.3)  # wide logits: the draws differ from greedy and between seeds


def _served(url: str, seed: int, temperature: float, top_p: float, n: int, **extra) -> str:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": n, "temperature": temperature,
            "top_p": top_p, "seed": seed, **extra}  # fmt: skip
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"].strip()


def test_chat_serve_and_eval_sample_the_same_text(tiny) -> None:
    n = 12
    chat = {s: tiny.generate([PROMPT], do_sample=True, temperature=0.9, seed=s, max_new_tokens=n)[0].text for s in (3, 4)}
    nucleus = tiny.generate([PROMPT], do_sample=True, temperature=0.9, top_p=0.8, seed=3, max_new_tokens=n)[0].text
    greedy = tiny.generate([PROMPT], max_new_tokens=n)[0].text
    assert chat[3] != chat[4] and greedy not in chat.values()  # it does sample, and the seed matters
    # a batch-mate does not change a row's draws (one generator per row)
    assert tiny.generate([PROMPT, "write a poem"], do_sample=True, temperature=0.9, seed=3, max_new_tokens=n)[0].text == chat[3]
    subject = PersonaFuseSubject(tiny, {"mode": "router"})
    assert subject.generate([PROMPT], max_new_tokens=n, do_sample=True, temperature=0.9, seed=3)[0].text == chat[3]
    with LiveServer(create_app(tiny, ServeConfig(model_name="tiny", max_tokens_limit=32, batch_wait_ms=5))) as s:
        assert _served(s.url, 3, 0.9, 1.0, n) == chat[3]
        assert _served(s.url, 4, 0.9, 1.0, n) == chat[4]
        assert _served(s.url, 3, 0.9, 0.8, n) == nucleus


def test_hf_subject_samples_as_the_base_only_server(tiny) -> None:
    """HFSubject on a plain model draws what ``serve --base-only`` draws for the same seed."""
    n = 10
    hf = HFSubject(tiny.base_model, tiny.tokenizer, name="tiny")
    with tiny.mixture_weights(None):
        texts = {s: hf.generate([PROMPT], max_new_tokens=n, do_sample=True, temperature=0.8, seed=s)[0].text for s in (5, 6)}
    assert texts[5] != texts[6]
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=32, batch_wait_ms=5, base_only=True)
    with LiveServer(create_app(tiny, cfg)) as s:
        assert _served(s.url, 5, 0.8, 1.0, n) == texts[5]


def test_sampler_is_transformers_warpers_and_a_seeded_draw() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert [sample_row(logits, 0.7, 1.0, g1) for _ in range(20)] == [sample_row(logits, 0.7, 1.0, g2) for _ in range(20)]
    assert {sample_row(logits, 1.0, 0.0, g1) for _ in range(10)} == {0}  # top_p 0: the most likely token only
    with pytest.raises(ValueError, match="not finite"):
        sample_row(torch.tensor([float("nan"), 1.0]), 1.0, 1.0, g1)
    with pytest.raises(ValueError, match="temperature"):
        BatchSampler(2, 0.0)
