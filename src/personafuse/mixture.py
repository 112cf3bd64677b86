"""The Persona-MoE mixture layer: ten LoRA experts stacked into one rank-10r adapter.

For an adapted linear ``W`` and a batch whose row ``b`` carries weights ``w_b``::

    y = W x + sum_i w_bi * (alpha/r) * B_i A_i x
      = W x + ((x A_cat^T) * expand(w_b)) B_cat^T

with ``A_cat = [A_1; ...; A_10]`` (10r x k) and ``B_cat = [B_1 ... B_10]`` (d x 10r). That is the
exact sum of the experts' outputs, computed as one rank-80 LoRA: no Python loop over experts and
no per-request merge. ``expand`` repeats each weight r times and folds in alpha/r; it is computed
once per routing decision (:meth:`MixtureState.set`) and shared by every layer, so each adapted
layer costs two skinny matmuls and one multiply. At inference on accelerators, sibling layers
(q/k/v, gate/up) go further and share two kernels in all (:class:`PackedGroup`).
"""

from __future__ import annotations

import inspect
import itertools
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from personafuse import kernels


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
_LIVE: dict[int, _Live] = {}
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
        self.groups: list[PackedGroup] = []  # filled by inject_mixture; every layer is in one
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
        self.live = _LIVE[self.key] = _Live()
        self._synced = -1  # the key the layers hold (see _sync_layers)
        weakref.finalize(self, _LIVE.pop, self.key, None)

    def _sync_layers(self, force: bool = False) -> None:
        """Give every layer this state's key (after a copy or unpickling the layers hold the old one)."""
        if self._synced == self.key and not force:
            return
        for group in self.groups:
            for m in group.members:
                m._key = self.key
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
        return self.groups[0].members[0].base.weight.dtype if self.groups else None

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
        if pack and self.pack is not False and not weights.requires_grad:
            # Inference-style weights: (re)pack here, once per routing decision and outside any
            # compiled region, so the forward uses the packs without checking them.
            rows = weights.shape[0]
            for group in self.groups:
                if (
                    group.ensure(force=self.pack is True, fuse=self.fuse, fuse_act=self.fuse_act)
                    and group.fused
                    and kernels.AUTOTUNE
                ):
                    kernels.tune(rows, rows, group.expand, group._ends)  # the decode shape; once per shape
                    if group.members[0]._fuse_act:
                        kernels.tune(rows, rows, group.expand, group._ends, act=group.act)

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
        self._key = state.key  # this state's entry in _LIVE
        # Packed inference (PackedGroup): the group, whether it is packed now, and this layer's
        # place in it, as plain values on the layer so siblings never reach the group in a forward.
        self._group: PackedGroup | None = None  # set by inject_mixture
        self._packed = False
        self._slot = self._bit = self._all = self._lo = self._hi = 0
        self._fuse_act = 0  # on an MLP's gate: 0 off, 1 inside torch.compile, 2 always (_MLPForward)
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
        """``W x + ((x A_cat^T) * w) B_cat^T`` (the module docstring), by one of four paths that
        compute the same sum: one expert per row (set_experts), training (the formula as written,
        autograd-friendly), packed inference (PackedGroup) and plain inference (in place)."""
        # (not _LIVE.get(key, self.state.live): that would reach the state on every call, see _LIVE)
        live = _LIVE[self._key] if self._key in _LIVE else self.state.live  # noqa: SIM401
        if live.expert_index is not None:
            base = self.base
            return F.linear(x, base.weight, base.bias) + self._one_expert_per_row(x, live.expert_index)
        w = live.expanded  # [B, 1, E*r]
        if w is None:
            # F.linear instead of base(x): this runs 7x per layer per token, call overhead shows.
            return F.linear(x, self.base.weight, self.base.bias)
        w = _rows_of(w, x)
        if torch.is_grad_enabled() or (self.dropout_p and self.training):
            y = F.linear(x, self.base.weight, self.base.bias)
            if self.dropout_p and self.training:
                x = F.dropout(x, self.dropout_p)
            return y + F.linear(F.linear(x, self.lora_A) * w, self.lora_B)
        # Inference: no autograd graph to protect, so fewer, in-place ops (see PackedGroup).
        if self._packed:
            return self._packed_forward(x, w, live.shared)
        y = F.linear(x, self.base.weight, self.base.bias)
        h = F.linear(x, self.lora_A).mul_(w)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t())
        return y

    def _packed_forward(self, x: torch.Tensor, w: torch.Tensor, shared: dict[int, list] | None) -> torch.Tensor:
        """The first sibling to run computes the whole group and leaves it in ``shared`` (a dict
        that lives for one forward of the model) for the others; each returns its slice.

        Why a per-forward dict, not a cache on the group: state written inside a compiled region
        onto objects that outlive it is replayed by Dynamo after every call, one attribute path
        per group (1.4 ms per decode step at 32 layers, measured). Without the dict (a layer
        called outside a model forward) the layer computes its group itself."""
        if shared is None:
            return self._group.compute(x, w)[..., self._lo : self._hi]
        entry = shared.get(self._slot)
        if entry is None or entry[0] is not x or entry[2] & self._bit:
            entry = shared[self._slot] = [x, self._group.compute(x, w), 0]
        entry[2] |= self._bit
        if entry[2] == self._all:  # every sibling served: free the output as soon as possible
            shared.pop(self._slot, None)
        return entry[1][..., self._lo : self._hi]

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A copy's state gets a new key (MixtureState.__setstate__); until it hands it out
        # (_sync_layers) this layer reads its state's live values directly.
        self._key = -1

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() give every parameter new storage: the pack no longer aliases it.
        out = super()._apply(fn, recurse)
        if self._group is not None:
            self._group.invalidate()
        return out

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


