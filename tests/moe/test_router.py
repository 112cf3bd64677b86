import dataclasses

import pytest
import torch

from conftest import build_tiny
from personafuse import Routing, TraitError


def entropy(w: torch.Tensor) -> torch.Tensor:
    return -(w * w.clamp_min(1e-12).log()).sum(-1)


QUERIES = ["i feel so anxious about my exam", "solve x plus two", "brainstorm ideas for new product"]


@pytest.mark.parametrize("encoder_kind", ["bert", "qwen2"])
def test_router_weights_are_a_distribution_and_tau_sharpens(encoder_kind):
    pf = build_tiny(encoder_kind=encoder_kind)
    assert pf.router.encoder.pooling == ("mean" if encoder_kind == "bert" else "last")
    w = pf.route(QUERIES)
    assert w.shape == (3, 10)
    assert torch.all(w > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    sharp = pf.route(QUERIES, tau=0.05)
    assert torch.all(entropy(sharp) < entropy(w))
    assert torch.equal(sharp.argmax(-1), w.argmax(-1))


def test_gradients_reach_encoder_projection_and_embeddings():
    pf = build_tiny()
    enc = pf.encode_queries(QUERIES)
    w, h = pf.router(enc["input_ids"], enc["attention_mask"])
    target = torch.zeros(3, 10)
    target[:, 6] = 1.0
    loss = -(target * w.log()).sum()
    loss.backward()
    grads = {
        "encoder": pf.router.encoder.backbone.embeddings.word_embeddings.weight.grad,
        "projection": pf.router.encoder.proj.weight.grad,
        "expert_embeddings": pf.router.expert_embeddings.grad,
    }
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, name
    # The base model stays frozen.
    assert not any(p.requires_grad for n, p in pf.base_model.named_parameters() if "lora_" not in n)


def test_last_token_pooling_ignores_padding_side():
    pf = build_tiny(encoder_kind="qwen2")
    tok = pf.encoder_tokenizer
    texts = ["i feel so anxious about my exam today", "solve x"]
    outs = []
    for side in ("left", "right"):
        tok.padding_side = side
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            outs.append(pf.router.encoder(enc["input_ids"], enc["attention_mask"]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_routing_modes():
    pf = build_tiny()
    router_w = pf.route(QUERIES)
    fixed = Routing("fixed", weights={"high_A": 3, "low_N": 1}).resolve(3, router_w)
    assert fixed[0, 6] == pytest.approx(0.75) and fixed[0, 9] == pytest.approx(0.25)
    blend = Routing("blend", weights={"high_A": 1}, alpha=0.25).resolve(3, router_w)
    torch.testing.assert_close(
        blend, 0.75 * router_w + 0.25 * fixed.new_zeros(3, 10).index_fill(1, torch.tensor([6]), 1.0)
    )
    top2 = Routing("top_k", k=2).resolve(3, router_w)
    assert torch.all((top2 > 0).sum(-1) == 2)
    assert torch.equal(top2.argmax(-1), router_w.argmax(-1))
    torch.testing.assert_close(top2.sum(-1), torch.ones(3))
    pole = Routing("pole", pole="Low Neuroticism").resolve(3)
    assert torch.all(pole[:, 9] == 1) and pole.sum() == 3
    for k in (1, 2, 5):
        r = Routing("random", k=k, seed=7).resolve(64)
        assert torch.all((r > 0).sum(-1) == k)
        torch.testing.assert_close(r[r > 0], torch.full(((r > 0).sum().item(),), 1.0 / k))
        assert torch.equal(r, Routing("random", k=k, seed=7).resolve(64))  # seeded
        assert len({tuple(row.tolist()) for row in r}) > 1  # rows draw independently
    assert not torch.equal(
        Routing("random", k=2, seed=1).resolve(16), Routing("random", k=2, seed=2).resolve(16)
    )


def test_routing_parse_and_errors():
    assert Routing.parse("pole:high_A").pole == "high_A"
    assert Routing.parse("random:5").k == 5
    assert Routing.parse("fixed:high_A=0.6,low_N=0.4").weights[9] == pytest.approx(0.4)
    assert Routing.parse("blend:0.3:high_O=1").alpha == pytest.approx(0.3)
    with pytest.raises(TraitError, match="unknown routing mode 'sometimes'"):
        Routing("sometimes")
    with pytest.raises(TraitError, match="'k' must be an integer from 1 to 10"):
        Routing("random", k=11)
    with pytest.raises(TraitError, match="'super_A'"):
        Routing("pole", pole="super_A")
    with pytest.raises(TraitError, match="negative"):
        Routing("fixed", weights=[-1.0] + [0.2] * 9)
    with pytest.raises(TraitError, match="9 entries"):
        Routing("fixed", weights=[0.1] * 9)
    with pytest.raises(TraitError, match="unknown field"):
        Routing.from_dict({"mode": "pole", "pole": "high_A", "temperature": 2})


def test_generate_reports_weights_of_each_mode():
    pf = build_tiny()
    [g] = pf.generate(["hello"], routing=Routing("pole", pole="high_C"), max_new_tokens=3)
    assert g.weights["high_C"] == 1.0 and sum(g.weights.values()) == 1.0
    router_gen = pf.generate(QUERIES, max_new_tokens=3)
    for g, w in zip(router_gen, pf.route(QUERIES), strict=True):
        assert list(g.weights.values()) == pytest.approx(w.tolist())
    with pytest.raises(TraitError, match="negative"):
        pf.generate(["hello"], weights=[-0.1] + [0.1] * 9)


def test_generate_validates_tensor_and_per_row_weights_like_lists():
    pf = build_tiny()
    for bad, match in [
        (-torch.ones(10), "negative"),
        (torch.full((10,), float("nan")), "not a finite number"),
        (torch.ones(9), "9 entries"),
        (torch.ones(2, 3, 10), r"shape \[10\] or \[rows, 10\]"),
        ([[0.1] * 10, [0.1] * 9 + [-0.1]], r"weights\[1\].*negative"),
    ]:
        with pytest.raises(TraitError, match=match):
            pf.generate(["hello", "hi"], weights=bad, max_new_tokens=2)
        with pytest.raises(TraitError, match=match), pf.mixture_weights(bad):
            pass
    with pytest.raises(TraitError, match="3 rows for 2 prompts"):
        pf.generate(["hello", "hi"], weights=torch.rand(3, 10), max_new_tokens=2)
    # one row per prompt, as a nested list: each reply reports its own row
    rows = [[1.0] + [0.0] * 9, [0.0] * 9 + [1.0]]
    gens = pf.generate(["hello", "hi"], weights=rows, max_new_tokens=2)
    assert [g.weights["high_O"] for g in gens] == [1.0, 0.0] and gens[1].weights["low_N"] == 1.0


def test_routing_accepts_its_cli_and_json_forms_and_refuses_unused_fields():
    pf = build_tiny()
    by_text = pf.generate(QUERIES, routing="top_k:2", max_new_tokens=2)
    by_dict = pf.generate(QUERIES, routing={"mode": "top_k", "k": 2}, max_new_tokens=2)
    by_obj = pf.generate(QUERIES, routing=Routing("topk", k=2), max_new_tokens=2)
    assert [g.weights for g in by_text] == [g.weights for g in by_dict] == [g.weights for g in by_obj]
    assert all(sum(v > 0 for v in g.weights.values()) == 2 for g in by_text)
    with pytest.raises(TypeError, match="routing must be a Routing.*got int"):
        pf.generate(QUERIES, routing=3)
    with pytest.raises(TraitError, match="'router' does not use 'weights'"):
        Routing(weights=[1.0] * 10)
    with pytest.raises(TraitError, match="'top_k' does not use 'pole'"):
        Routing("top_k", k=2, pole="high_A")


def test_random_route_seed_none_draws_afresh_and_an_int_seed_repeats_per_query():
    keys = [f"query {i}" for i in range(8)]
    seeded = [Routing("random", k=2, seed=5).resolve(8, keys=keys) for _ in range(2)]
    assert torch.equal(*seeded)  # the same experts for the same queries, from a new instance
    fresh = [Routing("random", k=2, seed=None).resolve(8, keys=keys) for _ in range(4)]
    # 45 pairs of experts per row: four unseeded draws of 8 rows all equal has chance 45**-24
    assert any(not torch.equal(fresh[0], f) for f in fresh[1:])
    assert all(torch.all((f > 0).sum(-1) == 2) for f in fresh)


def test_route_takes_one_conversation_and_empty_batches():
    pf = build_tiny()
    conv = [{"role": "user", "content": QUERIES[0]}]
    torch.testing.assert_close(pf.route(conv), pf.route([QUERIES[0]]))
    assert pf.route([]).shape == (0, 10)
    assert pf.generate([]) == []


def test_tau_must_be_positive():
    pf = build_tiny()
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"tau must be positive, got {tau}"):
            pf.route(QUERIES, tau=tau)


def test_one_tau_the_config_s_takes_effect(tmp_path):
    """Router.tau used to copy config.tau at build time, so ``model.config.tau = x`` did nothing."""
    pf = build_tiny()
    flat = pf.route(QUERIES)
    pf.config.tau = 0.05
    sharp = pf.route(QUERIES)
    torch.testing.assert_close(sharp, pf.route(QUERIES, tau=0.05))
    assert torch.all(entropy(sharp) < entropy(flat)) and pf.router.tau == 0.05
    pf.router.tau = 0.5  # either name sets the one value
    assert pf.config.tau == 0.5
    pf.config = dataclasses.replace(pf.config, tau=1.0)  # a replaced config is read too
    torch.testing.assert_close(pf.route(QUERIES), flat)


def test_a_reply_ended_by_any_eos_id_of_the_generation_config_is_a_stop():
    pf = build_tiny()
    [first] = pf.generate(["hello"], weights=[0.1] * 10, max_new_tokens=1)
    assert first.finish_reason == "length"
    with torch.no_grad(), pf.mixture_weights([0.1] * 10):  # what greedy emits first
        token = int(pf.base_model(**pf.chat_inputs(["hello"])).logits[0, -1].argmax())
    assert token != pf.tokenizer.eos_token_id
    pf.base_model.generation_config.eos_token_id = [pf.tokenizer.eos_token_id, token]  # as Llama 3 lists several
    [g] = pf.generate(["hello"], weights=[0.1] * 10, max_new_tokens=5)
    assert g.finish_reason == "stop" and g.completion_tokens == 1


def test_cli_form_takes_ten_bare_numbers_and_plain_random_and_the_eval_parser_shares_it():
    from personafuse.evaluation.subjects import parse_routing

    bare = Routing.parse("fixed:" + ",".join(["1"] + ["0"] * 8 + ["3"]))
    assert bare.weights[0] == pytest.approx(0.25) and bare.weights[9] == pytest.approx(0.75)
    assert Routing.parse("random").k == 1 and Routing.parse("random", seed=4).seed == 4
    assert Routing.parse("topk:2").k == 2 and Routing.parse("one:A+").pole == "high_A"  # the class's aliases
    with pytest.raises(TraitError, match="9 entries"):
        Routing.parse("fixed:" + ",".join(["1"] * 9))
    assert parse_routing("blend:0.3:high_O=1") == {"mode": "blend", "weights": [1.0] + [0.0] * 9, "alpha": 0.3}
    assert parse_routing("fixed:" + ",".join(["1"] * 10))["weights"] == [0.1] * 10
    with pytest.raises(ValueError, match="bad routing spec 'top_k:0'.*'k' must be an integer"):
        parse_routing("top_k:0")


@pytest.mark.parametrize("spec", ["router", "top_k:3", "random:2", "pole:A+", "fixed:high_A=3,low_N=1", "blend:0.4:high_O=1"])
def test_the_json_form_round_trips_every_mode(spec):
    r = Routing.parse(spec, seed=9)
    again = Routing.from_dict(r.to_dict())
    assert again == r and again.to_dict() == r.to_dict()


def test_route_runs_the_encoder_in_chunks_with_the_same_weights():
    """route() feeds the encoder at most ROUTE_CHUNK queries at a time (memory stays flat on a
    benchmark's worth of queries), and a query's weights do not depend on its chunk."""
    from personafuse.moe.model import ROUTE_CHUNK

    pf = build_tiny()
    sizes = []
    real = pf.router.forward
    pf.router.forward = lambda ids, mask, tau=None: (sizes.append(ids.shape[0]), real(ids, mask, tau=tau))[1]
    queries = [f"i feel {i} times so anxious about my exam" for i in range(2 * ROUTE_CHUNK + 22)]
    w = pf.route(queries)
    assert sizes == [ROUTE_CHUNK, ROUTE_CHUNK, 22] and w.shape == (len(queries), 10)
    torch.testing.assert_close(w[[0, ROUTE_CHUNK + 5, -1]], pf.route([queries[0], queries[ROUTE_CHUNK + 5], queries[-1]]))
