"""personafuse.moe.decoding.greedy_generate against transformers' greedy generate, token for token."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny
from personafuse.moe.decoding import greedy_generate

PROMPT_LEN = 9


def _batch(seed: int = 1):
    """Four left-padded prompts (two with padding) and four different mixtures."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 160, (4, PROMPT_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    weights = torch.softmax(torch.randn(4, 10, generator=g) * 2, dim=-1)
    return ids, mask, weights


def _hf(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, temperature=None, top_p=None,
                          top_k=None, pad_token_id=0, **kw)  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma"])
def test_greedy_generate_equals_generate_with_eos_stops(kind):
    pf = build_tiny(base_kind=kind)
    model = pf.base_model
    ids, mask, w = _batch()
    with pf.state.use(w):
        free = greedy_generate(model, ids, mask, max_new_tokens=20, eos_token_id=[], pad_token_id=0)
        new = free[:, PROMPT_LEN:]
        assert new.shape == (4, 20)
        assert len({tuple(r) for r in new.tolist()}) == 4  # the rows really differ
        # EOS sets that stop: one row early, every row (generate ends the batch), and a stop
        # between two host checks (check_every=5) so that trimming must undo the extra steps.
        cases = [[int(new[1, 2])], [int(new[r, 3 + r]) for r in range(4)], [int(new[r, 0]) for r in range(4)]]
        for eos in cases:
            for min_new in (0, 4):
                ref = _hf(model, ids, mask, max_new_tokens=20, min_new_tokens=min_new, eos_token_id=eos)
                got = greedy_generate(model, ids, mask, max_new_tokens=20, min_new_tokens=min_new,
                                      eos_token_id=eos, pad_token_id=0, check_every=5)  # fmt: skip
                assert got.shape == ref.shape, (eos, min_new)
                assert torch.equal(got, ref), (eos, min_new)
        # the all-rows case really ended early, and min_new_tokens really suppressed EOS
        assert greedy_generate(model, ids, mask, max_new_tokens=20, eos_token_id=cases[2]).shape[1] == PROMPT_LEN + 1
        longer = greedy_generate(model, ids, mask, max_new_tokens=20, min_new_tokens=4, eos_token_id=cases[2])
        assert longer.shape[1] > PROMPT_LEN + 4


def test_greedy_generate_compiled_step_equals_eager_and_defaults_to_generation_config():
    pf = build_tiny()
    model = pf.base_model
    ids, mask, w = _batch(2)
    with pf.state.use(w):
        eager = greedy_generate(model, ids, mask, max_new_tokens=12)
        traced = greedy_generate(model, ids, mask, max_new_tokens=12, compile={"backend": "eager", "fullgraph": True})
        # generate's own compile options (inductor; CUDA graphs where there is CUDA)
        compiled = greedy_generate(model, ids, mask, max_new_tokens=12, compile=True)
        ref = _hf(model, ids, mask, max_new_tokens=12)  # eos 3 and pad 0 from the model's config
    assert torch.equal(eager, traced)
    assert torch.equal(eager, compiled)
    assert torch.equal(eager, ref)
    # the mixture is applied: other weights, other tokens
    with pf.state.use(w.flip(0)):
        assert not torch.equal(greedy_generate(model, ids, mask, max_new_tokens=12), eager)


def test_greedy_generate_reuses_its_cache_across_lengths_and_batches():
    """The static cache outlives a call (CUDA graphs keep their addresses); a shorter run in a longer
    cache, and another batch size, still give generate's tokens."""
    from personafuse.moe import decoding

    pf = build_tiny()
    model = pf.base_model
    ids, mask, w = _batch(3)
    with pf.state.use(w):
        greedy_generate(model, ids, mask, max_new_tokens=6)
        assert model not in decoding._caches  # eager: nothing held after the call by default
        greedy_generate(model, ids, mask, max_new_tokens=20, eos_token_id=[], keep_cache=True)
        first_cache = decoding._caches[model][2]
        short = greedy_generate(model, ids, mask, max_new_tokens=6)
        assert decoding._caches[model][2] is first_cache  # reused, 29 positions for a 15-token run
        assert torch.equal(short, _hf(model, ids, mask, max_new_tokens=6))
    with pf.state.use(w[:2]):
        two = greedy_generate(model, ids[:2], mask[:2], max_new_tokens=6, keep_cache=True)
        assert decoding._caches[model][0][0] == 2  # now the cache for two rows is held
        assert torch.equal(two, _hf(model, ids[:2], mask[:2], max_new_tokens=6))
    assert torch.equal(two, short[:2, : two.shape[1]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "check_every": 0}, "check_every"),
        ({"max_new_tokens": 4, "cache_len": 3}, "cache_len 3"),
    ],
)
def test_greedy_generate_rejects_bad_arguments(kwargs, message):
    pf = build_tiny(randomise=False)
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match=message):
        greedy_generate(pf.base_model, ids, mask, **kwargs)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_generate(pf.base_model, ids[0], max_new_tokens=2)


