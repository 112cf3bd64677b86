"""Would a faster skinny GEMM close the CPU gap? torch's GEMM vs a hand-written C kernel at 8 rows.

The CPU target (Persona-MoE >= 0.90x base at batch 8) asks the mixture's ten rank-8 experts (24.4 M
parameters a step, 18 % on top of the base's 134.5 M) to cost under 10 % of a step. torch's GEMMs
reach 7-13 GB/s at 8 rows on this machine against 29-45 GB/s of streaming reads
(``cpu_decode_step.py``), so a kernel that streams the experts faster than torch streams the base
would pass; the question is whether that says anything about the mixture. This script measures,
in one run:

1. GEMM rates at 8 rows, weights out of cache (30 layers' worth cycled): the base's seven
   projection shapes and the experts' shrink/expand shapes, torch (``F.linear``) vs the C kernel
   (``x W^T`` with ``W`` pre-packed in 16-column panels, OpenMP over panels; for the experts, one
   call per projection does shrink, weights and expand, split over K then over N);
2. one decode-shaped forward of the embedded SmolLM2-135M (8 rows of one token, no cache), median
   of interleaved calls: ``base`` and ``moe`` as shipped (torch GEMMs), ``moe_c_experts`` (torch for
   the base projections, the C kernel for the experts: the mixture's extra work made cheaper than
   the base's own), and ``base_c`` / ``moe_c`` (the C kernel for every adapted projection in both:
   equal kernels; the lm_head stays torch everywhere).

Needs ``gcc`` (the kernel is compiled into a temporary directory at start; nothing is installed).
A benchmark only: the library does not ship this kernel (docs/performance.md says why).

    python benchmarks/cpu_skinny_gemm.py [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixture_throughput import TARGETS, randomise_lora, share_weights  # noqa: E402
from personafuse import embedded  # noqa: E402
from personafuse.moe.mixture import LIVE, MixtureLinear, MixtureState, _match_batch, inject_mixture  # noqa: E402
from personafuse.moe.packing import group_layers  # noqa: E402

TW = 16  # panel width: one AVX-512 register of fp32
C_SOURCE = r"""
#include <stddef.h>
#include <string.h>
#include <omp.h>
#define TW 16
#define MB 8
#define MAXR 256
#define MAXM 32
#define MAXT 64
static float part[MAXT][MAXM * MAXR];  /* each thread's partial shrink */

/* a[m][:] += sum_{k0 <= k < k1} x[m, k] * p[k][:] for mb <= MB rows: one weight load feeds mb FMAs */
static inline void panel(const float* x, int ldx, const float* p, int k0, int k1, int mb, float a[MB][TW]) {
    for (int k = k0; k < k1; ++k) {
        const float* w = p + (size_t)k * TW;
        __builtin_prefetch(w + 16 * TW);
        for (int m = 0; m < MB; ++m) {
            if (m >= mb) break;
            float xv = x[(size_t)m * ldx + k];
            #pragma GCC unroll 16
            for (int j = 0; j < TW; ++j) a[m][j] += xv * w[j];
        }
    }
}

/* y[M, N] = x[M, K] W^T, W packed as [N / TW][K][TW] */
int skinny_mm(const float* x, int ldx, const float* P, float* y, int ldy, int M, int K, int N) {
    if (N % TW) return -1;
    #pragma omp parallel for schedule(static)
    for (int c = 0; c < N / TW; ++c)
        for (int m0 = 0; m0 < M; m0 += MB) {
            int mb = M - m0 < MB ? M - m0 : MB;
            float a[MB][TW];
            memset(a, 0, sizeof a);
            panel(x + (size_t)m0 * ldx, ldx, P + (size_t)c * K * TW, 0, K, mb, a);
            for (int m = 0; m < mb; ++m) memcpy(y + (size_t)(m0 + m) * ldy + c * TW, a[m], sizeof a[m]);
        }
    return 0;
}

