"""One decoder layer's seven adapted projections: cost and accuracy of each inference layout.

Builds the seven linears of one Llama-3.1-8B layer (random weights, ten rank-8 experts each) and
times one pass over them, at decode-sized and prefill-sized row counts, for:

  base     the seven base GEMMs alone (what the mixture adds to)
  plain    MixtureLinear's plain path: base GEMM, shrink, multiply, expand-add per projection
  packed   PackedGroup with the expand as torch ops (MixtureState.fuse = False)
  fused    PackedGroup with the fused Triton expand (kernels.grouped_expand), the GPU default

and, with the MLP's SiLU(gate) * up included (six outputs: q, k, v, o, act, down):

  base_act   the base GEMMs, then SiLU(gate) * up as torch ops
  fused_act  fused, with the activation and product in the gate/up kernel
             (kernels.grouped_expand_act, MixtureState.fuse_act)

On CUDA each is timed twice: eager (launch overhead included) and replayed from a CUDA graph
(kernel time alone, as under torch.compile's reduce-overhead). Every layout's outputs are
compared with a float64 computation of the same sum, so rounding can be told from a bug.

    python benchmarks/expand_kernel.py --json out.json          # CUDA, bfloat16
    python benchmarks/expand_kernel.py --device cpu --dtype float32 --hidden 256 --inter 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixture_throughput import cuda_graph_us  # noqa: E402
from personafuse.moe.mixture import MixtureLinear, MixtureState  # noqa: E402
from personafuse.moe.packing import group_layers, group_of  # noqa: E402


def build(hidden: int, kv: int, inter: int, device, dtype):
    """The seven projections as ``*_proj`` children of one module, grouped as in a model."""
    state = MixtureState(10, 8, 2.0)
    shapes = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
              "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    layer = nn.Module()
    for name, (i, o) in shapes.items():
        lin = nn.Linear(i, o, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(o, i, generator=g) / i**0.5)
        m = MixtureLinear(lin, state)
        with torch.no_grad():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / i**0.5)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
        setattr(layer, f"{name}_proj", m.to(device=device, dtype=dtype))
    group_layers(layer, state)  # q/k/v and gate/up packed together, o and down alone
    group_of(layer.gate_proj).act = "silu"  # Llama's MLP activation, for the fused_act layout
    return state, Projections(layer, list(shapes))


class Projections:
    """The layer's projections by short name, read from the layer at each access: packing swaps its
    own layer type (PackedMixtureLinear) in while packed, so a reference kept from before is stale."""

    def __init__(self, layer: nn.Module, names: list[str]) -> None:
        self.layer, self.names = layer, names

    def __getitem__(self, name: str) -> nn.Module:
        return getattr(self.layer, f"{name}_proj")

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(n, self[n]) for n in self.names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--kv", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--rows", default="32,512", help="row counts (batch x new tokens) to time")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    state, mods = build(args.hidden, args.kv, args.inter, device, dtype)
    results: dict = {"setup": {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype,
                               "hidden": args.hidden, "kv": args.kv, "inter": args.inter, "torch": torch.__version__}}  # fmt: skip

    for rows in (int(r) for r in args.rows.split(",")):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, args.hidden, generator=g).to(device, dtype)
        xd = torch.randn(rows, args.inter, generator=g).to(device, dtype)
        w = torch.softmax(torch.randn(rows, 10, generator=g) * 2, -1).to(device)
        inputs = {"q": x, "k": x, "v": x, "o": x, "gate": x, "up": x, "down": xd}

        def run_base(inputs=inputs):
            return [F.linear(inputs[n], m.base.weight) for n, m in mods.items()]

        def run_mixture(inputs=inputs):
            state.live.shared = {}  # what a model's forward pre-hook opens: siblings share a group
            outs = [m(inputs[n]) for n, m in mods.items()]
            state.live.shared = None
            return outs

        def with_act(outs):  # q, k, v, o, gate, up, down -> q, k, v, o, SiLU(gate) * up, down
            return [*outs[:4], F.silu(outs[4]) * outs[5], outs[6]]

        def run_fused_act(inputs=inputs):
            gate = mods["gate"]
            outs = [mods[n](inputs[n]) for n in ("q", "k", "v", "o")]
            act = group_of(gate).compute_act(inputs["gate"], state.expanded.squeeze(1))
            return [*outs, act, mods["down"](inputs["down"])]

        # name: (pass, pack, fuse)
        layouts = {"base": (run_base, False, None), "plain": (run_mixture, False, None),
                   "packed": (run_mixture, True, False), "fused": (run_mixture, True, True),
                   "base_act": (lambda: with_act(run_base()), False, None), "fused_act": (run_fused_act, True, True)}  # fmt: skip
        # float64 reference of the mixture (the sum over experts, written out)
        with torch.no_grad():
            wexp = (w.double() * state.scaling).repeat_interleave(state.r, dim=1)
            ref = [F.linear(inputs[n].double(), m.base.weight.double())
                   + (inputs[n].double() @ m.lora_A.double().T * wexp) @ m.lora_B.double().T
                   for n, m in mods.items()]  # fmt: skip
            ref_act = with_act(ref)
        row: dict = {}
        for name, (fn, pack, fuse) in layouts.items():
            state.pack, state.fuse = pack, fuse
            state.invalidate_packs()
            with torch.inference_mode():
                state.set(w)
                if fuse and not all(gr.fused for gr in state.groups):
                    print(f"rows {rows}: fused expand unavailable here (no Triton for {device}); {name} skipped")
                    continue
                outs = fn()
                err = None
                if not name.startswith("base"):
                    want = ref_act if name.endswith("_act") else ref
                    err = max(
                        float((o.double() - r).abs().max() / r.abs().max())
                        for o, r in zip(outs, want, strict=True)
                    )
                for _ in range(3):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
                eager_us = (time.perf_counter() - t) / args.iters * 1e6
                graph_us = cuda_graph_us(fn, args.iters) if cuda else None
                state.set(None)
            row[name] = {"eager_us": eager_us, "graph_us": graph_us, "rel_err_vs_fp64": err}
            print(f"rows {rows:5d}  {name:7s} eager {eager_us:8.1f} us"
                  + (f"   graph {graph_us:8.1f} us" if graph_us is not None else "")
                  + (f"   max rel err vs fp64 {err:.2e}" if err is not None else ""), flush=True)  # fmt: skip
        results[f"rows_{rows}"] = row
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
