"""The mixture is the exact sum of the ten experts, batched with per-row weights."""

import copy

import pytest
import torch

from conftest import build_tiny, tiny_causal_lm
from personafuse.moe.mixture import MixtureLinear, MixtureState, inject_mixture
from personafuse.moe.packing import PackedMixtureLinear, group_of
from personafuse.training.stages import set_activation_checkpointing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_weights(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, 10, generator=g) * 2, dim=-1)


def test_layer_equals_explicit_sum_over_experts():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    state = MixtureState(10, 8, 16 / 8)
    layer = MixtureLinear(base, state)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 7, 24)
    w = random_weights(5)
    with state.use(w):
        y = layer(x)
    ref = base(x)
    for i in range(10):
        a, b = layer.expert(i)
        ref = ref + w[:, i, None, None] * 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # No weights set: exactly the base layer.
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


def _peft_reference(pf, kind):
    """A peft model holding the same ten experts as ten separate LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm(kind)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg, adapter_name="e0")
    for i in range(1, 10):
        peft_model.add_adapter(f"e{i}", cfg)
    layers = pf.mixture_layers
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or not isinstance(module.lora_A, torch.nn.ModuleDict):
                continue
            ours = layers[name.removeprefix("base_model.model.")]
            for i in range(10):
                a, b = ours.expert(i)
                module.lora_A[f"e{i}"].weight.copy_(a)
                module.lora_B[f"e{i}"].weight.copy_(b)
    return peft_model.eval()


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma"])
def test_model_equals_peft_sum_of_experts_per_row(kind, pack):
    pf = build_tiny(base_kind=kind)
    pf.state.pack = pack  # the inference layout (on by default on accelerators only) and the plain one
    peft_model = _peft_reference(pf, kind)
    ids = torch.randint(7, 150, (4, 9), generator=torch.Generator().manual_seed(1))
    w = random_weights(4, seed=2)
    with torch.no_grad():
        ours = pf(ids, weights=w).logits
        for row in range(4):
            name = f"mix{row}"
            peft_model.add_weighted_adapter(
                [f"e{i}" for i in range(10)], w[row].tolist(), name, combination_type="cat"
            )
            peft_model.set_adapter(name)
            ref = peft_model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(ours[row : row + 1], ref, atol=1e-5, rtol=1e-5)
        # A one-hot weight is exactly that single expert.
        for i in (0, 7):
            onehot = torch.zeros(1, 10)
            onehot[0, i] = 1.0
            peft_model.set_adapter(f"e{i}")
            torch.testing.assert_close(
                pf(ids[:1], weights=onehot).logits, peft_model(input_ids=ids[:1]).logits, atol=1e-5, rtol=1e-5
            )
    # And the mixture really differs from the base model.
    assert not torch.allclose(ours, pf(ids).logits, atol=1e-3)


def test_generation_with_cache_equals_without_cache():
    pf = build_tiny()
    enc = pf.chat_inputs(["i feel so anxious about my exam", "solve x plus two times three"])
    w = random_weights(2, seed=5)
    with torch.no_grad(), pf.mixture_weights(w):
        kw = dict(
            max_new_tokens=12, do_sample=False, pad_token_id=0, temperature=None, top_p=None, top_k=None
        )
        cached = pf.base_model.generate(**enc, use_cache=True, **kw)
        uncached = pf.base_model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] > enc["input_ids"].shape[1]


def test_batch_rows_are_independent_in_generate():
    pf = build_tiny()
    prompts = ["i feel so anxious", "write a poem about my boss", "solve x plus two"]
    w = random_weights(3, seed=9)
    together = pf.generate(prompts, weights=w, max_new_tokens=8)
    alone = [pf.generate([p], weights=w[i : i + 1], max_new_tokens=8)[0] for i, p in enumerate(prompts)]
    assert [g.text for g in together] == [g.text for g in alone]
    assert together[1].weights["high_O"] == pytest.approx(float(w[1, 0]))


def test_inject_errors_name_targets():
    model = tiny_causal_lm()
    state = MixtureState(10, 8, 2.0)
    with pytest.raises(ValueError, match=r"\['c_attn'\] matched no linear layer"):
        inject_mixture(copy.deepcopy(model), ["c_attn"], state)
    with pytest.raises(ValueError, match=r"\['wq'\] matched no linear layer"):
        inject_mixture(copy.deepcopy(model), ["q_proj", "wq"], state)


def test_wrong_weight_shape_is_rejected():
    pf = build_tiny()
    ids = torch.randint(7, 150, (2, 5))
    with pytest.raises(ValueError, match=r"shape \[batch, 10\]"):
        pf(ids, weights=torch.ones(2, 9) / 9)
    with pytest.raises(ValueError, match="set for 3 sequences but the batch has 2 rows"):
        pf(ids, weights=torch.ones(3, 10) / 10)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(7, 150, (3, 10), generator=torch.Generator().manual_seed(4))
    w = random_weights(3, seed=6).requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        pf = build_tiny()
        pf.train()
        if ckpt:
            set_activation_checkpointing(pf.base_model, True)
        for n, p in pf.named_parameters():
            p.requires_grad_(".lora_" in n)
        w.grad = None
        pf(ids, weights=w).logits.pow(2).mean().backward()
        layer = next(iter(pf.mixture_layers.values()))
        grads.append((layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), w.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_one_expert_per_row_equals_one_hot_mixture(kind):
    # set_experts runs only each row's expert (gathered bmm); it must equal the stacked one-hot
    # mixture in value and in every gradient, for prefill (3-D) and decode-shaped (2-D) inputs.
    ids = torch.randint(7, 150, (4, 9), generator=torch.Generator().manual_seed(1))
    experts = torch.tensor([3, 0, 3, 9])
    outs = []
    for sparse in (False, True):
        pf = build_tiny(base_kind=kind)
        pf.train()
        for n, p in pf.named_parameters():
            p.requires_grad_(".lora_" in n)
        if sparse:
            pf.state.set_experts(experts)
        else:
            pf.state.set(torch.nn.functional.one_hot(experts, 10).float())
        logits = pf.base_model(input_ids=ids).logits
        logits.pow(2).mean().backward()
        layer = pf.mixture_layers["model.layers.1.mlp.down_proj"]
        outs.append((logits.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Experts with no row get no gradient, exactly.
    grad_b = outs[1][2].view(-1, 10, 8)
    assert grad_b[:, [1, 2, 4, 5, 6, 7, 8]].abs().max() == 0 and grad_b[:, 3].abs().max() > 0

    layer = MixtureLinear(torch.nn.Linear(6, 5), MixtureState(10, 2, 1.0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    layer.state.set_experts(torch.tensor([0, 5, 9]))
    y_sparse = layer(x)
    layer.state.set(torch.nn.functional.one_hot(torch.tensor([0, 5, 9]), 10).float())
    torch.testing.assert_close(y_sparse, layer(x))


def test_expert_index_out_of_range_is_named():
    state = MixtureState(10, 8, 2.0)
    with pytest.raises(ValueError, match=r"out of range 0..9: \[2, 10\]"):
        state.set_experts(torch.tensor([2, 10]))


def _matmuls(fn) -> int:
    """How many matrix multiplications (aten mm/addmm/bmm) ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in {"mm", "addmm", "addmm_", "bmm"}:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def _param_bytes(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_inference_packs_each_group_and_copies_nothing():
    pf = build_tiny()
    pf.state.pack = True  # on CPU packing is opt-in
    layers = pf.mixture_layers
    q, k, v, o = (layers[f"model.layers.0.self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up = layers["model.layers.0.mlp.gate_proj"], layers["model.layers.0.mlp.up_proj"]
    assert group_of(q) is group_of(k) is group_of(v) and group_of(gate) is group_of(up)
    assert len(group_of(o).members) == 1 and group_of(o) is not group_of(q)
    ids = torch.randint(7, 150, (3, 6), generator=torch.Generator().manual_seed(3))
    w = random_weights(3, seed=4)
    before = _param_bytes(pf)
    with torch.no_grad():  # no weights set: the base model's own matmuls (7 per layer, lm_head and
        base_mm = _matmuls(lambda: pf.base_model(ids))  # whatever else this transformers multiplies)
    with torch.enable_grad():  # the autograd path never uses the pack
        plain = pf(ids, weights=w).logits.detach()
        plain_mm = _matmuls(lambda: pf(ids, weights=w))

    with torch.no_grad():
        n_mm = _matmuls(lambda: pf(ids, weights=w))
        packed = pf(ids, weights=w).logits
    torch.testing.assert_close(packed, plain, atol=1e-6, rtol=1e-5)
    group = group_of(q)
    assert group.weight is not None and not group.fused  # no Triton on CPU: the torch expand
    storage = group.weight.untyped_storage().data_ptr()
    for m in (q, k, v):  # base weights and A are row views of P, B row views of the stacked B
        assert m.base.weight.untyped_storage().data_ptr() == storage
        assert m.lora_A.untyped_storage().data_ptr() == storage
        assert m.lora_B.untyped_storage().data_ptr() == group.expand.untyped_storage().data_ptr()
        assert m.lora_B.is_contiguous()
    # Packing moves storage and copies nothing: parameter memory is unchanged.
    assert _param_bytes(pf) == before
    n_layers = pf.base_model.config.num_hidden_layers
    # Plain: 7 x (base, shrink, expand) per layer. Packed: 4 P GEMMs + 7 expands, for 7 base GEMMs.
    assert plain_mm == base_mm + 14 * n_layers
    assert n_mm == base_mm + 4 * n_layers


def test_group_outputs_live_for_one_forward_only():
    pf = build_tiny()
    pf.state.pack = True
    ids = torch.randint(7, 150, (2, 5), generator=torch.Generator().manual_seed(5))
    w = random_weights(2, seed=6)
    q = pf.mixture_layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, q.in_features, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pf(ids, weights=w)
        q = pf.mixture_layers["model.layers.0.self_attn.q_proj"]  # the packed layer swapped in
        assert isinstance(q, PackedMixtureLinear)
        assert pf.state.shared is None  # siblings' shared outputs are released with the forward
        with pf.state.use(w):
            with pytest.raises(IndexError):  # a failing forward must not leave a stale dict behind
                pf.base_model(torch.full_like(ids, 10**6))
            assert pf.state.shared is None
            alone = q(x)  # a layer called outside a model forward computes its group itself
    with torch.enable_grad(), pf.state.use(w):
        plain = q(x).detach()
    assert q.group.weight is not None
    torch.testing.assert_close(alone, plain, atol=1e-6, rtol=1e-5)


def test_pack_follows_in_place_updates_reassignment_moves_and_training():
    pf = build_tiny()
    pf.state.pack = True  # on CPU packing is opt-in
    layers = pf.mixture_layers
    k = layers["model.layers.0.self_attn.k_proj"]
    ids = torch.randint(7, 150, (3, 6), generator=torch.Generator().manual_seed(3))
    w = random_weights(3, seed=4)

    def both():
        with torch.no_grad():
            fast = pf(ids, weights=w).logits
        with torch.enable_grad():
            plain = pf(ids, weights=w).logits.detach()
        torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-5)
        return fast

    first = both()
    with torch.no_grad():  # an in-place update of one member's A is an update of the pack
        k.lora_A.mul_(3.0)
    changed = both()
    assert not torch.allclose(first, changed)
    k.lora_A.data = k.lora_A.data * 0.5  # new storage: the stale pack must not be used
    both()
    assert group_of(k).weight is not None  # ... and the next routing decision packs again
    pf.to(torch.float64)  # .to() gives all parameters new storage
    assert both().dtype == torch.float64 and group_of(k).weight.dtype == torch.float64
    pf.to(torch.float32)

    # Train after packing (inside inference mode): the optimiser's update reaches the pack.
    with torch.inference_mode():
        pf(ids, weights=w)
    params = [p for n, p in pf.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.5)
    with torch.enable_grad():
        pf(ids, weights=w).logits.square().mean().backward()
    opt.step()
    both()


def test_packing_swaps_its_layer_type_in_and_back_out():
    """Packing swaps a PackedMixtureLinear in for each member (vLLM-style), over the same tensors,
    and unpacking swaps plain layers back: the plain layer holds nothing about packing."""
    pf = build_tiny()
    pf.state.pack = True
    names = list(pf.mixture_layers)
    plain = pf.mixture_layers
    keys = list(pf.base_model.state_dict())
    assert not any(isinstance(m, PackedMixtureLinear) for m in plain.values())
    assert not any(hasattr(m, a) for m in plain.values() for a in ("group", "lo", "hi", "fuse_act"))
    with torch.no_grad():
        pf.state.set(random_weights(2, seed=1))  # packs
    packed = pf.mixture_layers
    assert list(packed) == names and all(type(m) is PackedMixtureLinear for m in packed.values())
    assert pf.state.layers == list(packed.values())  # the state's list follows the swap
    assert list(pf.base_model.state_dict()) == keys  # same names: checkpoints see no difference
    for n in names:  # the same tensors, nothing copied
        assert packed[n].base is plain[n].base and packed[n].lora_A is plain[n].lora_A and packed[n].lora_B is plain[n].lora_B
    q = packed["model.layers.0.self_attn.q_proj"]
    assert (q.slot, q.bit, q.all_bits, q.lo, q.hi) == (group_of(q).slot, 1, 7, 0, q.out_features)
    pf.state.invalidate_packs()
    back = pf.mixture_layers
    assert all(type(m) is MixtureLinear for m in back.values()) and pf.state.layers == list(back.values())
    assert all(back[n].lora_A is plain[n].lora_A for n in names)


def test_packed_model_saves_and_reloads(tmp_path):
    from personafuse import PersonaFuseModel

    pf = build_tiny(tmp_path)
    pf.state.pack = True
    ids = torch.randint(7, 150, (2, 5), generator=torch.Generator().manual_seed(5))
    w = random_weights(2, seed=6)
    with torch.no_grad():
        ref = pf(ids, weights=w).logits  # packs: parameters now share storage
    pf.save_pretrained(tmp_path / "pf")
    loaded = PersonaFuseModel.from_pretrained(tmp_path / "pf").eval()
    loaded.state.pack = True  # same layout, same arithmetic: the round trip must be exact
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, weights=w).logits, ref, atol=0, rtol=0)