def test_model_generate_decodes_greedily_with_the_fast_loop_unless_the_config_processes_logits():
    from personafuse.moe import decoding

    pf = build_tiny()
    model = pf.base_model
    prompts = ["i feel so anxious", [{"role": "user", "content": "write a poem about my boss, please"}], "x"]
    w = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(8)) * 2, dim=-1)
    assert decoding.plain_greedy(model.generation_config)
    hf_calls = []
    hf_generate = model.generate
    model.generate = lambda *a, **k: hf_calls.append(k) or hf_generate(*a, **k)
    fast = pf.generate(prompts, weights=w, max_new_tokens=12, batch_size=2, compile={"backend": "eager"})
    assert not hf_calls and decoding._caches[model][0][0] == 2  # greedy_generate ran, its cache held
    held = decoding._caches[model][2]
    # A processor that cannot fire within 12 tokens: generate's own loop, the same tokens expected.
    model.generation_config.no_repeat_ngram_size = 100
    assert not decoding.plain_greedy(model.generation_config)
    slow = pf.generate(prompts, weights=w, max_new_tokens=12, batch_size=2, compile={"backend": "eager"})
    assert len(hf_calls) == 2  # transformers' generate ran, on the same held static cache
    cache_kw = decoding.cache_kwarg(model)
    assert all(k[cache_kw] is held for k in hf_calls) and decoding._caches[model][2] is held
    del model.generate
    assert [g.text for g in fast] == [g.text for g in slow]
    assert [(g.completion_tokens, g.finish_reason) for g in fast] == [
        (g.completion_tokens, g.finish_reason) for g in slow
    ]
    assert len({g.text for g in fast}) == 3


def test_compiled_model_generate_fills_every_batch_so_one_graph_serves_every_call():
    """Five prompts at batch_size 2 make batches of 2, 2 and 1; a later call sends 3. Compiled, every
    batch is filled to 2 rows, so the decode step compiles once (a batch of 1 would compile again),
    and the replies are the uncompiled ones, one per prompt."""
    from torch._dynamo.testing import CompileCounter

    pf = build_tiny()
    prompts = ["i feel so anxious", "x", "solve 2x + 3 = 7", "plan a party with me", "why?"]
    w = torch.softmax(torch.randn(5, 10, generator=torch.Generator().manual_seed(3)) * 2, dim=-1)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = pf.generate(prompts, weights=w, max_new_tokens=6, batch_size=2, compile={"backend": counter})
    again = pf.generate(prompts[:3], weights=w[:3], max_new_tokens=6, batch_size=2, compile={"backend": counter})
    eager = pf.generate(prompts, weights=w, max_new_tokens=6, batch_size=2)
    assert counter.frame_count == 1
    assert len(compiled) == 5 and len(again) == 3
    assert [g.text for g in compiled] == [g.text for g in eager]
    assert [g.text for g in again] == [g.text for g in eager[:3]]
    assert [g.weights for g in compiled] == [g.weights for g in eager]
    assert [(g.prompt_tokens, g.completion_tokens) for g in compiled] == [
        (g.prompt_tokens, g.completion_tokens) for g in eager
    ]


def test_each_model_compiles_its_own_decode_step_so_dynamos_recompile_limit_is_per_model():
    """Dynamo stops compiling a code object after recompile_limit graphs and runs it eagerly from
    then on. Every model needs graphs of its own, so a step shared by all models would decode the
    (limit + 1)-th model of a process eagerly; each model has its own copy, freed with it."""
    import gc
    import weakref

    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    models = []
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            pf = build_tiny()
            ids, mask, w = _batch(2)
            with pf.state.use(w):
                for _ in range(2):  # the second call reuses the model's graph
                    greedy_generate(pf.base_model, ids, mask, max_new_tokens=3, compile={"backend": counter})
            models.append(weakref.ref(pf.base_model))
    assert counter.frame_count == 3
    del pf
    gc.collect()
    assert all(m() is None for m in models)  # nothing compiled keeps a model alive


def test_plain_greedy_names_what_greedy_generate_does_not_apply():
    from transformers import GenerationConfig

    from personafuse.moe.decoding import plain_greedy

    assert plain_greedy(GenerationConfig()) and plain_greedy(None)
    assert plain_greedy(GenerationConfig(repetition_penalty=1.0, num_beams=1, min_length=0))  # neutral values
    for field, value in [("repetition_penalty", 1.3), ("num_beams", 4), ("suppress_tokens", [5]),
                         ("penalty_alpha", 0.6), ("min_new_tokens", 3)]:  # fmt: skip
        assert not plain_greedy(GenerationConfig(**{field: value})), field


def test_one_kv_cache_argument_for_every_caller() -> None:
    """cache_kwarg / output_cache (read by decoding, the server's decode loop and the data teachers):
    a prefix's returned cache, handed back under the model's own argument name, continues the
    sequence exactly as one forward over the whole of it."""
    from conftest import tiny_causal_lm
    from personafuse.moe.decoding import cache_kwarg, output_cache

    model = tiny_causal_lm().eval()
    ids = torch.randint(5, 160, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, -4:]
        pre = model(input_ids=ids[:, :8], use_cache=True)
        cache = output_cache(pre)
        assert cache.get_seq_length() == 8
        rest = model(input_ids=ids[:, 8:], use_cache=True, **{cache_kwarg(model): cache}).logits
    torch.testing.assert_close(rest, whole, atol=1e-5, rtol=1e-5)
