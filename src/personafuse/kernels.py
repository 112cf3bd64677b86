"""``grouped_expand``: every expert expand of a packed sibling group in one GPU kernel.

A :class:`~personafuse.mixture.PackedGroup` computes ``out = x P^T``, whose first ``split`` columns
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
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below serves every call
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_MEMBERS = 3  # q/k/v is the largest sibling group


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
    def _grouped_expand_kernel(
        out_ptr, w_ptr, b_ptr, y_ptr,
        M, N, R, rows_per_w, b1, b2,
        stride_out, stride_w, stride_b, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
        FP32: tl.constexpr,
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
            hw = h.to(tl.float32) * w.to(tl.float32)
            if UPCAST:  # the CPU interpreter has no bf16 dot
                acc += tl.dot(hw.to(h.dtype).to(tl.float32), bt.to(tl.float32))
            elif FP32:  # full precision, as torch's fp32 matmul (Triton would use TF32)
                acc += tl.dot(hw, bt, input_precision="ieee")
            else:  # round like the eager multiply, then a tensor-core dot
                acc += tl.dot(hw.to(bt.dtype), bt)
        mn = mask_m[:, None] & mask_n[None, :]
        base = tl.load(out_ptr + rm[:, None] * stride_out + rn[None, :], mask=mn, other=0.0)
        y = base.to(tl.float32) + acc
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mn)


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


def grouped_expand_eager(
    out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds: list[int]
) -> torch.Tensor:
    """``out``: [M, n_out + n*R] (base outputs, then shrinks); ``w``: [M / T, R] expanded weights,
    one row per T consecutive rows of ``out``; ``b``: [n_out, R] stacked expands; ``bounds``: each
    member's end column. Returns ``y``: [M, n_out].

    Called directly outside ``torch.compile``: the custom op's dispatch costs more than the kernel."""
    n_out = bounds[-1]
    rows, rank = out.shape[0], b.shape[1]
    tile = block_n([hi - lo for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True)])
    if not triton_usable(out) or tile is None or len(bounds) > MAX_MEMBERS or rows % w.shape[0]:
        return _reference(out, w, b, bounds)
    if out.stride(1) != 1 or w.stride(1) != 1 or b.stride(1) != 1:
        out, w, b = out.contiguous(), w.contiguous(), b.contiguous()
    y = out.new_empty(rows, n_out)
    edges = [*bounds[:-1], n_out, n_out][:2]  # b1, b2: where members 2 and 3 begin
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    grid = (triton.cdiv(rows, block_m), n_out // tile)
    _grouped_expand_kernel[grid](
        out, w, b, y,
        rows, n_out, rank, rows // w.shape[0], edges[0], edges[1],
        out.stride(0), w.stride(0), b.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=tile, BLOCK_K=32 if rank <= 32 else 64, UPCAST=not out.is_cuda,
        FP32=out.dtype == torch.float32,
    )  # fmt: skip
    return y


@torch.library.custom_op("personafuse::grouped_expand", mutates_args=())
def grouped_expand(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """:func:`grouped_expand_eager` as one opaque node for ``torch.compile`` and CUDA graphs."""
    return grouped_expand_eager(out, w, b, bounds)


@grouped_expand.register_fake
def _(out, w, b, bounds):
    return out.new_empty(out.shape[0], bounds[-1])
