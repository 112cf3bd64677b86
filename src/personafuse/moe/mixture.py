"""The Persona-MoE mixture layer: ten LoRA experts stacked into one rank-10r adapter.

For an adapted linear ``W`` and a batch whose row ``b`` carries weights ``w_b``::

    y = W x + sum_i w_bi * (alpha/r) * B_i A_i x
      = W x + ((x A_cat^T) * expand(w_b)) B_cat^T

with ``A_cat = [A_1; ...; A_10]`` (10r x k) and ``B_cat = [B_1 ... B_10]`` (d x 10r). That is the
exact sum of the experts' outputs, computed as one rank-80 LoRA: no Python loop over experts and
no per-request merge. ``expand`` repeats each weight r times and folds in alpha/r; it is computed
once per routing decision (:meth:`MixtureState.set`) and shared by every layer, so each adapted
layer costs two skinny matmuls and one multiply. At inference on accelerators, sibling layers
(q/k/v, gate/up) go further and share two kernels in all: :mod:`personafuse.moe.packing` swaps its
own layer type in for theirs while packed.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable


class _Live:
    """What every mixture layer of one model reads in its forward: the expanded weights, the
    one-expert-per-row index and the siblings' shared outputs (one forward's dict)."""

    def __init__(self) -> None:
        self.expanded: torch.Tensor | None = None
        self.expert_index: torch.Tensor | None = None
        self.shared: dict[int, list] | None = None


# Layers find their state's live values here, by an integer key, not through ``layer.state``.
# Why: under torch.compile one object reached from many modules (224 layers share one state) gets
# an aliasing guard per extra path, evaluated in Python on every call; with a cold CPU cache those
# guards cost 1.1 ms per decode step at 32 layers (measured). A global looked up by a constant key
# is one path, whatever the number of layers.
LIVE: dict[int, _Live] = {}
_KEYS = itertools.count()


class MixtureState:
    """Routing weights shared by all mixture layers of one model.

    Weights are set per sequence before a forward pass (or a whole ``generate`` call) and held
    for prefill and every decoding step, so the KV cache stays valid. The expanded form is built
    once here, not per layer. At inference the expanded weights live in one persistent buffer
    while the batch shape holds, so a CUDA-graph-captured decode step sees each new mixture.
    """

    def __init__(self, num_experts: int, r: int, scaling: float) -> None:
        self.num_experts = num_experts
        self.r = r
        self.scaling = scaling
        self.weights: torch.Tensor | None = None  # [B, E], as given
        self._buffer: torch.Tensor | None = None
        self.layers: list[MixtureLinear] = []  # filled by inject_mixture
        # The packed inference layout, when the caller applies it after injection
        # (personafuse.moe.packing.group_layers): its groups, and what set() calls with inference-style
        # weights (the packing, once per routing decision). The state itself knows neither.
        self.groups: list[Any] = []
        self.on_inference_weights: list[Callable[[MixtureState, torch.Tensor], None]] = []
        self._hooks: list = []
        self._register()
        # The packed inference layout (PackedGroup, two kernels per sibling group). None = on
        # accelerators only: a CPU decode step costs per weight byte read, not per kernel, and
        # measured slower packed (docs/performance.md).
        self.pack: bool | None = None
        # Within a pack, the expand as one Triton kernel where Triton runs (kernels.py). None =
        # inside torch.compile only: eager, the custom op's launch costs more than the kernels it
        # saves (measured on an H100, docs/performance.md). True = eager too; False = torch ops.
        self.fuse: bool | None = None
        # Where the fused expand runs, an MLP's gate/up group also applies the MLP's activation and
        # product in the same kernel (kernels.grouped_expand_act): one kernel less per layer, and
        # the two [tokens, intermediate] halves never written. Off until measured on a GPU.
        self.fuse_act = False

    def _register(self) -> None:
        self.key = next(_KEYS)
        self.live = LIVE[self.key] = _Live()
        self._synced = -1  # the key the layers hold (see _sync_layers)
        weakref.finalize(self, LIVE.pop, self.key, None)

    def _sync_layers(self, force: bool = False) -> None:
        """Give every layer this state's key (after a copy or unpickling the layers hold the old one)."""
        if self._synced == self.key and not force:
            return
        for m in self.layers:
            m.live_key = self.key
        self._synced = self.key

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        live = d.pop("live")
        d.pop("key")
        d["_live_values"] = (live.expanded, live.expert_index)
        return d

    def __setstate__(self, d: dict) -> None:
        expanded, index = d.pop("_live_values")
        self.__dict__.update(d)
        self._register()  # a copy is a new state: its own key and live values
        self.live.expanded, self.live.expert_index = expanded, index

    # [B, 1, E*r] weights times alpha/r; [B] one expert per row (see set_experts); one forward's
    # shared group outputs (created by a pre-hook on the injected model, dropped after it).
    expanded = property(lambda self: self.live.expanded)
    expert_index = property(lambda self: self.live.expert_index)
    shared = property(lambda self: self.live.shared)

    @property
    def dtype(self) -> torch.dtype | None:
        """The adapted layers' dtype, read from them (it follows ``.to()`` / ``.half()`` casts)."""
        return self.layers[0].base.weight.dtype if self.layers else None

    def set(self, weights: torch.Tensor | None, *, pack: bool = True) -> None:
        """Hold ``weights`` [B, E] (or None: base model only) for the forwards that follow.

        A forward whose batch has ``k * B`` rows gives each weight row to ``k`` consecutive rows,
        as transformers' ``generate`` expands a batch for beams and ``num_return_sequences``
        (``repeat_interleave``); a batch built otherwise (``torch.cat([x, x])``) needs its
        weights expanded the same way by the caller. Builds the expanded form shared by every
        layer and, for inference-style weights, packs the sibling groups (outside compiled code)."""
        self._sync_layers()
        if weights is not None and (weights.dim() != 2 or weights.shape[1] != self.num_experts):
            raise ValueError(
                f"mixture weights must have shape [batch, {self.num_experts}], got {tuple(weights.shape)}"
            )
        self.weights = weights
        live = self.live
        live.expert_index = None
        if weights is None:
            live.expanded = None
            return
        w = weights.to(dtype=self.dtype or weights.dtype) * self.scaling
        w = w.repeat_interleave(self.r, dim=1).unsqueeze(1)
        if not torch.is_grad_enabled() and not w.requires_grad:
            # Inference: reuse one buffer (stable address for CUDA graphs) while the shape holds.
            buf = self._buffer
            # (one made under inference_mode cannot be written outside it: then a new buffer)
            writable = buf is not None and (not buf.is_inference() or torch.is_inference_mode_enabled())
            if writable and buf.shape == w.shape and buf.device == w.device and buf.dtype == w.dtype:
                buf.copy_(w)
                w = buf
            else:
                self._buffer = w
        live.expanded = w
        if pack and not weights.requires_grad:
            # Inference-style weights: the packed layout (if applied) packs here, once per routing
            # decision and outside any compiled region, so the forward uses the packs unchecked.
            for fn in self.on_inference_weights:
                fn(self, weights)

    def replace_layers(self, swaps: dict[int, MixtureLinear]) -> None:
        """Put each ``swaps[id(old)]`` in place of ``old`` in :attr:`layers` (the caller has swapped
        it into the model: packing swaps its layer type in and out)."""
        self.layers = [swaps.get(id(m), m) for m in self.layers]

    def invalidate_packs(self) -> None:
        """Call after giving parameters new storage by hand (``param.data = ...``)."""
        for group in self.groups:
            group.invalidate()

    def set_experts(self, index: torch.Tensor) -> None:
        """One whole expert per row (a one-hot mixture), e.g. the stage-1 warm-up.

        Equal to ``set(one_hot(index))`` but each layer then runs only row b's rank-r expert
        (a gathered batched matmul) instead of all ten, a tenth of the adapter arithmetic.
        """
        if index.dim() != 1:
            raise ValueError(f"expert index must have shape [batch], got {tuple(index.shape)}")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.num_experts):
            raise ValueError(f"expert index out of range 0..{self.num_experts - 1}: {index.tolist()}")
        self.set(F.one_hot(index, self.num_experts).to(self.dtype or torch.float32), pack=False)
        self.live.expert_index = index

    @contextmanager
    def use(self, weights: torch.Tensor | None) -> Iterator[None]:
        previous, previous_index = self.weights, self.expert_index
        self.set(weights)
        try:
            yield
        finally:
            if previous_index is not None:
                self.set_experts(previous_index)
            elif previous is not self.weights:
                self.set(previous)


class MixtureLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ten stacked LoRA experts mixed by per-row weights.

    ``experts``: an existing layer's ``(lora_A, lora_B)`` to share rather than new ones (a layer
    of another type over the same tensors, as packing swaps in: nothing copied or initialised).
    """

    def __init__(
        self,
        base: nn.Linear,
        state: MixtureState,
        dropout: float = 0.0,
        experts: tuple[nn.Parameter, nn.Parameter] | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.dropout_p = float(dropout)
        self.live_key = state.key  # this state's entry in LIVE
        if experts is not None:
            self.lora_A, self.lora_B = experts
            return
        e, r = state.num_experts, state.r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(e * r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, e * r, **factory))
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code inspects .weight (dtype, device)
        return self.base.weight

    def reset_parameters(self) -> None:
        # Same init as a peft LoRA for every expert: A Kaiming-uniform, B zero (a new expert is a no-op).
        r = self.state.r
        for i in range(self.state.num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[i * r : (i + 1) * r], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def expert(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_i, B_i) views of expert ``i``."""
        r = self.state.r
        return self.lora_A[i * r : (i + 1) * r], self.lora_B[:, i * r : (i + 1) * r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + ((x A_cat^T) * w) B_cat^T`` (the module docstring), by one of three paths that
        compute the same sum: one expert per row (set_experts), training (the formula as written,
        autograd-friendly) and inference (in place). Packed inference is a fourth, in the layer type
        packing swaps in (:class:`personafuse.moe.packing.PackedMixtureLinear`)."""
        # (not LIVE.get(key, self.state.live): that would reach the state on every call, see LIVE)
        live = LIVE[self.live_key] if self.live_key in LIVE else self.state.live  # noqa: SIM401
        if live.expert_index is not None:
            base = self.base
            return F.linear(x, base.weight, base.bias) + self._one_expert_per_row(x, live.expert_index)
        w = live.expanded  # [B, 1, E*r]
        if w is None:
            # F.linear instead of base(x): this runs 7x per layer per token, call overhead shows.
            return F.linear(x, self.base.weight, self.base.bias)
        w = rows_of(w, x)
        if torch.is_grad_enabled() or (self.dropout_p and self.training):
            y = F.linear(x, self.base.weight, self.base.bias)
            if self.dropout_p and self.training:
                x = F.dropout(x, self.dropout_p)
            return y + F.linear(F.linear(x, self.lora_A) * w, self.lora_B)
        # Inference: no autograd graph to protect, so fewer, in-place ops.
        y = F.linear(x, self.base.weight, self.base.bias)
        h = F.linear(x, self.lora_A).mul_(w)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t())
        return y

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A copy's state gets a new key (MixtureState.__setstate__); until it hands it out
        # (_sync_layers) this layer reads its state's live values directly.
        self.live_key = -1

    def _one_expert_per_row(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # Gather row b's (A_i, B_i) and run two batched matmuls: the same sum as the stacked path
        # with a one-hot weight, without the nine zero-weighted experts' arithmetic.
        e, r = self.state.num_experts, self.state.r
        if index.shape[0] != x.shape[0]:
            index = _match_batch(index.unsqueeze(1), x.shape[0]).squeeze(1)
        squeeze = x.dim() == 2
        x3 = x.unsqueeze(1) if squeeze else x
        if self.dropout_p and self.training:
            x3 = F.dropout(x3, self.dropout_p)
        a = self.lora_A.view(e, r, -1)[index]  # [B, r, k]
        b = self.lora_B.view(-1, e, r).transpose(0, 1)[index]  # [B, d, r]
        h = torch.bmm(x3, a.transpose(1, 2)) * self.state.scaling
        out = torch.bmm(h, b.transpose(1, 2))
        return out.squeeze(1) if squeeze else out

    def extra_repr(self) -> str:
        return f"experts={self.state.num_experts}, r={self.state.r}, scaling={self.state.scaling:g}"


def rows_of(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The expanded weights [B, 1, E*r] shaped for input ``x``: [tokens, E*r] for [tokens, k]
    inputs (one row per batch element), and repeated where generate expanded the batch."""
    if x.dim() == 2:
        w = w.squeeze(1)
    return w if w.shape[0] == x.shape[0] else _match_batch(w, x.shape[0])


def _match_batch(w: torch.Tensor, n: int) -> torch.Tensor:
    # generate() expands the batch for num_return_sequences / beams with repeat_interleave, so
    # weight row b serves rows b*k .. b*k+k-1 (see MixtureState.set).
    if n % w.shape[0]:
        raise ValueError(f"mixture weights are set for {w.shape[0]} sequences but the batch has {n} rows")
    return w.repeat_interleave(n // w.shape[0], dim=0)


def inject_mixture(
    model: nn.Module, target_modules: list[str], state: MixtureState, dropout: float = 0.0
) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with a target by a :class:`MixtureLinear`.

    Returns the qualified names of the adapted modules. Raises if no module matched, naming the
    targets and a few of the model's linear layers so a wrong target list is easy to fix.
    """
    targets = tuple(target_modules)
    matched: list[str] = []
    linears: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        linears.append(name)
        if name.split(".")[-1] not in targets:
            continue
        if type(module) is not nn.Linear:
            # the mixture computes the base output from .weight itself, so a subclass's own
            # forward (quantised layers dequantise in theirs) would be skipped: refuse, not guess
            raise TypeError(
                f"{name} is a {type(module).__module__}.{type(module).__name__}, not a plain nn.Linear: "
                "quantised or custom linears are not supported as mixture targets (load the base in "
                "float32/bfloat16, or leave this module out of target_modules)"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MixtureLinear(module, state, dropout))
        matched.append(name)
    if not matched:
        sample = ", ".join(sorted({n.split(".")[-1] for n in linears})[:12])
        raise ValueError(f"target_modules {list(targets)} matched no linear layer; the model has: {sample}")
    missing = [t for t in targets if not any(m.split(".")[-1] == t for m in matched)]
    if missing:
        raise ValueError(f"target_modules {missing} matched no linear layer in {type(model).__name__}")
    state.layers = [m for m in model.modules() if isinstance(m, MixtureLinear)]
    state._sync_layers(force=True)
    # The packed groups' per-forward dict lives exactly one forward of this model (always_call: a
    # failed forward must not leave a stale dict behind). The hooks find the state through the
    # model, so a deep copy's hooks serve the copy's state.
    for handle in state._hooks:
        handle.remove()
    model._mixture_state = state
    state._hooks = [
        model.register_forward_pre_hook(_open_shared),
        model.register_forward_hook(_close_shared, always_call=True),
    ]
    return matched


def _open_shared(model: nn.Module, args) -> None:
    state = model._mixture_state
    state._sync_layers()  # a copy hands its layers the new key first
    state.live.shared = {}


def _close_shared(model: nn.Module, args, output) -> None:
    model._mixture_state.live.shared = None


def mixture_layers(model: nn.Module) -> dict[str, MixtureLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MixtureLinear)}