def test_packed_forward_compiles_without_graph_breaks():
    pf = build_tiny()
    pf.state.pack = True  # on CPU packing is opt-in
    ids = torch.randint(7, 150, (2, 5), generator=torch.Generator().manual_seed(5))
    w = random_weights(2, seed=6)
    model = pf.base_model
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps earlier tests' counts
    with torch.no_grad():
        pf.state.set(w)  # packs, from a fresh state
        assert pf.mixture_layers["model.layers.0.self_attn.q_proj"].group.weight is not None
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        outs = [compiled(ids, use_cache=False).logits for _ in range(2)]
        # the second call reuses the graph: the pack's bookkeeping ends each call as it began
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        ref = model(ids, use_cache=False).logits
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    pf.state.set(None)
    torch._dynamo.reset()


def test_dropped_pack_frees_its_storage():
    import gc
    import weakref

    pf = build_tiny()
    pf.state.pack = True
    w = random_weights(2, seed=1)
    with torch.no_grad():
        pf.state.set(w)  # packs
    group = pf.mixture_layers["model.layers.0.self_attn.q_proj"].group
    old_expand = weakref.ref(group.expand)
    pf.to(torch.float64)  # new storage everywhere: the old pack must not be kept alive
    gc.collect()
    assert group.weight is None and old_expand() is None
    pf.to(torch.float32)


