"""The Persona-MoE mixture layer: ten LoRA experts stacked into one rank-10r adapter.

For an adapted linear ``W`` and a batch whose row ``b`` carries weights ``w_b``::

    y = W x + sum_i w_bi * (alpha/r) * B_i A_i x
      = W x + ((x A_cat^T) * expand(w_b)) B_cat^T

with ``A_cat = [A_1; ...; A_10]`` (10r x k) and ``B_cat = [B_1 ... B_10]`` (d x 10r). That is the
exact sum of the experts' outputs, computed as one rank-80 LoRA: no Python loop over experts and
no per-request merge. ``expand`` repeats each weight r times and folds in alpha/r; it is computed
once per routing decision (:meth:`MixtureState.set`) and shared by every layer, so each adapted
layer costs two skinny matmuls and one multiply.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


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
        self.expanded: torch.Tensor | None = None  # [B, 1, E*r], times alpha/r
        self.dtype: torch.dtype | None = None  # the adapted layers' dtype, set by inject_mixture
        self.expert_index: torch.Tensor | None = None  # [B]: one expert per row (see set_experts)
        self._buffer: torch.Tensor | None = None

    def set(self, weights: torch.Tensor | None) -> None:
        if weights is not None and (weights.dim() != 2 or weights.shape[1] != self.num_experts):
            raise ValueError(
                f"mixture weights must have shape [batch, {self.num_experts}], got {tuple(weights.shape)}"
            )
        self.weights = weights
        self.expert_index = None
        if weights is None:
            self.expanded = None
            return
        w = weights.to(dtype=self.dtype or weights.dtype) * self.scaling
        w = w.repeat_interleave(self.r, dim=1).unsqueeze(1)
        if not torch.is_grad_enabled() and not w.requires_grad:
            # Inference: reuse one buffer (stable address for CUDA graphs) while the shape holds.
            buf = self._buffer
            if buf is not None and buf.shape == w.shape and buf.device == w.device and buf.dtype == w.dtype:
                buf.copy_(w)
                w = buf
            else:
                self._buffer = w
        self.expanded = w

    def set_experts(self, index: torch.Tensor) -> None:
        """One whole expert per row (a one-hot mixture), e.g. the stage-1 warm-up.

        Equal to ``set(one_hot(index))`` but each layer then runs only row b's rank-r expert
        (a gathered batched matmul) instead of all ten, a tenth of the adapter arithmetic.
        """
        if index.dim() != 1:
            raise ValueError(f"expert index must have shape [batch], got {tuple(index.shape)}")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.num_experts):
            raise ValueError(f"expert index out of range 0..{self.num_experts - 1}: {index.tolist()}")
        self.set(F.one_hot(index, self.num_experts).to(self.dtype or torch.float32))
        self.expert_index = index

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
    """A frozen ``nn.Linear`` plus ten stacked LoRA experts mixed by per-row weights."""

    def __init__(self, base: nn.Linear, state: MixtureState, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.state = state
        e, r = state.num_experts, state.r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(e * r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, e * r, **factory))
        self.dropout_p = float(dropout)
        self._shared: tuple[SharedShrink, int] | None = None  # set by inject_mixture
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
        base = self.base
        # F.linear instead of base(x): this runs 7x per layer per token, module-call overhead shows.
        y = F.linear(x, base.weight, base.bias)
        state = self.state
        if state.expert_index is not None:
            return y + self._one_expert_per_row(x, state.expert_index)
        w = state.expanded  # [B, 1, E*r]
        if w is None:
            return y
        if x.dim() == 2:  # [tokens, k] inputs: one row per batch element
            w = w.squeeze(1)
        if w.shape[0] != x.shape[0]:
            w = _match_batch(w, x.shape[0])
        if self.dropout_p and self.training:
            x = F.dropout(x, self.dropout_p)
        if torch.is_grad_enabled():
            return y + F.linear(F.linear(x, self.lora_A) * w, self.lora_B)
        # Inference: no autograd graph to protect, so fewer, in-place ops. Siblings that read the
        # same input (q/k/v, gate/up) share one shrink matmul and one multiply.
        h = None
        if self._shared is not None and not torch.compiler.is_compiling():
            group, pos = self._shared
            h = group.take(pos, x, w)
        if h is None:
            h = F.linear(x, self.lora_A).mul_(w)
        d = y.shape[-1]
        y.view(-1, d).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t())
        return y

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


class SharedShrink:
    """The shrink ``x A^T`` of sibling layers that read the same input, as one matmul.

    Attention calls q_proj, k_proj and v_proj on the same hidden-states tensor (the MLP: gate and
    up). At inference the first sibling called computes ``x [A_q; A_k; A_v]^T`` times the mixture
    weights in two ops and keeps it; the others find their slice by tensor identity. A sibling
    called on another tensor (cross-attention) computes its own. The concatenated A is rebuilt when
    any member's ``lora_A`` changes (version counter, storage).
    """

    def __init__(self, members: list[MixtureLinear]) -> None:
        self.members = members
        self._key: tuple | None = None
        self._a: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self._w: tuple | None = None
        self._h: torch.Tensor | None = None
        self._pending: set[int] = set()

    def _weight(self) -> torch.Tensor:
        key = tuple((m.lora_A._version, m.lora_A.data_ptr()) for m in self.members)
        if key != self._key or self._a is None:
            self._a = torch.cat([m.lora_A.detach() for m in self.members])
            self._key = key
        return self._a

    def take(self, pos: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        w_key = (w.data_ptr(), w.shape)  # w may be a fresh view of the same weights per sibling
        if not (pos in self._pending and self._x is x and self._w == w_key):
            n = len(self.members)
            h = F.linear(x, self._weight())
            h = h.view(*h.shape[:-1], n, -1).mul_(w.unsqueeze(-2))
            self._x, self._w, self._h = x, w_key, h
            self._pending = set(range(n)) - {pos}
            return h[..., pos, :]
        self._pending.discard(pos)
        h = self._h
        if not self._pending:  # every sibling served: drop the references
            self._x = self._w = self._h = None
        return h[..., pos, :]


SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _group_siblings(model: nn.Module) -> None:
    for parent in model.modules():
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, MixtureLinear)]
            if len(members) > 1 and len({m.in_features for m in members}) == 1:
                group = SharedShrink(members)
                for pos, m in enumerate(members):
                    m._shared = (group, pos)


def _match_batch(w: torch.Tensor, n: int) -> torch.Tensor:
    # generate() expands the batch for num_return_sequences / beams with repeat_interleave.
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
        if not isinstance(module, nn.Linear) or isinstance(module, MixtureLinear):
            continue
        linears.append(name)
        if name.split(".")[-1] not in targets:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MixtureLinear(module, state, dropout))
        state.dtype = module.weight.dtype
        matched.append(name)
    if not matched:
        sample = ", ".join(sorted({n.split(".")[-1] for n in linears})[:12])
        raise ValueError(f"target_modules {list(targets)} matched no linear layer; the model has: {sample}")
    missing = [t for t in targets if not any(m.split(".")[-1] == t for m in matched)]
    if missing:
        raise ValueError(f"target_modules {missing} matched no linear layer in {type(model).__name__}")
    _group_siblings(model)
    return matched


def mixture_layers(model: nn.Module) -> dict[str, MixtureLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MixtureLinear)}
