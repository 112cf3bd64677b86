"""Where a decode step's time goes: base vs Persona-MoE, compiled, kernel by kernel.

One decode-shaped forward (``batch`` rows of one token, no cache, so the projections dominate as
they do in decoding) is compiled once per variant (inductor, no CUDA graphs, fullgraph), then

1. profiled with torch.profiler: CUDA time per kernel name, summed over a few calls, top N;
2. captured into a CUDA graph and replayed: the step's kernel time without launch overhead, which
   is what ``generate(..., cache_implementation="static")`` pays per token;
3. timed on the host around the compiled graph: the time torch.compile's own Python (guards,
   input gathering, replaying Python side effects) costs per call. Under CUDA graphs the GPU waits
   for it on every token, so it is part of the decode step too. Of that, the guard check alone is
   timed as well (warm: the same check 200 times in a row), with the guards counted by type.

The graph-replay ratio isolates the mixture's cost from ``generate``'s Python; the kernel table
says which kernels the mixture adds or slows (GEMM shapes, copies, the fused expand).

    python benchmarks/profile_decode.py --json out.json            # CUDA: random Llama-3.1-8B shapes, bf16
    python benchmarks/profile_decode.py --shape tiny --device cpu --dtype float32 --backend eager
    python benchmarks/profile_decode.py --shape tiny --layers 32 --device cpu --dtype float32 --backend eager
        # host side of a 32-layer model on CPU (the guard tree grows with the layer count)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixture_throughput import SHAPES, TARGETS, cuda_graph_us, load_base, randomise_lora, share_weights  # noqa: E402
from personafuse.moe import kernels  # noqa: E402
from personafuse.moe.mixture import MixtureState, inject_mixture  # noqa: E402
from personafuse.moe.packing import group_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, help="override the shape's number of decoder layers")
    ap.add_argument("--skip-guards", action="store_true",
                    help="compile without guards (unsafe; isolates the host time that is not the guard check)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", default="base,moe", help="base, moe (default fuse), moe_unfused, moe_packed (packed layout forced, as on accelerators; for CPU), "
                         "moe_tuned (moe with the fused expand's tiles tuned on the device, kernels.AUTOTUNE), "
                         "moe_act / moe_tuned_act (the MLP activation fused into the gate/up expand)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend ('eager' to check on CPU)")
    ap.add_argument("--calls", type=int, default=5, help="profiled calls per variant")
    ap.add_argument("--replays", type=int, default=50, help="timed CUDA-graph replays per variant")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    args.model = None  # load_base reads it only without --shape
    if args.layers:
        SHAPES[args.shape] = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    base, desc = load_base(args, device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, min(base.config.vocab_size, 30000), (args.batch, 1), generator=g).to(device)
    weights = torch.softmax(torch.randn(args.batch, 10, generator=g) * 2, dim=-1).to(device)
    result: dict = {"setup": {"model": desc, "device": torch.cuda.get_device_name() if cuda else "cpu",
                              "dtype": args.dtype, "batch": args.batch, "backend": args.backend,
                              "torch": torch.__version__}, "variants": {}}  # fmt: skip

    for name in args.variants.split(","):
        model = base
        kernels.AUTOTUNE = name in ("moe_tuned", "moe_tuned_act")  # variants run one after the other
        if name != "base":
            model = share_weights(base)
            state = MixtureState(10, 8, 16 / 8)
            state.fuse = False if name == "moe_unfused" else None
            state.pack = True if name == "moe_packed" else None
            state.fuse_act = name in ("moe_act", "moe_tuned_act")
            inject_mixture(model, TARGETS, state)
            group_layers(model, state)  # the packed layout, as PersonaFuseModel applies it
            model.to(device)
            randomise_lora([p for n, p in model.named_parameters() if "lora_" in n])
            state.set(weights)  # packs (on accelerators), outside the compiled region
        inner = {"s": 0.0}

        def timed_backend(gm, example_inputs, inner=inner):
            compiled = torch._dynamo.lookup_backend(args.backend)(gm, example_inputs)

            def call(*a):
                t = time.perf_counter()
                out = compiled(*a)
                inner["s"] += time.perf_counter() - t
                return out

            return call

        guard_types: dict[str, int] = {}

        def count_guards(entries, seen=guard_types):
            for e in entries:
                seen[e.guard_type] = seen.get(e.guard_type, 0) + 1
            return [not args.skip_guards] * len(entries)

        fwd = torch.compile(
            lambda m=model: m(input_ids=ids, use_cache=False).logits,
            backend=timed_backend,
            fullgraph=True,
            # guard_filter_fn came with the skip_*_unsafe helpers; older torch compiles without it
            options={"guard_filter_fn": count_guards} if hasattr(torch.compiler, "skip_all_guards_unsafe") else None,
        )
        with torch.inference_mode():
            t = time.perf_counter()
            fwd()
            compile_s = time.perf_counter() - t
            for _ in range(3):
                fwd()
            inner["s"], n_host = 0.0, 20
            t = time.perf_counter()
            for _ in range(n_host):
                fwd()
            host_us = ((time.perf_counter() - t) - inner["s"]) / n_host * 1e6
            guard_us = guard_check_us(fwd, {"m": model, "ids": ids})  # the lambda's argument and free variable
            if cuda:
                torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else []
            )
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.calls):
                    fwd()
                if cuda:
                    torch.cuda.synchronize()
            # self time: a kernel's own, never counted again under the operator that launched it
            attr = "self_device_time_total" if cuda else "self_cpu_time_total"
            rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)
            table = [{"name": e.key[:90], "us_per_call": getattr(e, attr) / args.calls, "count_per_call": e.count / args.calls}
                     for e in rows[: args.top]]  # fmt: skip
            total_us = sum(getattr(e, attr) for e in rows) / args.calls
            graph_us = cuda_graph_us(fwd, args.replays) if cuda else None
        result["variants"][name] = {
            "compile_s": compile_s,
            "kernel_us_per_call": total_us,
            "graph_replay_us": graph_us,
            "host_overhead_us": host_us,
            "guard_check_us": guard_us,
            "guards": dict(sorted(guard_types.items(), key=lambda kv: -kv[1])),
            "top": table,
        }
        print(f"\n== {name}: compiled in {compile_s:.0f}s; {'kernel' if cuda else 'cpu'} time {total_us:.0f} us per call"
              + (f"; CUDA-graph replay {graph_us:.0f} us" if graph_us else "")
              + f"; torch.compile host overhead {host_us:.0f} us per call (guard check "
              + (f"{guard_us:.0f} us" if guard_us is not None else "not timed")
              + f", {sum(guard_types.values())} guards)", flush=True)  # fmt: skip
        for row in table:
            print(f"  {row['us_per_call']:9.1f} us  x{row['count_per_call']:6.1f}  {row['name']}")
        del fwd
        torch._dynamo.reset()
        write_result(result, args.json)  # after every variant: a run cut short keeps the finished ones

    kernels.AUTOTUNE = False
    v = result["variants"]
    for name, r in v.items():
        if "step_ratio_vs_base" in r:
            print(f"{name}: decode-step time ratio (base / {name}, CUDA-graph replay) {r['step_ratio_vs_base']:.3f}")
    if args.json:
        print(f"wrote {args.json}")


def write_result(result: dict, path: Path | None) -> None:
    """Add the tuned tilings and each variant's step ratio to the base's, then write the JSON."""
    result["expand_tuned_configs"] = kernels.tuned_configs()
    v = result["variants"]
    base_us = v.get("base", {}).get("graph_replay_us")
    for name, r in v.items():
        if name != "base" and r["graph_replay_us"] and base_us:
            r["step_ratio_vs_base"] = base_us / r["graph_replay_us"]
    if path:
        path.write_text(json.dumps(result, indent=2) + "\n")


def guard_check_us(fwd, frame_locals: dict, n: int = 200) -> float | None:
    """Time the compiled function's guard check on its own (the one cache entry's guard tree)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    try:
        entries = _debug_get_cache_entry_list(fwd._torchdynamo_orig_callable.__code__)
        check = entries[0].guard_manager.check
    except (AttributeError, IndexError):  # another torch's internals: report nothing rather than fail
        return None
    if len(entries) != 1 or not check(frame_locals):
        return None  # recompiled, or the guards do not pass on these locals: nothing to time
    t = time.perf_counter()
    for _ in range(n):
        check(frame_locals)
    return (time.perf_counter() - t) / n * 1e6


if __name__ == "__main__":
    main()