def test_deep_copy_has_its_own_weights_and_shares_group_outputs():
    import gc
    import pickle

    from personafuse.moe import mixture

    pf = build_tiny()
    pf.state.pack = True
    ids = torch.randint(7, 150, (2, 5), generator=torch.Generator().manual_seed(5))
    w1, w2 = random_weights(2, seed=6), random_weights(2, seed=7)
    with torch.no_grad():
        ref1, ref2 = pf(ids, weights=w1).logits, pf(ids, weights=w2).logits
        pf.state.set(w1)
        twin = copy.deepcopy(pf.base_model)  # the layers read weights by their state's key: a copy needs its own
        twin_state = twin._mixture_state
        assert twin_state is not pf.state and twin_state.key != pf.state.key
        torch.testing.assert_close(twin(ids).logits, ref1, atol=0, rtol=0)  # the weights set before the copy
        twin_state.set(None)
        base_mm = _matmuls(lambda m=twin: m(ids))
        twin_state.set(w2)  # the copy's weights change, the original's do not
        n_mm = _matmuls(lambda m=twin: m(ids))
        torch.testing.assert_close(twin(ids).logits, ref2, atol=0, rtol=0)
        torch.testing.assert_close(pf.base_model(ids).logits, ref1, atol=0, rtol=0)
        unpickled = pickle.loads(pickle.dumps(twin))
        torch.testing.assert_close(unpickled(ids).logits, ref2, atol=0, rtol=0)
    assert n_mm == base_mm + 4 * pf.base_model.config.num_hidden_layers  # one P GEMM per group, as the original
    key = twin_state.key
    del twin, twin_state, unpickled
    gc.collect()
    assert key not in mixture.LIVE  # a dropped model's live values go with it


