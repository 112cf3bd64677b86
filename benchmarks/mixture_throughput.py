"""Greedy decode throughput: base vs Persona-MoE (a different mixture on every row) vs peft.

All variants share the same base weights and decode the same prompts for the same number of new
tokens (EOS suppressed), measured in one run, interleaved round-robin so that machine noise hits
them alike. Ratios are tokens/s relative to the base model measured in the same run.

    python benchmarks/mixture_throughput.py                          # embedded SmolLM2, CPU, batch 8
    python benchmarks/mixture_throughput.py --shape llama-3.1-8b --device cuda --dtype bfloat16 \
        --batch 32 --json out.json                                   # random Llama-3.1-8B shapes
    ... --compile --decoder personafuse      # every variant through personafuse.moe.decoding.greedy_generate

Variants:
  base        the base model alone
  moe         Persona-MoE: ten stacked rank-8 experts, per-row weights, no merge (default
              settings: on GPUs the packed inference layout, whose expand is the fused Triton
              kernel under --compile; on CPU the plain layout)
  moe_packed / moe_unpacked  (extra) the same with MixtureState.pack forced on / off
  moe_fused / moe_unfused  (extra) packed, the expand fused in eager mode too / never fused
  moe_tuned   (extra) moe with the fused expand's tile sizes timed on the device for each group
              shape (personafuse.moe.kernels.AUTOTUNE on during its calls only; the time spent tuning
              and the winning tilings are in the JSON)
  moe_act / moe_tuned_act  (extra) moe / moe_tuned with the MLP's activation and product fused
              into the gate/up expand (MixtureState.fuse_act; where the fused expand runs)
  peft_lora   peft with one rank-8 LoRA (unmerged)
  peft_cat    peft with the ten experts combined per request by add_weighted_adapter(..., "cat"):
              one adapter built per row (build time included), decoded as a peft mixed batch
  peft_cat_shared  (extra) one "cat" adapter for the whole batch, decode only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from personafuse.moe import kernels  # noqa: E402
from personafuse.moe.decoding import greedy_generate  # noqa: E402
from personafuse.moe.mixture import MixtureState, inject_mixture  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = (
    "base", "moe", "moe_packed", "moe_unpacked", "moe_fused", "moe_unfused", "moe_tuned", "moe_act",
    "moe_tuned_act", "peft_lora", "peft_cat", "peft_cat_shared",
)  # fmt: skip
SHAPES = {
    # Llama-3.1-8B (config.json of meta-llama/Llama-3.1-8B), randomly initialised.
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_graph_us(fn, iters: int) -> float:
    """Microseconds per replay of ``fn`` captured into a CUDA graph: kernel time without launch
    overhead, as under torch.compile's reduce-overhead mode. ``fn`` runs once on a side stream first
    (the capture must not see first-call allocations)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def load_base(args, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.shape:
        cfg = LlamaConfig(**SHAPES[args.shape])
        torch.manual_seed(0)
        with device:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        return model.eval(), f"random {args.shape} shapes"
    from personafuse import embedded

    src = embedded.resolve(args.model)
    model = embedded.load_causal_lm(src, "float32").to(device=device, dtype=dtype)
    return model.eval(), f"{args.model} ({src.path}/{src.gguf_file or ''})"


def share_weights(model):
    """A structural copy whose parameters and buffers are the very same tensors (no extra memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def randomise_lora(module_iter, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module_iter:
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model spec when --shape is not given")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random model of these shapes instead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="base,moe,peft_lora,peft_cat,peft_cat_shared")
    ap.add_argument("--expert-rank", type=int, default=8,
                    help="rank of each of the ten experts in the moe variant (the paper: 8); lower it to "
                    "separate per-op overhead from adapter arithmetic")
    ap.add_argument("--compile", action="store_true", help="static KV cache + torch.compile (GPU)")
    ap.add_argument("--decoder", choices=["generate", "personafuse"], default="generate",
                    help="the decoding loop for every variant: transformers' generate, or "
                    "personafuse.moe.decoding.greedy_generate (static cache, no host sync per token)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")

    from peft import LoraConfig, get_peft_model

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    base, desc = load_base(args, device, dtype)
    print(f"loaded {desc} in {time.perf_counter() - t0:.1f}s on {device} ({dtype})", flush=True)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, min(vocab, 30000), (args.batch, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    row_w = torch.softmax(torch.randn(args.batch, 10, generator=g) * 2, dim=-1)
    variants = args.variants.split(",")
    gen_kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=0,
    )
    if args.compile:
        gen_kw["cache_implementation"] = "static"
    if args.decoder == "personafuse" and "peft_cat" in variants:
        ap.error("--decoder personafuse: peft_cat decodes a mixed adapter batch, which only generate supports")

    def decode(model, **extra):
        """One greedy run of ``model`` with the chosen loop (same tokens either way, see tests)."""
        if args.decoder == "personafuse":
            return greedy_generate(model, ids, mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   pad_token_id=0, compile=args.compile)  # fmt: skip
        return model.generate(input_ids=ids, attention_mask=mask, **gen_kw, **extra)

    runners = {}
    if "base" in variants:
        runners["base"] = lambda: (0.0, decode(base))

    tune_s = []

    def make_moe(pack: bool | None, fuse: bool | None = None, tuned: bool = False, act: bool = False):
        moe = share_weights(base)
        state = MixtureState(10, args.expert_rank, 16 / 8)
        state.pack, state.fuse, state.fuse_act = pack, fuse, act
        inject_mixture(moe, TARGETS, state)
        moe.to(device)
        randomise_lora([p for n, p in moe.named_parameters() if "lora_" in n])
        w_dev = row_w.to(device)

        @contextlib.contextmanager
        def routed():
            """This variant's weights, and AUTOTUNE for its calls only (the kernel reads it at each
            eager call and when a CUDA graph is captured); the first call records the tuning time."""
            previous, kernels.AUTOTUNE = kernels.AUTOTUNE, tuned
            try:
                if tuned and not tune_s:
                    t = time.perf_counter()
                    state.set(w_dev)
                    sync(device)
                    tune_s.append(time.perf_counter() - t)
                with state.use(w_dev):
                    yield
            finally:
                kernels.AUTOTUNE = previous

        def run_moe():
            with routed():
                return 0.0, decode(moe)

        def logits():
            with routed():
                return moe(input_ids=ids, attention_mask=mask).logits[:, -1].float()

        run_moe.logits = logits
        return run_moe

    moe_variants = {
        "moe": (None, None), "moe_packed": (True, None), "moe_fused": (None, True), "moe_unfused": (None, False),
        "moe_unpacked": (False, None), "moe_tuned": (None, None, True), "moe_act": (None, None, False, True),
        "moe_tuned_act": (None, None, True, True),
    }  # fmt: skip
    for v, settings in moe_variants.items():
        if v in variants:
            runners[v] = make_moe(*settings)
    # The layouts compute the same sum: check it on this device before timing them.
    moe_runs = [runners[v] for v in moe_variants if v in runners]
    layout_diff = None
    if len(moe_runs) > 1:
        with torch.inference_mode():
            ref = moe_runs[-1].logits()
            others = [run.logits() for run in moe_runs[:-1]]
        layout_diff = max(float((a - ref).abs().max() / ref.abs().max()) for a in others)
        agree = min(float((a.argmax(-1) == ref.argmax(-1)).float().mean()) for a in others)
        print(f"moe layouts: max |logit diff| / max |logit| = {layout_diff:.2e}, same next token in {agree:.0%} of rows")

    need_peft = any(v.startswith("peft") for v in variants)
    if need_peft:
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
        pm = get_peft_model(share_weights(base), cfg, adapter_name="single").eval()
        for i in range(10):
            pm.add_adapter(f"e{i}", cfg)
        randomise_lora([p for n, p in pm.named_parameters() if "lora_" in n])
        experts = [f"e{i}" for i in range(10)]

        def run_lora():
            pm.set_adapter("single")
            return 0.0, decode(pm)

        counter = {"n": 0}

        def run_cat():
            counter["n"] += 1
            sync(device)
            t = time.perf_counter()
            names = []
            for b in range(args.batch):  # one adapter per request, as a server would have to
                name = f"req{counter['n']}_{b}"
                pm.add_weighted_adapter(experts, row_w[b].tolist(), name, combination_type="cat")
                names.append(name)
            sync(device)
            build = time.perf_counter() - t
            pm.set_adapter(names[0])
            out = decode(pm, adapter_names=names)
            for name in names:
                pm.delete_adapter(name)
            return build, out

        def run_cat_shared():
            if "shared" not in pm.peft_config:
                pm.add_weighted_adapter(experts, row_w[0].tolist(), "shared", combination_type="cat")
            pm.set_adapter("shared")
            return 0.0, decode(pm)

        for v, fn in (("peft_lora", run_lora), ("peft_cat", run_cat), ("peft_cat_shared", run_cat_shared)):
            if v in variants:
                runners[v] = fn

    tokens = args.batch * args.new_tokens
    times: dict[str, list[float]] = {k: [] for k in runners}
    builds: dict[str, list[float]] = {k: [] for k in runners}
    last_out: dict[str, torch.Tensor] = {}
    warmup_s: dict[str, float] = {}

    def summarise(rounds: int, first_token_agreement: float | None = None) -> dict:
        """The JSON record from the rounds timed so far (medians)."""
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: tokens / v for k, v in med.items()}
        return {
            "ratios": {f"{k}_vs_base": tps[k] / tps["base"] for k in tps if k != "base"} if "base" in tps else {},
            "tokens_per_s": tps,
            "decode_only_tokens_per_s": {k: tokens / (v - statistics.median(builds[k])) for k, v in med.items()},
            "peft_cat_build_s_per_request": statistics.median(builds["peft_cat"]) / args.batch
            if "peft_cat" in builds
            else None,
            "rounds_completed": rounds,
            "warmup_s": warmup_s,  # compilation included, with --compile
            "moe_layouts_rel_logit_diff": layout_diff,
            "moe_layouts_first_token_agreement": first_token_agreement,
            # moe_tuned: seconds its first routing decision spent timing tilings, and the winners
            "expand_tuning_s": tune_s[0] if tune_s else None,
            "expand_tuned_configs": kernels.tuned_configs(),
            "setup": {
                "model": desc,
                "expert_rank": args.expert_rank,
                "device": str(device),
                "device_name": torch.cuda.get_device_name()
                if device.type == "cuda"
                else platform.processor() or platform.machine(),
                "dtype": args.dtype,
                "batch": args.batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "compile": args.compile,
                "decoder": args.decoder,
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "peft": __import__("peft").__version__,
                "threads": torch.get_num_threads(),
                **({"peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30} if device.type == "cuda" else {}),
            },
            "raw_seconds": times,
        }

    def write_json(result: dict) -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    with torch.inference_mode():
        for name, fn in runners.items():  # warm-up (and compilation) outside the timings
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            warmup_s[name] = time.perf_counter() - t
            print(f"warm-up {name}: {warmup_s[name]:.1f}s", flush=True)
            if args.json:  # a run cut short during the warm-ups still says how far it got
                write_json({"ratios": {}, "rounds_completed": 0, "warmup_s": warmup_s})
        for rep in range(args.repeats):
            for name, fn in runners.items():
                sync(device)
                t = time.perf_counter()
                build, out = fn()
                sync(device)
                elapsed = time.perf_counter() - t
                assert out.shape[1] == args.prompt_len + args.new_tokens, (name, out.shape)
                last_out[name] = out[:, args.prompt_len]
                times[name].append(elapsed)
                builds[name].append(build)
            print(
                f"round {rep + 1}/{args.repeats}: "
                + ", ".join(f"{k} {tokens / v[-1]:.1f} tok/s" for k, v in times.items()),
                flush=True,
            )
            if args.json and rep + 1 < args.repeats:  # a run cut short by a time limit keeps its rounds
                write_json(summarise(rep + 1))

    # The timed runs themselves (compiled, if --compile): do the moe layouts pick the same first token?
    moe_names = [k for k in moe_variants if k in last_out]
    first_token_agreement = None
    if len(moe_names) > 1:
        ref_tok = last_out[moe_names[-1]]
        first_token_agreement = min(float((last_out[k] == ref_tok).float().mean()) for k in moe_names[:-1])
        print(f"moe layouts, timed runs: same first new token in {first_token_agreement:.0%} of rows")

    result = summarise(args.repeats, first_token_agreement)
    tps, decode_tps = result["tokens_per_s"], result["decode_only_tokens_per_s"]
    build_per_request = result["peft_cat_build_s_per_request"]
    print(
        f"\n{desc}, {device}, {dtype}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}"
    )
    print(f"{'variant':<18}{'tok/s':>10}{'vs base':>10}{'decode-only tok/s':>20}")
    for k in tps:
        ratio = tps[k] / tps["base"] if "base" in tps else float("nan")
        print(f"{k:<18}{tps[k]:>10.1f}{ratio:>9.2f}x{decode_tps[k]:>20.1f}")
    if build_per_request is not None:
        print(f"peft_cat adapter build: {build_per_request * 1000:.0f} ms per request")
    if args.json:
        write_json(result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