class PackedGroup:
    """Inference layout: sibling layers' base weights and experts in two matrices, two kernels.

    q/k/v read the same hidden states, as do gate/up; o and down form groups of one. At inference
    the group stores ``P = [W_1; ...; W_n; A_1; ...; A_n]`` and ``B = [B_1; ...; B_n]``; the members'
    ``base.weight``, ``lora_A`` and ``lora_B`` become views of them (storage moved, nothing copied),
    so an optimiser's in-place update is seen at once. The first member called runs

        out = x P^T                                   every base output and shrink, one GEMM
        y_j = out_j + (out[:, shrink_j] * w) B_j^T    every expand, one fused kernel (kernels.py)

    and each member returns its slice. Per layer that is 4 x 2 = 8 kernels where the base model
    runs 7 GEMMs and the plain path 28 ops: under CUDA graphs a decode step pays per kernel. The
    fused expand runs inside ``torch.compile`` (the default, see ``MixtureState.fuse``); eager, and
    without Triton, it runs as one multiply and one ``addmm_`` per member. A CPU decode step pays
    per byte, not per kernel, so there packing is off by default.

    Packing happens in :meth:`MixtureState.set` (once per routing decision, outside compiled
    code), which first checks that the members still alias the pack. ``.to()``/``.half()`` drop the
    pack (``MixtureLinear._apply``); after ``param.data = ...`` by hand, call
    :meth:`MixtureState.invalidate_packs` or set the weights again.
    """

    def __init__(self, members: list[MixtureLinear]) -> None:
        self.members = members
        self.weight: torch.Tensor | None = None  # P
        self.bias: torch.Tensor | None = None
        self.expand: torch.Tensor | None = None  # B, the members' lora_B stacked by rows
        self._ends: list[int] = []  # each member's last column (exclusive) in x P^T
        self._expand_plan: list = []
        self.split = 0  # first column of the shrinks
        self._fusable = False  # Triton runs here and the members' shapes suit the kernel
        self._fuse: bool | None = None  # MixtureState.fuse at the last routing decision
        self.act: str | None = None  # an MLP's gate/up group: its activation, if the kernel has it
        self._mlp: nn.Module | None = None  # and that MLP
        self._ptrs: tuple[int, ...] = ()
        self._last_storage: tuple[int, ...] = ()  # the latest pack's storages (their views may be packed again)

    def _current_ptrs(self) -> tuple[int, ...]:
        ptrs = []
        for m in self.members:
            ptrs += [m.base.weight.data_ptr(), m.lora_A.data_ptr(), m.lora_B.data_ptr()]
            if m.base.bias is not None:
                ptrs.append(m.base.bias.data_ptr())
        return tuple(ptrs)

    def ready(self) -> bool:
        if self.weight is not None and self._current_ptrs() != self._ptrs:
            self.invalidate()
        return self.weight is not None

    def invalidate(self) -> None:
        self.weight = self.bias = self.expand = None
        self._expand_plan = []  # its views would keep the old storage alive
        self._ptrs = ()
        for m in self.members:
            m._packed = False
            m._fuse_act = 0

    @property
    def fused(self) -> bool:
        """The expand may run as the fused kernel (always, or inside torch.compile; see MixtureState.fuse)."""
        return self.weight is not None and self._fusable and self._fuse is not False

    def ensure(self, force: bool = False, fuse: bool | None = None, fuse_act: bool = False) -> bool:
        """Pack if needed and possible; False keeps the members on the plain path."""
        self._fuse = fuse
        packed = self.ready() or self._pack(force)
        gate = self.members[0]
        gate._fuse_act = 0
        if packed and fuse_act and self.act is not None and self.fused:
            gate._fuse_act = 2 if fuse else 1
        if self._mlp is not None:  # the MLP runs its own forward unless the activation is fused
            installed = isinstance(self._mlp.__dict__.get("forward"), _MLPForward)
            if gate._fuse_act and not installed:
                self._mlp.forward = _MLPForward(self._mlp)
            elif not gate._fuse_act and installed:
                del self._mlp.forward
        return packed

    def _packable(self, force: bool) -> bool:
        ref = self.members[0].base.weight
        if ref.device.type == "cpu" and not force:
            return False
        for m in self.members:
            if type(m.base) is not nn.Linear:  # (same in_features: _group_layers groups only those)
                return False  # quantised or otherwise special linears keep their own forward
            for t in (m.base.weight, m.lora_A, m.lora_B, m.base.bias):
                if t is None:
                    continue
                if t.device != ref.device or t.dtype != ref.dtype or t.device.type == "meta":
                    return False
                # Re-pointing storage that something else manages (FSDP's flat or sharded
                # parameters, DTensors) would break it: pack only tensors that own their storage.
                storage = t.untyped_storage()
                owned = storage.nbytes() == t.numel() * t.element_size()
                if type(t.data) is not torch.Tensor or not (owned or storage.data_ptr() in self._last_storage):
                    return False
        return True

    def _pack(self, force: bool = False) -> bool:
        if not self._packable(force):
            return False
        ms = self.members
        # Outside inference mode: packed storage must stay usable if training follows.
        with torch.inference_mode(False), torch.no_grad():
            # Parameters (frozen, owned by no module) rather than plain tensors: torch.compile
            # leaves parameters out of the aliasing check it runs on every call (3 tensors
            # instead of 259 at 32 layers; docs/performance.md).
            weight = _frozen(torch.cat([m.base.weight for m in ms] + [m.lora_A for m in ms]))
            bias = None
            if any(m.base.bias is not None for m in ms):
                ref = ms[0].base.weight
                parts = [m.base.bias if m.base.bias is not None else ref.new_zeros(m.out_features) for m in ms]
                bias = _frozen(torch.cat(parts + [ref.new_zeros(sum(m.lora_A.shape[0] for m in ms))]))
            bounds, row = [], 0
            for m in ms:
                bounds.append((row, row + m.out_features))
                m.base.weight.data = weight[row : row + m.out_features]
                if m.base.bias is not None:
                    m.base.bias.data = bias[row : row + m.out_features]
                row += m.out_features
            self.split = row
            expand = _frozen(torch.cat([m.lora_B for m in ms]))
            for m, (lo, hi) in zip(ms, bounds, strict=True):
                m.lora_A.data = weight[row : row + m.lora_A.shape[0]]
                m.lora_B.data = expand[lo:hi]
                row += m.lora_A.shape[0]
        for t in (weight, bias, expand):
            if t is not None:  # like a parameter: CUDA graphs must not copy it in at every replay
                torch._dynamo.mark_static_address(t)
        self.weight, self.bias, self.expand = weight, bias, expand
        for m, (lo, hi) in zip(ms, bounds, strict=True):
            m._lo, m._hi, m._packed = lo, hi, True
        self._ends = [hi for _, hi in bounds]
        rank = expand.shape[1]
        self._expand_plan = [  # (output columns, shrink columns, B_j^T view) per member
            ((lo, hi), (self.split + j * rank, self.split + (j + 1) * rank), expand[lo:hi].t())
            for j, (lo, hi) in enumerate(bounds)
        ]
        for _, _, bt in self._expand_plan:
            torch._dynamo.mark_static_address(bt)
        self._fusable = (
            kernels.triton_usable(weight)
            and len(ms) <= kernels.MAX_MEMBERS
            and kernels.block_n([m.out_features for m in ms]) is not None
        )
        self._ptrs = self._current_ptrs()
        self._last_storage = (weight.untyped_storage().data_ptr(), expand.untyped_storage().data_ptr())
        return True

    def compute(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Every member's output side by side: ``x P^T`` then the expand (see the class doc)."""
        compiling = torch.compiler.is_compiling()
        out = F.linear(x, self.weight, self.bias)
        flat = out.view(-1, out.shape[-1])
        if self._fusable and (self._fuse or (self._fuse is None and compiling)):
            expand = kernels.grouped_expand if compiling else kernels.grouped_expand_eager
            y = expand(flat, w.reshape(-1, w.shape[-1]), self.expand, self._ends)
            return y.view(*out.shape[:-1], self.split)
        # in place (no autograd graph at inference), each op counted: eager pays per op
        out[..., self.split :].unflatten(-1, (len(self.members), -1)).mul_(w.unsqueeze(-2))
        for (lo, hi), (a, b), bt in self._expand_plan:
            flat[:, lo:hi].addmm_(flat[:, a:b], bt)
        return out

    def compute_act(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """An MLP's ``act(gate(x)) * up(x)``: ``x P^T``, then expand, activation and product in one
        kernel (kernels.grouped_expand_act). Only for a gate/up group with ``act`` set."""
        out = F.linear(x, self.weight, self.bias)
        inter = self.split // 2
        op = kernels.grouped_expand_act if torch.compiler.is_compiling() else kernels.grouped_expand_act_eager
        y = op(out.view(-1, out.shape[-1]), w.reshape(-1, w.shape[-1]), self.expand, inter, self.act)
        return y.view(*out.shape[:-1], inter)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# The MLP forward of Llama, Qwen2/3, Mistral and Gemma (transformers), which _MLPForward replaces
# when the gate/up group fuses the activation; any other forward keeps its own code.
_MLP_LINE = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


def _fusable_act(parent: nn.Module, members: list[MixtureLinear]) -> str | None:
    """The activation name (kernels.ACTIVATIONS) if ``parent`` is an MLP whose gate/up group the
    fused kernel can finish, else None."""
    if [id(m) for m in members] != [id(getattr(parent, "gate_proj", None)), id(getattr(parent, "up_proj", None))]:
        return None
    if members[0].out_features != members[1].out_features or not hasattr(parent, "down_proj"):
        return None
    act_fn = getattr(parent, "act_fn", None)
    try:
        source = "".join(inspect.getsource(type(parent).forward).split())
    except (OSError, TypeError):
        return None
    if _MLP_LINE not in source or not callable(act_fn):
        return None
    probe = torch.linspace(-8, 8, 161, dtype=torch.float64)
    with torch.no_grad():
        try:
            got = act_fn(probe)
        except (RuntimeError, TypeError):  # refuses float64 or a 1-D input: not one the kernel knows
            return None
        for name, fn in kernels.ACTIVATIONS.items():
            if torch.allclose(got, fn(probe), atol=1e-6, rtol=1e-6):
                return name
    return None


class _MLPForward:
    """The ``forward`` of an MLP whose gate/up group may fuse its activation (an instance
    attribute: the class, its other instances and the state-dict names stay as they are; a
    callable object rather than a bound method so the model still pickles)."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        gate = mlp.gate_proj
        mode = gate._fuse_act
        if mode and (mode == 2 or torch.compiler.is_compiling()) and not torch.is_grad_enabled():
            live = _LIVE[gate._key] if gate._key in _LIVE else gate.state.live  # noqa: SIM401
            w = live.expanded
            if w is not None and live.expert_index is None and not (gate.dropout_p and gate.training):
                return mlp.down_proj(gate._group.compute_act(x, _rows_of(w, x)))
        return type(mlp).forward(mlp, x)


def _group_layers(model: nn.Module, state: MixtureState) -> None:
    for group in state.groups:
        group.invalidate()
    state.groups = []
    grouped: set[int] = set()
    for parent in model.modules():
        if isinstance(parent.__dict__.get("forward"), _MLPForward):
            del parent.forward  # regrouping: the next routing decision installs it again
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, MixtureLinear)]
            if len(members) > 1 and len({m.in_features for m in members}) == 1:
                group = PackedGroup(members)
                group.act = _fusable_act(parent, members)
                group._mlp = parent if group.act is not None else None
                state.groups.append(group)
                grouped.update(id(m) for m in members)
    for m in model.modules():
        if isinstance(m, MixtureLinear) and id(m) not in grouped:
            state.groups.append(PackedGroup([m]))
    for slot, group in enumerate(state.groups):
        for pos, m in enumerate(group.members):
            m._group, m._slot, m._bit, m._all = group, slot, 1 << pos, (1 << len(group.members)) - 1
    state._sync_layers(force=True)  # the groups' layers may be new


def _rows_of(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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
    _group_layers(model, state)
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