/* y[M, N] += ((x A^T) * s) B^T; PA = A^T as [R / TW][K][TW], PB = B^T as [N / TW][R][TW] */
int lora_delta(const float* x, int ldx, const float* s, int lds, const float* PA, const float* PB,
               float* y, int ldy, int M, int K, int R, int N) {
    if (M > MAXM || R > MAXR || R % TW || N % TW) return -1;
    #pragma omp parallel
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        if (nt > MAXT) nt = MAXT;
        if (t < nt) {  /* shrink: this thread's share of K, every panel */
            int k0 = (int)((long)K * t / nt), k1 = (int)((long)K * (t + 1) / nt);
            for (int m0 = 0; m0 < M; m0 += MB) {
                int mb = M - m0 < MB ? M - m0 : MB;
                for (int c = 0; c < R / TW; ++c) {
                    float a[MB][TW];
                    memset(a, 0, sizeof a);
                    panel(x + (size_t)m0 * ldx, ldx, PA + (size_t)c * K * TW, k0, k1, mb, a);
                    for (int m = 0; m < mb; ++m) memcpy(part[t] + (size_t)(m0 + m) * R + c * TW, a[m], sizeof a[m]);
                }
            }
        }
        #pragma omp barrier
        if (t < nt) {  /* sum the partials, weight them, expand this thread's panels into y */
            float h[MAXM * MAXR];
            for (int i = 0; i < M * R; ++i) {
                float v = 0.f;
                for (int u = 0; u < nt; ++u) v += part[u][i];
                h[i] = v * s[(size_t)(i / R) * lds + i % R];
            }
            int NT = N / TW;
            for (int c = (int)((long)NT * t / nt); c < (int)((long)NT * (t + 1) / nt); ++c)
                for (int m0 = 0; m0 < M; m0 += MB) {
                    int mb = M - m0 < MB ? M - m0 : MB;
                    float a[MB][TW];
                    memset(a, 0, sizeof a);
                    panel(h + (size_t)m0 * R, R, PB + (size_t)c * R * TW, 0, R, mb, a);
                    for (int m = 0; m < mb; ++m) {
                        float* yr = y + (size_t)(m0 + m) * ldy + c * TW;
                        for (int j = 0; j < TW; ++j) yr[j] += a[m][j];
                    }
                }
        }
    }
    return 0;
}
"""


def build_kernel() -> ctypes.CDLL:
    gcc = shutil.which("gcc")
    if gcc is None:
        sys.exit("cpu_skinny_gemm.py needs gcc on PATH to build its C kernel")
    tmp = Path(tempfile.mkdtemp(prefix="pf-skinny-"))
    (tmp / "k.c").write_text(C_SOURCE)
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC"]
    subprocess.run([gcc, *flags, str(tmp / "k.c"), "-o", str(tmp / "k.so")], check=True)
    # torch has loaded its own libgomp.so.1 already, so the kernel joins torch's OpenMP pool
    lib = ctypes.CDLL(str(tmp / "k.so"))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.skinny_mm.argtypes = [p, i, p, p, i, i, i, i]
    lib.lora_delta.argtypes = [p, i, p, i, p, p, p, i, i, i, i, i]
    return lib


def pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] (nn.Linear layout) -> [N / TW, K, TW]: each panel's weights in the order they are read."""
    n, k = w.shape
    return w.detach().t().reshape(k, n // TW, TW).permute(1, 0, 2).contiguous()


class CLinear:
    """``F.linear`` through the C kernel for 2-D/3-D fp32 inputs of at most 32 rows (else torch)."""

    def __init__(self, lib: ctypes.CDLL, linear: torch.nn.Linear) -> None:
        self.lib, self.linear, self.packed = lib, linear, pack(linear.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > 32 or self.linear.bias is not None:
            return F.linear(x, self.linear.weight, self.linear.bias)
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        n = self.linear.out_features
        y = x2.new_empty(x2.shape[0], n)
        self.lib.skinny_mm(x2.data_ptr(), x2.stride(0), self.packed.data_ptr(), y.data_ptr(), n, x2.shape[0],
                           x2.shape[1], n)  # fmt: skip
        return y.view(*x.shape[:-1], n)


def c_mixture_forward(lib: ctypes.CDLL, layer: MixtureLinear, c_base: bool):
    """A forward for one ``MixtureLinear`` at inference: base GEMM by torch (or the kernel if
    ``c_base``), then the experts' shrink, weights and expand in one kernel call."""
    pa, pb = pack(layer.lora_A), pack(layer.lora_B)
    base = CLinear(lib, layer.base) if c_base else None
    torch_forward = type(layer).forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = LIVE[self.live_key] if self.live_key in LIVE else self.state.live  # noqa: SIM401
        w = live.expanded
        x2 = x.reshape(-1, x.shape[-1])
        if w is None or live.expert_index is not None or torch.is_grad_enabled() or x2.shape[0] > 32:
            return torch_forward(self, x)
        w = w.squeeze(1) if x.dim() == 3 else w
        w = _match_batch(w, x2.shape[0]) if w.shape[0] != x2.shape[0] else w
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        y = base(x2) if base is not None else F.linear(x2, self.base.weight, self.base.bias)
        m, k, n = x2.shape[0], x2.shape[1], y.shape[1]
        lib.lora_delta(x2.data_ptr(), x2.stride(0), w.data_ptr(), w.stride(0), pa.data_ptr(), pb.data_ptr(),
                       y.data_ptr(), n, m, k, pa.shape[0] * TW, n)  # fmt: skip
        return y.view(*x.shape[:-1], n)

    return types.MethodType(forward, layer)


def _time_calls(fns: list, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for fn in fns:
            fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_rates(lib: ctypes.CDLL, rows: int, layers: int = 30, reps: int = 9) -> dict:
    """GB/s of weights read, 30 layers' worth cycled so that every call reads its weights from DRAM."""
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    rank = 80  # ten rank-8 experts, stacked

    # the base's projections: y = x W^T
    mats = [(torch.randn(n, k), torch.randn(rows, k)) for _ in range(layers) for k, n in shapes]
    base_calls = {
        "torch": [lambda w=w, x=x: F.linear(x, w) for w, x in mats],
        "c_kernel": [lambda p=pack(w), x=x, y=torch.empty(rows, w.shape[0]), n=w.shape[0]:
                     lib.skinny_mm(x.data_ptr(), x.shape[1], p.data_ptr(), y.data_ptr(), n, rows, x.shape[1], n)
                     for w, x in mats],
    }  # fmt: skip
    base_bytes = sum(w.numel() * 4 for w, _ in mats)

    # the experts on the same projections: y += ((x A^T) * s) B^T, as MixtureLinear's inference path
    s = torch.rand(rows, rank)
    lora = [(torch.randn(rank, k) * 0.01, torch.randn(n, rank) * 0.01, torch.randn(rows, k))
            for _ in range(layers) for k, n in shapes]  # fmt: skip
    expert_calls = {
        "torch": [lambda a=a, b=b, x=x, y=torch.zeros(rows, b.shape[0]): y.addmm_(F.linear(x, a).mul_(s), b.t())
                  for a, b, x in lora],
        "c_kernel": [lambda pa=pack(a), pb=pack(b), x=x, y=torch.zeros(rows, b.shape[0]), n=b.shape[0]:
                     lib.lora_delta(x.data_ptr(), x.shape[1], s.data_ptr(), rank, pa.data_ptr(), pb.data_ptr(),
                                    y.data_ptr(), n, rows, x.shape[1], rank, n)
                     for a, b, x in lora],
    }  # fmt: skip
    expert_bytes = sum((a.numel() + b.numel()) * 4 for a, b, _ in lora)

    out = {}
    for name, calls, nbytes in (("base_projections", base_calls, base_bytes), ("experts", expert_calls, expert_bytes)):
        res = {}
        for kind, fns in calls.items():
            dt = _time_calls(fns, reps)
            res[kind] = {"ms": dt * 1e3, "gb_s": nbytes / dt / 1e9}
        res["c_speedup"] = res["torch"]["ms"] / res["c_kernel"]["ms"]
        out[name] = {"mbytes": nbytes / 1e6, **res}
        print(f"{name:16s} {nbytes / 1e6:6.1f} MB  torch {res['torch']['ms']:6.2f} ms ({res['torch']['gb_s']:4.1f} GB/s)"
              f"  C {res['c_kernel']['ms']:6.2f} ms ({res['c_kernel']['gb_s']:4.1f} GB/s)  {res['c_speedup']:.2f}x",
              flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=15, help="timed forwards per variant, interleaved")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not 1 <= args.batch <= 32:
        ap.error(f"--batch must be between 1 and 32 (the kernel's row limit), got {args.batch}")
    torch.manual_seed(0)
    lib = build_kernel()
    result: dict = {
        "setup": {"batch": args.batch, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "calls": args.calls},
        "gemm_rates": gemm_rates(lib, args.batch),
    }  # fmt: skip

    base = embedded.load_causal_lm(embedded.resolve("default"), "float32").eval()
    g = torch.Generator().manual_seed(1)
    weights = torch.softmax(torch.randn(args.batch, 10, generator=g) * 2, dim=-1)
    ids = torch.randint(100, 30000, (args.batch, 1), generator=g)

    def mixture():
        model = share_weights(base)
        state = MixtureState(10, 8, 16 / 8)
        inject_mixture(model, TARGETS, state)
        group_layers(model, state)  # the packed layout, as PersonaFuseModel applies it
        randomise_lora([p for n, p in model.named_parameters() if "lora_" in n])
        return model, state

    moe, state = mixture()
    moe_c_experts, state_ce = mixture()
    moe_c, state_c = mixture()
    base_c = share_weights(base)
    for module in list(base_c.modules()):
        for t in TARGETS:
            child = getattr(module, t, None)
            if isinstance(child, torch.nn.Linear):
                child.forward = CLinear(lib, child)
    for model, c_base in ((moe_c_experts, False), (moe_c, True)):
        for layer in model.modules():
            if isinstance(layer, MixtureLinear):
                layer.forward = c_mixture_forward(lib, layer, c_base)

    variants = {"base": (base, None), "moe": (moe, state), "moe_c_experts": (moe_c_experts, state_ce),
                "base_c": (base_c, None), "moe_c": (moe_c, state_c)}  # fmt: skip

    def forward(name):
        model, st = variants[name]
        if st is None:
            return model(input_ids=ids).logits[:, -1]
        with st.use(weights):
            return model(input_ids=ids).logits[:, -1]

    with torch.inference_mode():
        # same randomised experts in every moe (randomise_lora is seeded): same logits, up to rounding
        ref = {"base": forward("base"), "moe": forward("moe")}
        diffs = {k: float((forward(k) - ref[k.split("_")[0]]).abs().max() / ref[k.split("_")[0]].abs().max())
                 for k in ("moe_c_experts", "base_c", "moe_c")}  # fmt: skip
        print("max |logit diff| / max |logit| against the torch forward:",
              ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.calls):
            for name in variants:
                t = time.perf_counter()
                forward(name)
                times[name].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratios = {
        "moe_vs_base": ms["base"] / ms["moe"],
        "moe_c_experts_vs_base": ms["base"] / ms["moe_c_experts"],
        "moe_c_vs_base_c": ms["base_c"] / ms["moe_c"],
        "base_c_vs_base": ms["base"] / ms["base_c"],
    }
    print(f"decode-shaped forward, {args.batch} rows, median of {args.calls}:")
    for k, v in ms.items():
        print(f"  {k:14s} {v:6.1f} ms")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    result.update(forward_ms=ms, forward_ratios=ratios, max_rel_logit_diff=diffs)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
