"""``grouped_expand``: every expert expand of a packed sibling group in one GPU kernel.

A :class:`~personafuse.moe.packing.PackedGroup` computes ``out = x P^T``, whose first ``split`` columns
are the members' base outputs and whose last ``n * R`` columns are each member's shrink
``h_j = x A_j^T`` (``R = experts * r``). This op finishes the layer::

    y[:, lo_j:hi_j] = out[:, lo_j:hi_j] + (h_j * w) B_j^T        for each member j

with ``B = [B_1; ...; B_n]`` (the members' ``lora_B`` stacked by rows, no zeros) and ``w`` the
per-sequence expanded mixture weights. On a GPU that is one Triton kernel where torch ops need a
multiply and one GEMM per member: kernel count is what a decode step pays for
(docs/performance.md). Elsewhere, or without Triton, it runs the same sum as torch ops.

It is a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` and CUDA graphs take
it as one opaque node. ``TRITON_INTERPRET=1`` (set before import) runs the kernel on CPU tensors,
which is how the tests check it without a GPU.

Tile sizes come from a fixed rule (:func:`default_config`). With ``AUTOTUNE`` on (or
``PERSONAFUSE_AUTOTUNE=1`` in the environment), :func:`tune` times a few candidate tilings on the
device for one group shape and batch, like ``torch.backends.cudnn.benchmark``, and the kernel
then uses the fastest. ``MixtureState.set`` calls it for the decode shape (one token per row)
when it packs, so tuning never runs inside a compiled region or a CUDA-graph capture.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:  # CPU-only installs: the torch path below serves every call
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_MEMBERS = 3  # q/k/v is the largest sibling group
# Use tuned tile configs (see tune); read at call time, so it can be switched per model run.
AUTOTUNE = os.environ.get("PERSONAFUSE_AUTOTUNE", "0") not in ("", "0", "false", "False")


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3  # Triton's defaults on NVIDIA GPUs
    early_base: bool = True  # load the base outputs before the K loop (see the kernel)


def triton_usable(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


def block_n(sizes: list[int]) -> int | None:
    """Largest column tile that no member boundary falls inside (a tile reads one member's h)."""
    for b in (64, 32, 16):
        if all(s % b == 0 for s in sizes):
            return b
    return None


if triton is not None:

    @triton.jit
    def _scaled_dot(h, w, bt, UPCAST: tl.constexpr, FP32: tl.constexpr):
        """``(h * w) @ bt`` in fp32, the product rounded to the input dtype as the eager multiply."""
        hw = h.to(tl.float32) * w.to(tl.float32)
        if UPCAST:  # the CPU interpreter has no bf16 dot
            r = tl.dot(hw.to(h.dtype).to(tl.float32), bt.to(tl.float32))
        elif FP32:  # full precision, as torch's fp32 matmul (Triton would use TF32)
            r = tl.dot(hw, bt, input_precision="ieee")
        else:  # round like the eager multiply, then a tensor-core dot
            r = tl.dot(hw.to(bt.dtype), bt)
        return r

    @triton.jit
    def _grouped_expand_kernel(
        out_ptr, w_ptr, b_ptr, y_ptr,
        M, N, R, rows_per_w, b1, b2,
        stride_out, stride_w, stride_b, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
        FP32: tl.constexpr, EARLY_BASE: tl.constexpr,
    ):  # fmt: skip
        # int64 offsets: a long prefill's rows x row stride can pass 2**31
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        n0 = tl.program_id(1) * BLOCK_N
        rn = n0 + tl.arange(0, BLOCK_N)
        # Member of this column tile (tiles never straddle members); its shrink starts there.
        j = (n0 >= b1).to(tl.int32) + (n0 >= b2).to(tl.int32)
        h_col = N + j * R
        mask_m = rm < M
        mask_n = rn < N
        mn = mask_m[:, None] & mask_n[None, :]
        base_ptrs = out_ptr + rm[:, None] * stride_out + rn[None, :]
        if EARLY_BASE:  # issued first, its memory latency overlaps the loop's loads (decode sizes wait
            base = tl.load(base_ptrs, mask=mn, other=0.0)  # on round trips more than on bytes)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, R, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < R
            mk = mask_m[:, None] & mask_k[None, :]
            h = tl.load(out_ptr + rm[:, None] * stride_out + h_col + rk[None, :], mask=mk, other=0.0)
            w = tl.load(w_ptr + (rm // rows_per_w)[:, None] * stride_w + rk[None, :], mask=mk, other=0.0)
            bt = tl.load(
                b_ptr + rn[None, :] * stride_b + rk[:, None],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc += _scaled_dot(h, w, bt, UPCAST, FP32)
        if not EARLY_BASE:
            base = tl.load(base_ptrs, mask=mn, other=0.0)
        y = base.to(tl.float32) + acc
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mn)

    @triton.jit
    def _expand_act_kernel(
        out_ptr, w_ptr, b_ptr, y_ptr,
        M, INTER, R, rows_per_w,
        stride_out, stride_w, stride_b, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
        FP32: tl.constexpr, EARLY_BASE: tl.constexpr, GELU: tl.constexpr,
    ):  # fmt: skip
        # The gate/up group of an MLP: columns [0, INTER) gate, [INTER, 2 INTER) up, then the two
        # shrinks. A tile expands the same columns of both members and writes act(gate) * up.
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < INTER
        mn = mask_m[:, None] & mask_n[None, :]
        g_ptrs = out_ptr + rm[:, None] * stride_out + rn[None, :]
        if EARLY_BASE:
            g0 = tl.load(g_ptrs, mask=mn, other=0.0)
            u0 = tl.load(g_ptrs + INTER, mask=mn, other=0.0)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, R, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < R
            mk = mask_m[:, None] & mask_k[None, :]
            h_ptrs = out_ptr + rm[:, None] * stride_out + 2 * INTER + rk[None, :]
            hg = tl.load(h_ptrs, mask=mk, other=0.0)
            hu = tl.load(h_ptrs + R, mask=mk, other=0.0)
            w = tl.load(w_ptr + (rm // rows_per_w)[:, None] * stride_w + rk[None, :], mask=mk, other=0.0)
            b_ptrs = b_ptr + rn[None, :] * stride_b + rk[:, None]
            kn = mask_k[:, None] & mask_n[None, :]
            bg = tl.load(b_ptrs, mask=kn, other=0.0)
            bu = tl.load(b_ptrs + INTER * stride_b, mask=kn, other=0.0)
            acc_g += _scaled_dot(hg, w, bg, UPCAST, FP32)
            acc_u += _scaled_dot(hu, w, bu, UPCAST, FP32)
        if not EARLY_BASE:
            g0 = tl.load(g_ptrs, mask=mn, other=0.0)
            u0 = tl.load(g_ptrs + INTER, mask=mn, other=0.0)
        # gate and up rounded to the output dtype, as the unfused path stores them
        g = (g0.to(tl.float32) + acc_g).to(y_ptr.dtype.element_ty).to(tl.float32)
        u = (u0.to(tl.float32) + acc_u).to(y_ptr.dtype.element_ty).to(tl.float32)
        if GELU:  # noqa: SIM108 (tanh approximation; tanh(z) = 2 sigmoid(2z) - 1)
            a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
        else:  # SiLU
            a = g * tl.sigmoid(g)
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], (a * u).to(y_ptr.dtype.element_ty), mask=mn)


# What the gate/up kernel can apply between the two (the MLP's act_fn), with its torch reference.
ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}


def _reference(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    n_out = bounds[-1]
    rank = b.shape[1]
    rows = out.shape[0]
    w_rows = w.repeat_interleave(rows // w.shape[0], dim=0) if w.shape[0] != rows else w
    y = out[:, :n_out].clone()
    lo = 0
    for j, hi in enumerate(bounds):
        h = out[:, n_out + j * rank : n_out + (j + 1) * rank] * w_rows
        y[:, lo:hi].addmm_(h, b[lo:hi].t())
        lo = hi
    return y


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())  # tl.dot wants every block dimension >= 16


def _sizes(bounds: list[int]) -> list[int]:
    return [hi - lo for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True)]


def default_config(rows: int, rank: int, bounds: list[int]) -> TileConfig:
    """The untuned rule: the widest column tile that fits the members, K in steps of 32 or 64."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    return TileConfig(block_m, block_n(_sizes(bounds)) or 16, 32 if rank <= 32 else 64)


def candidate_configs(rows: int, rank: int, bounds: list[int]) -> list[TileConfig]:
    """What :func:`tune` times: the default, then single changes to it and a few combinations.

    A decode step's expand (a few rows) is bound by latency: wider or narrower column tiles change
    how many programs share the GPU, one K step over the whole rank removes a dependent load round."""
    sizes = _sizes(bounds)
    base = default_config(rows, rank, bounds)
    full_k = min(_pow2(rank), 128)
    widths = [b for b in (16, 32, 64, 128) if all(s % b == 0 for s in sizes)]
    out = [base]
    for bn in widths:
        out += [base._replace(block_n=bn), TileConfig(base.block_m, bn, full_k, 4, 1)]
    out += [
        base._replace(block_k=full_k, num_stages=1, num_warps=2),
        base._replace(block_k=full_k, num_stages=1, num_warps=8),
        base._replace(block_k=32),
        base._replace(num_stages=2),
        base._replace(early_base=False),  # the load order before 2026-11-27
        base._replace(block_k=full_k, num_stages=1, early_base=False),
    ]
    if rows <= 32:
        out += [base._replace(block_m=16), base._replace(block_m=16, block_k=full_k, num_stages=1)]
    else:
        out += [base._replace(block_m=128), base._replace(block_m=128, block_k=full_k, num_stages=1)]
    return list(dict.fromkeys(out))  # in order, without repeats


# (device, dtype, rows, rows per mixture row, bounds, rank) -> the fastest tiling measured
_TUNED: dict[tuple, TileConfig] = {}
# ... and what tuning measured for it: the default tiling's time and the winner's, ms
_TUNED_MS: dict[tuple, tuple[float | None, float | None]] = {}


def _key(t: torch.Tensor, rows: int, w_rows: int, bounds: list[int], rank: int) -> tuple:
    return (str(t.device), t.dtype, rows, rows // w_rows, tuple(bounds), rank)


def _launch(cfg: TileConfig, out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds: list[int],
            y: torch.Tensor) -> None:  # fmt: skip
    rows, n_out, rank = out.shape[0], bounds[-1], b.shape[1]
    edges = [*bounds[:-1], n_out, n_out][:2]  # b1, b2: where members 2 and 3 begin
    grid = (triton.cdiv(rows, cfg.block_m), n_out // cfg.block_n)
    _grouped_expand_kernel[grid](
        out, w, b, y,
        rows, n_out, rank, rows // w.shape[0], edges[0], edges[1],
        out.stride(0), w.stride(0), b.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=not out.is_cuda,
        FP32=out.dtype == torch.float32, EARLY_BASE=cfg.early_base, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


def _time_ms(fn) -> float:
    if torch.cuda.is_available() and not INTERPRET:
        # L2 flushed before each call, as in a decode step that streams the whole model's weights
        return triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median")
    times = []
    for _ in range(2):  # the CPU interpreter (tests): wall time
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def tuned_configs() -> list[dict]:
    """Every tiling :func:`tune` chose so far, one dict per shape, with the default tiling's time and
    the winner's in ms (for logs and benchmark JSON)."""
    return [
        {"device": k[0], "dtype": str(k[1]), "rows": k[2], "bounds": list(k[4]), "rank": k[5],
         "act": k[6] if len(k) > 6 else None, **c._asdict(),
         "default_ms": _TUNED_MS.get(k, (None, None))[0], "best_ms": _TUNED_MS.get(k, (None, None))[1]}  # fmt: skip
        for k, c in _TUNED.items()
    ]


def _runs_fused(t: torch.Tensor, rows: int, w_rows: int, bounds: list[int]) -> bool:
    """The kernel serves this call (else the torch reference does)."""
    return (
        triton_usable(t)
        and block_n(_sizes(bounds)) is not None
        and len(bounds) <= MAX_MEMBERS
        and rows % w_rows == 0
    )


def tune(rows: int, w_rows: int, b: torch.Tensor, bounds: list[int], act: str | None = None) -> TileConfig | None:
    """Time every candidate tiling for this shape on ``b``'s device; remember and return the
    fastest (None where the kernel does not run). A shape already timed is not timed again.

    ``rows`` rows of group output, ``w_rows`` mixture rows (``rows`` at decode: one token per
    sequence), ``b`` the group's stacked expands, ``bounds`` each member's end column. With
    ``act``, the gate/up kernel that also applies the activation (:func:`grouped_expand_act`),
    which does two dots per tile and is timed on its own."""
    rank = b.shape[1]
    if not _runs_fused(b, rows, w_rows, bounds) or (act is not None and bounds != [bounds[0], 2 * bounds[0]]):
        return None
    key = _key(b, rows, w_rows, bounds, rank) + ((act,) if act else ())
    if key in _TUNED:
        return _TUNED[key]
    out = torch.randn(rows, bounds[-1] + len(bounds) * rank, device=b.device, dtype=b.dtype)
    w = torch.rand(w_rows, rank, device=b.device, dtype=b.dtype)
    b = b.contiguous()
    y = out.new_empty(rows, bounds[0] if act else bounds[-1])

    def launch(cfg: TileConfig) -> None:
        if act:
            _launch_act(cfg, out, w, b, bounds[0], act, y)
        else:
            _launch(cfg, out, w, b, bounds, y)

    timings = {}
    device = torch.cuda.device(b.device) if b.is_cuda else contextlib.nullcontext()
    with device:  # launches and timing events on b's GPU, whichever is current
        for cfg in candidate_configs(rows, rank, bounds):
            try:
                launch(cfg)  # compiles it
            except triton.runtime.errors.OutOfResources:  # a tiling this device cannot run
                continue
            timings[cfg] = _time_ms(lambda cfg=cfg: launch(cfg))
    default = default_config(rows, rank, bounds)
    best = min(timings, key=timings.get) if timings else default
    _TUNED[key] = best
    _TUNED_MS[key] = (timings.get(default), timings.get(best))
    return best


def grouped_expand_eager(
    out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds: list[int]
) -> torch.Tensor:
    """``out``: [M, n_out + n*R] (base outputs, then shrinks); ``w``: [M / T, R] expanded weights,
    one row per T consecutive rows of ``out``; ``b``: [n_out, R] stacked expands; ``bounds``: each
    member's end column. Returns ``y``: [M, n_out].

    Called directly outside ``torch.compile``: the custom op's dispatch costs more than the kernel."""
    if not _runs_fused(out, out.shape[0], w.shape[0], bounds):
        return _reference(out, w, b, bounds)
    out, w, b = _unit_stride(out, w, b)
    y = out.new_empty(out.shape[0], bounds[-1])
    _launch(_tiling(out, w, b, bounds), out, w, b, bounds, y)
    return y


def _unit_stride(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels index rows by stride and columns by one."""
    return tuple(t if t.stride(1) == 1 else t.contiguous() for t in ts)


def _tiling(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds: list[int], act: str | None = None) -> TileConfig:
    """The tiling :func:`tune` chose for this call's shape (tuning on; with ``act`` that kernel's
    own, else the plain expand's), else the default rule."""
    rows, rank = out.shape[0], b.shape[1]
    if AUTOTUNE:
        key = _key(out, rows, w.shape[0], bounds, rank)
        cfg = (act and _TUNED.get((*key, act))) or _TUNED.get(key)
        if cfg:
            return cfg
    return default_config(rows, rank, bounds)


@torch.library.custom_op("personafuse::grouped_expand", mutates_args=())
def grouped_expand(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """:func:`grouped_expand_eager` as one opaque node for ``torch.compile`` and CUDA graphs."""
    return grouped_expand_eager(out, w, b, bounds)


@grouped_expand.register_fake
def _(out, w, b, bounds):
    return out.new_empty(out.shape[0], bounds[-1])


def _reference_act(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, inter: int, act: str) -> torch.Tensor:
    y = _reference(out, w, b, [inter, 2 * inter])
    return ACTIVATIONS[act](y[:, :inter]) * y[:, inter:]


def _launch_act(cfg: TileConfig, out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, inter: int, act: str,
                y: torch.Tensor) -> None:  # fmt: skip
    rows, rank = out.shape[0], b.shape[1]
    grid = (triton.cdiv(rows, cfg.block_m), inter // cfg.block_n)
    _expand_act_kernel[grid](
        out, w, b, y,
        rows, inter, rank, rows // w.shape[0],
        out.stride(0), w.stride(0), b.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=not out.is_cuda,
        FP32=out.dtype == torch.float32, EARLY_BASE=cfg.early_base, GELU=act == "gelu_tanh",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def grouped_expand_act_eager(
    out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, inter: int, act: str
) -> torch.Tensor:
    """An MLP's gate/up group finished in one kernel: ``act(gate) * up``, [M, inter].

    ``out``: [M, 2 * inter + 2R] (gate and up base outputs, then their shrinks); ``w``, ``b`` as in
    :func:`grouped_expand_eager` (``b``: [2 * inter, R], gate's rows first). Saves the MLP's
    separate activation kernel and the writing and reading back of both [M, inter] halves.
    The tiling is the one :func:`tune` chose for this kernel (``act`` given), else for the
    group's plain expand, else the default."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not fused; known: {', '.join(ACTIVATIONS)}")
    bounds = [inter, 2 * inter]
    if not _runs_fused(out, out.shape[0], w.shape[0], bounds):
        return _reference_act(out, w, b, inter, act)
    out, w, b = _unit_stride(out, w, b)
    y = out.new_empty(out.shape[0], inter)
    _launch_act(_tiling(out, w, b, bounds, act), out, w, b, inter, act, y)
    return y


@torch.library.custom_op("personafuse::grouped_expand_act", mutates_args=())
def grouped_expand_act(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, inter: int, act: str) -> torch.Tensor:
    """:func:`grouped_expand_act_eager` as one opaque node for ``torch.compile`` and CUDA graphs."""
    return grouped_expand_act_eager(out, w, b, inter, act)


@grouped_expand_act.register_fake
def _(out, w, b, inter, act):
    return out.new_empty(out.shape[0], inter)
