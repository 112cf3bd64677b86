"""The fused expand kernel (personafuse.moe.kernels), run on CPU by Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so each check runs in a fresh process.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from personafuse.moe import kernels

TESTS = Path(__file__).resolve().parents[1]


def _interpret(code: str) -> str:
    pytest.importorskip("triton")  # a dev dependency on Linux x86-64 (pyproject.toml)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_reference_expand_is_the_per_member_sum():
    # The torch fallback against the formula, member by member (no Triton involved).
    g = torch.Generator().manual_seed(0)
    sizes, rank, rows = [32, 16, 16], 20, 6
    n_out = sum(sizes)
    out = torch.randn(rows, n_out + 3 * rank, generator=g)
    w = torch.rand(2, rank, generator=g)  # two sequences of three rows each
    b = torch.randn(n_out, rank, generator=g)
    y = kernels._reference(out, w, b, [32, 48, 64])
    lo = 0
    for j, size in enumerate(sizes):
        h = out[:, n_out + j * rank : n_out + (j + 1) * rank] * w.repeat_interleave(3, dim=0)
        want = out[:, lo : lo + size] + h @ b[lo : lo + size].T
        torch.testing.assert_close(y[:, lo : lo + size], want)
        lo += size


def test_kernel_equals_reference_for_every_group_shape():
    out = _interpret(
        """
        import torch
        from personafuse.moe import kernels
        assert kernels.INTERPRET and kernels.triton is not None
        g = torch.Generator().manual_seed(0)
        cases = [([32, 16, 16], 80, 5, 5), ([64, 64], 80, 40, 5), ([48], 20, 33, 33), ([16, 32, 16], 80, 70, 1)]
        for sizes, rank, rows, seqs in cases:
            bounds = [sum(sizes[: i + 1]) for i in range(len(sizes))]
            n_out = bounds[-1]
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
                o = torch.randn(rows, n_out + len(sizes) * rank, generator=g).to(dtype)
                w = torch.rand(seqs, rank, generator=g).to(dtype)
                b = torch.randn(n_out, rank, generator=g).to(dtype)
                y = kernels.grouped_expand(o, w, b, bounds)
                ref = kernels._reference(o.float(), w.float(), b.float(), bounds)
                assert y.dtype == dtype and y.shape == (rows, n_out)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                assert err < tol, (sizes, rank, rows, seqs, dtype, err)
                print("ok", sizes, rank, rows, seqs, dtype, f"{err:.1e}")
        """
    )
    assert out.count("ok") == 8


def test_fused_pack_matches_the_plain_model_and_compiles():
    out = _interpret(
        """
        import torch
        from conftest import build_tiny, routed_batch_and_plain_logits
        pf = build_tiny()
        pf.state.pack = True
        pf.state.fuse = True  # eager as well (default: inside torch.compile only)
        ids, w, plain = routed_batch_and_plain_logits(pf)
        with torch.no_grad():
            fused = pf(ids, weights=w).logits
        groups = pf.state.groups
        assert all(g.fused for g in groups), [g.fused for g in groups]
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
        pf.state.fuse = False  # packed, torch expand
        with torch.no_grad():
            unfused = pf(ids, weights=w).logits
        assert all(g.weight is not None and not g.fused for g in groups)
        torch.testing.assert_close(unfused, plain, atol=1e-5, rtol=1e-4)
        pf.state.fuse = True
        # decode-shaped (one token per row) through generate with the KV cache
        gen = pf.base_model.generate
        with torch.no_grad(), pf.state.use(w):
            a = gen(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        pf.state.pack = False  # the plain path for the same generation
        pf.state.invalidate_packs()
        with pf.state.use(w):
            b = gen(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        assert all(g.weight is None for g in groups)
        assert torch.equal(a, b)
        pf.state.pack, pf.state.fuse = True, None  # the default: fused inside torch.compile
        # one opaque node for torch.compile: no graph break, no second graph
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm.code)
            return gm.forward

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # reset() keeps earlier tests' counts
        with torch.no_grad():
            pf.state.set(w)
            compiled = torch.compile(pf.base_model, backend=backend, fullgraph=True)
            outs = [compiled(ids, use_cache=False).logits for _ in range(2)]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 and len(graphs) == 1
        n_layers = pf.base_model.config.num_hidden_layers
        assert graphs[0].count("personafuse.grouped_expand") == 4 * n_layers, graphs[0].count("grouped_expand")
        assert "addmm_" not in graphs[0]
        for o in outs:
            torch.testing.assert_close(o, plain, atol=1e-5, rtol=1e-4)
        print("fused ok")
        """
    )
    assert "fused ok" in out


def test_gate_up_kernel_with_the_activation_equals_the_reference():
    out = _interpret(
        """
        import torch
        from personafuse.moe import kernels
        g = torch.Generator().manual_seed(0)
        for inter, rank, rows, seqs in [(32, 80, 5, 5), (64, 20, 12, 4), (48, 80, 3, 3)]:
            for act in ("silu", "gelu_tanh"):
                # bf16: the interpreter's conversions are coarser than a GPU's (the plain expand
                # shows the same against fp64), so the bf16 bound is loose; fp32 checks the sum
                for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
                    o = torch.randn(rows, 2 * inter + 2 * rank, generator=g).to(dtype)
                    w = torch.rand(seqs, rank, generator=g).to(dtype)
                    b = torch.randn(2 * inter, rank, generator=g).to(dtype)
                    ref = kernels._reference_act(o, w, b, inter, act).float()
                    y = kernels.grouped_expand_act_eager(o, w, b, inter, act)
                    assert y.shape == (rows, inter) and y.dtype == dtype
                    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    assert err < tol, (inter, act, dtype, err)
        try:
            kernels.grouped_expand_act_eager(o, w, b, inter, "relu")
        except ValueError as e:
            assert "relu" in str(e) and "silu" in str(e), e
        else:
            raise AssertionError("unknown activation accepted")
        print("act ok")
        """
    )
    assert "act ok" in out


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_fused_activation_matches_the_plain_model_compiles_and_pickles(kind):
    out = _interpret(
        f"""
        import pickle
        import torch
        from conftest import build_tiny, routed_batch_and_plain_logits
        from personafuse.moe import packing
        pf = build_tiny(base_kind="{kind}")
        st = pf.state
        st.pack, st.fuse, st.fuse_act = True, True, True
        ids, w, plain = routed_batch_and_plain_logits(pf)
        with torch.no_grad():
            fused = pf(ids, weights=w).logits
        mlps = [g._mlp for g in st.groups if g.act is not None]
        n_layers = pf.base_model.config.num_hidden_layers
        assert len(mlps) == n_layers and {{g.act for g in st.groups if g.act}} == {{"{ {"llama": "silu", "gemma": "gelu_tanh"}[kind] }"}}
        assert all(isinstance(m.__dict__.get("forward"), packing._MLPForward) for m in mlps)
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
        # the MLP's gate and up are not called: the MLP computes act(gate) * up itself
        calls = []
        hooks = [m.gate_proj.register_forward_hook(lambda *a: calls.append(1)) for m in mlps]
        with torch.no_grad():
            pf(ids, weights=w)
        assert not calls
        for h in hooks:
            h.remove()
        # the model still pickles; the copy's MLP forwards serve the copy, and it computes the same
        twin = pickle.loads(pickle.dumps(pf.base_model))
        twin_mlps = [g._mlp for g in twin._mixture_state.groups if g.act is not None]
        assert len(twin_mlps) == n_layers and all(m.forward.mlp is m for m in twin_mlps)
        with torch.no_grad():
            twin._mixture_state.set(w)
            torch.testing.assert_close(twin(ids).logits, fused, atol=1e-5, rtol=1e-4)
        # inside torch.compile (fuse=None): one graph, one fused gate/up node per layer
        st.fuse = None
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm.code)
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            st.set(w)
            compiled = torch.compile(pf.base_model, backend=backend, fullgraph=True)
            out = compiled(ids, use_cache=False).logits
        assert len(graphs) == 1
        assert graphs[0].count("personafuse.grouped_expand_act") == n_layers
        assert graphs[0].count("personafuse.grouped_expand.") == 3 * n_layers
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-4)
        if "{kind}" == "llama":  # inductor, as on a GPU (CUDA graphs aside): same greedy tokens
            from personafuse.moe.decoding import greedy_generate
            with st.use(w):
                mask = torch.ones_like(ids)
                eager = greedy_generate(pf.base_model, ids, mask, max_new_tokens=4)
                inductor = greedy_generate(pf.base_model, ids, mask, max_new_tokens=4, compile=True)
            assert torch.equal(eager, inductor)
        if "{kind}" == "llama":  # tuning: the gate/up kernel with the activation is timed on its own
            from personafuse.moe import kernels
            kernels.AUTOTUNE = True
            st.fuse = True
            with torch.no_grad():
                st.set(w)
                tuned = pf.base_model(ids).logits
            gate_up = [g for g in st.groups if g.act][0]
            acts = [k for k in kernels._TUNED if len(k) > 6]
            assert [(k[4], k[6]) for k in acts] == [(tuple(gate_up._ends), "silu")], acts
            records = kernels.tuned_configs()
            assert {{c["act"] for c in records}} == {{None, "silu"}}
            assert all(0 < c["best_ms"] <= c["default_ms"] for c in records), records
            torch.testing.assert_close(tuned, plain, atol=1e-5, rtol=1e-4)
            kernels.AUTOTUNE = False
        # off again: the MLPs run their own forward
        st.fuse_act = False
        with torch.no_grad():
            st.set(w)
        assert not any("forward" in m.__dict__ for m in mlps)
        print("act model ok")
        """
    )
    assert "act model ok" in out


def test_every_candidate_tiling_computes_the_same_sum():
    # What kernels.tune may pick: each tiling must give the reference sum, decode- and prefill-sized.
    out = _interpret(
        """
        import torch
        from personafuse.moe import kernels
        g = torch.Generator().manual_seed(1)
        cases = [([32, 16, 16], 80, 8, 8), ([128, 128], 80, 32, 32), ([64], 20, 70, 7), ([48, 48], 80, 3, 3)]
        for sizes, rank, rows, seqs in cases:
            bounds = [sum(sizes[: i + 1]) for i in range(len(sizes))]
            n_out = bounds[-1]
            o = torch.randn(rows, n_out + len(sizes) * rank, generator=g)
            w = torch.rand(seqs, rank, generator=g)
            b = torch.randn(n_out, rank, generator=g)
            ref = kernels._reference(o, w, b, bounds)
            configs = kernels.candidate_configs(rows, rank, bounds)
            assert configs[0] == kernels.default_config(rows, rank, bounds) and len(set(configs)) == len(configs)
            assert len(configs) >= 5, configs
            for cfg in configs:
                assert all(s % cfg.block_n == 0 for s in sizes), cfg  # a tile never straddles two members
                y = torch.full((rows, n_out), float("nan"))
                kernels._launch(cfg, o, w, b, bounds, y)
                torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{cfg}: {m}")
            print("ok", sizes, len(configs))
        """
    )
    assert out.count("ok") == 4


def test_autotune_times_each_group_shape_once_and_the_kernel_uses_the_winner():
    out = _interpret(
        """
        import torch
        from conftest import build_tiny, routed_batch_and_plain_logits
        from personafuse.moe import kernels
        timed, launched = [], []
        time_ms, launch = kernels._time_ms, kernels._launch
        kernels._time_ms = lambda fn: timed.append(1) or time_ms(fn)  # count timings, keep the real clock
        kernels._launch = lambda cfg, *a: launched.append(cfg) or launch(cfg, *a)
        pf = build_tiny()
        pf.state.pack, pf.state.fuse = True, True
        ids, w, plain = routed_batch_and_plain_logits(pf)
        assert not kernels._TUNED and not timed
        kernels.AUTOTUNE = True
        with torch.no_grad():
            tuned = pf(ids, weights=w).logits
        shapes = {tuple(g._ends) for g in pf.state.groups}
        assert {k[4] for k in kernels._TUNED} == shapes, (kernels._TUNED, shapes)
        assert all(k[2] == 3 and k[3] == 1 for k in kernels._TUNED)  # decode shape: one token per row
        n_timed = len(timed)
        assert n_timed >= 5 * len(shapes), n_timed
        torch.testing.assert_close(tuned, plain, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            pf(ids, weights=w)  # known shapes: nothing timed again
        assert len(timed) == n_timed
        # a decode-shaped call (3 rows, one per sequence) runs the tuned tiling; off, the default
        group = pf.state.groups[0]
        o = torch.randn(3, group.split + len(group.members) * group.expand.shape[1])
        wx = torch.rand(3, group.expand.shape[1])
        for on in (True, False):
            kernels.AUTOTUNE = on
            launched.clear()
            kernels.grouped_expand_eager(o, wx, group.expand, group._ends)
            key = kernels._key(o, 3, 3, group._ends, group.expand.shape[1])
            want = kernels._TUNED[key] if on else kernels.default_config(3, group.expand.shape[1], group._ends)
            assert launched == [want], (on, launched, want)
        print("tuned ok", len(shapes), n_timed)
        """
    )
    assert "tuned ok" in out


def test_every_candidate_tiling_compiles_for_an_h100_at_llama_8b_shapes():
    """No GPU needed: Triton compiles the kernel to sm_90 machine code (its bundled ptxas) for every
    tiling tune may try on Llama-3.1-8B's groups, decode- and prefill-sized, and each fits an H100's
    shared memory. A tiling that fails here would cost a device session its time."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    groups = [[4096, 5120, 6144], [4096], [14336, 28672], [4096]]  # q/k/v, o, gate/up, down
    configs = {cfg for rows in (32, 512) for bounds in groups for cfg in kernels.candidate_configs(rows, 80, bounds)}
    assert any(not c.early_base for c in configs) and any(c.block_m == 128 for c in configs)
    # the gate/up kernel with the activation runs the tiling tuned for its group's expand (decode-
    # sized here: prefill runs eagerly, where the activation is fused only with fuse=True)
    gate_up = set(kernels.candidate_configs(32, 80, groups[2]))
    jobs = [(kernels._grouped_expand_kernel, cfg, {}) for cfg in configs]
    jobs += [(kernels._expand_act_kernel, cfg, {"GELU": False}) for cfg in gate_up]
    jobs += [(kernels._expand_act_kernel, kernels.default_config(32, 80, groups[2]), {"GELU": True})]  # Gemma
    for fn, cfg, extra in sorted(jobs, key=lambda j: (j[0].__name__, j[1], str(j[2]))):
        sig = {p.name: "constexpr" if p.is_constexpr else "*bf16" if p.name.endswith("_ptr") else "i32" for p in fn.params}
        constants = {
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
            "UPCAST": False, "FP32": False, "EARLY_BASE": cfg.early_base, **extra,
        }  # fmt: skip
        compiled = triton.compile(
            ASTSource(fn, sig, constants),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True},
        )
        assert compiled.asm["cubin"], (fn.__name__, cfg)
        assert compiled.metadata.shared <= 227 * 1024, (fn.__name__, cfg, compiled.metadata.shared)