def test_activation_fusion_is_offered_only_to_mlps_it_computes_exactly():
    """The gate/up kernel replaces ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; an MLP with
    another forward, or an activation the kernel lacks, keeps its own code."""
    from transformers.activations import ACT2FN

    from personafuse.moe.packing import _fusable_act

    def mlp_group(kind: str):
        state = MixtureState(10, 2, 1.0)
        model = tiny_causal_lm(kind)
        inject_mixture(model, ["gate_proj", "up_proj", "down_proj"], state)
        mlp = model.model.layers[0].mlp
        return mlp, [mlp.gate_proj, mlp.up_proj]

    mlp, members = mlp_group("llama")
    assert _fusable_act(mlp, members) == "silu"
    mlp.act_fn = ACT2FN["swish"]  # another class, the same function: recognised by its values
    assert _fusable_act(mlp, members) == "silu"
    mlp.act_fn = ACT2FN["gelu_pytorch_tanh"]
    assert _fusable_act(mlp, members) == "gelu_tanh"
    mlp.act_fn = ACT2FN["relu"]
    assert _fusable_act(mlp, members) is None
    mlp.act_fn = ACT2FN["silu"]
    assert _fusable_act(mlp, members[::-1]) is None  # up/gate in the wrong roles

    class ScaledMLP(type(mlp)):  # a forward the kernel does not compute
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)

    mlp.__class__ = ScaledMLP
    assert _fusable_act(mlp, members) is None
    gemma, gemma_members = mlp_group("gemma")
    assert _fusable_act(gemma, gemma_members) == "gelu_tanh"


def test_a_linear_subclass_target_is_refused_by_name():
    class ScaledLinear(torch.nn.Linear):  # its own forward, as a quantised layer has
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_causal_lm("llama")
    layer = model.model.layers[1].mlp
    old = layer.up_proj
    layer.up_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp\.up_proj is a .*ScaledLinear, not a plain nn\.Linear"):
        inject_mixture(model, ["q_proj", "up_proj"], MixtureState(10, 4, 2.0))


def test_weights_follow_a_cast_of_the_model_and_training_forwards_run():
    pf = build_tiny()
    ids = torch.randint(7, 150, (2, 6), generator=torch.Generator().manual_seed(0))
    w = torch.softmax(torch.randn(2, 10, generator=torch.Generator().manual_seed(1)), -1)
    assert pf.state.dtype == torch.float32
    pf.to(torch.bfloat16)
    assert pf.state.dtype == torch.bfloat16  # read from the layers, not fixed at injection
    pf.train()
    out = pf(ids, weights=w.requires_grad_()).logits  # the autograd path: float32 weights, bf16 layers
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    layer = pf.mixture_layers["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.grad is not None and w.grad is not None
