"""What bounds a CPU decode step: memory bandwidth or small-GEMM efficiency? Base vs Persona-MoE.

Measures, in one run on the embedded SmolLM2-135M at batch 8 (the CPU target's setting):

1. the machine's streaming read bandwidth (a sum over 400 MB) and what one real decode GEMM reaches
   (the lm_head, [8, 576] x [576, 49152], weights out of cache);
2. one decode-shaped forward (8 rows of one token, no cache), base vs moe (ten rank-8 experts, a
   different mixture per row), median of interleaved calls, eager or compiled (``--compile inductor``:
   default inductor; ``--compile cpp``: inductor's C++ GEMM templates with weight freezing and
   max-autotune, the configuration meant for small-batch CPU inference);
3. eager only: the profiler's self CPU time per aten op, so the mixture's extra ops show by name.

    python benchmarks/cpu_decode_step.py [--compile inductor|cpp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixture_throughput import TARGETS, randomise_lora, share_weights  # noqa: E402
from personafuse import embedded  # noqa: E402
from personafuse.moe.mixture import MixtureState, inject_mixture  # noqa: E402
from personafuse.moe.packing import group_layers  # noqa: E402


def bandwidths() -> dict[str, float]:
    x = torch.randn(100_000_000)
    x.sum()
    t = time.perf_counter()
    for _ in range(3):
        x.sum()
    stream = x.numel() * 4 * 3 / (time.perf_counter() - t) / 1e9
    del x
    w, h = torch.randn(49152, 576), torch.randn(8, 576)
    torch.nn.functional.linear(h, w)
    t = time.perf_counter()
    for _ in range(5):
        torch.nn.functional.linear(h, w)
    dt = (time.perf_counter() - t) / 5
    return {"stream_read_gb_s": stream, "lm_head_gemm_gb_s": w.numel() * 4 / dt / 1e9, "lm_head_gemm_ms": dt * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", choices=["none", "inductor", "cpp"], default="none")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=9, help="timed calls per variant, interleaved")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    result: dict = {"setup": {"compile": args.compile, "batch": args.batch, "threads": torch.get_num_threads(),
                              "torch": torch.__version__}}  # fmt: skip
    result.update(bandwidths())
    print(f"stream read {result['stream_read_gb_s']:.1f} GB/s; lm_head GEMM at {args.batch} rows "
          f"{result['lm_head_gemm_ms']:.2f} ms = {result['lm_head_gemm_gb_s']:.1f} GB/s of weights", flush=True)  # fmt: skip

    base = embedded.load_causal_lm(embedded.resolve("default")).eval()
    moe = share_weights(base)
    state = MixtureState(10, 8, 16 / 8)
    inject_mixture(moe, TARGETS, state)
    group_layers(moe, state)  # the packed layout, as PersonaFuseModel applies it
    randomise_lora([p for n, p in moe.named_parameters() if "lora_" in n])
    w = torch.softmax(torch.randn(args.batch, 10) * 2, -1)
    ids = torch.randint(100, 30000, (args.batch, 1))
    if args.compile == "cpp":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        inductor_config.max_autotune = True
        inductor_config.max_autotune_gemm_backends = "CPP,ATEN"

    with state.use(w), torch.inference_mode():
        fns = {}
        for name, m in (("base", base), ("moe", moe)):
            fn = lambda m=m: m(input_ids=ids, use_cache=False).logits  # noqa: E731
            if args.compile != "none":
                fn = torch.compile(fn)
            t = time.perf_counter()
            fn()
            fn()
            result.setdefault("warmup_s", {})[name] = time.perf_counter() - t
            fns[name] = fn
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.calls):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        result["forward_ms"] = med
        result["ratio_moe_vs_base"] = med["base"] / med["moe"]
        print(f"one decode-shaped forward ({args.compile}): base {med['base']:.2f} ms, moe {med['moe']:.2f} ms, "
              f"ratio {result['ratio_moe_vs_base']:.3f}")  # fmt: skip
        if args.compile == "none":
            result["ops_ms"] = {}
            for name, fn in fns.items():
                with torch.profiler.profile() as prof:
                    for _ in range(3):
                        fn()
                rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
                ops = {e.key: {"ms": e.self_cpu_time_total / 3 / 1e3, "calls": e.count // 3} for e in rows}
                result["ops_ms"][name] = ops
                print(f"{name}: " + ", ".join(f"{k} {v['ms']:.2f} ms x{v['calls']}" for k, v in ops.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
