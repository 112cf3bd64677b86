"""The embedded GGUF is converted once to a transformers checkpoint; the copy must be the same model."""

import os

import pytest
import torch

from personafuse import embedded

# slow too: 175 s and 62 s measured (2026-12-06, two shared cores under load ~13)
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_converted_gguf_equals_the_gguf(tmp_path, monkeypatch):
    src = embedded.resolve("default")
    monkeypatch.setenv("PERSONAFUSE_GGUF_CACHE", "0")
    direct = embedded.load_causal_lm(src).eval()
    direct_tok = embedded.load_tokenizer(src)
    assert embedded.converted(src) == src  # cache off: the GGUF itself

    monkeypatch.setenv("PERSONAFUSE_GGUF_CACHE", "1")
    monkeypatch.setenv("PERSONAFUSE_CACHE", str(tmp_path))
    conv = embedded.converted(src)
    assert conv.gguf_file is None and os.path.isfile(os.path.join(conv.path, "complete"))
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [os.path.basename(conv.path)]  # no temp left
    cached = embedded.load_causal_lm(src).eval()
    cached_tok = embedded.load_tokenizer(src)

    a, b = direct.state_dict(), cached.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    msgs = [{"role": "user", "content": "I feel anxious about my exam tomorrow."}]
    ids = direct_tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids2 = cached_tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(ids["input_ids"], ids2["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(direct(**ids).logits, cached(**ids2).logits, atol=0, rtol=0)
    # The backbone (the default persona encoder) comes from the same converted copy.
    body = embedded.load_backbone(src)
    assert torch.equal(body.state_dict()["norm.weight"], b["model.norm.weight"])


def test_unwritable_cache_falls_back_to_the_gguf(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("PERSONAFUSE_GGUF_CACHE", "1")
    monkeypatch.setenv("PERSONAFUSE_CACHE", str(blocker))
    src = embedded.resolve("default")
    with pytest.warns(UserWarning, match="could not cache the converted GGUF"):
        assert embedded.converted(src) == src
