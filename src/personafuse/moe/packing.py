"""The packed inference layout: sibling mixture layers as one GEMM and one fused expand.

q/k/v read the same hidden states, as do an MLP's gate/up. At inference on accelerators a decode
step pays per kernel, not per byte, so :class:`PackedGroup` stores each sibling group's base
weights and shrinks as one matrix and its expands as another, and runs the group in two kernels
(the expand in Triton, :mod:`personafuse.moe.kernels`). :func:`group_layers` forms the groups when the
mixture is injected; :meth:`personafuse.moe.mixture.MixtureState.set` packs them once per routing
decision. The sum computed is the mixture's own (:mod:`personafuse.moe.mixture`), to float rounding.

A packed group's members are layers of this module's own type, :class:`PackedMixtureLinear`, swapped
into the model in place of the plain ``MixtureLinear`` when the group packs and swapped back when
it unpacks, as vLLM swaps its LoRA layer types in for the model's linears (``from_layer`` and
``replace_submodule`` in vllm-project/vllm@001e63a89b474b88345fd72912fe068c4ae83f41,
vllm/lora/utils.py). The swapped-in layer shares the plain one's parameters (the same tensors, so
state-dict names, optimisers and checkpoints see no difference) and carries its place in the pack;
the plain layer carries nothing about packing.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from personafuse.moe import kernels
from personafuse.moe.mixture import LIVE, MixtureLinear, MixtureState, rows_of


class PackedMixtureLinear(MixtureLinear):
    """A mixture layer whose sibling group is packed: :class:`PackedGroup` swaps one in for each
    member when it packs (the same base layer, experts and state as the plain layer it replaces)
    and a plain :class:`MixtureLinear` back when it unpacks. Only its inference path differs: the
    first sibling called computes the whole group, each returns its slice.

    Its place in the pack is held as plain values on the layer, so siblings never reach the group
    in a forward: ``slot`` (the group's index in ``state.groups``), ``bit``/``all_bits`` (which
    siblings have read the shared output), ``lo:hi`` (its output columns) and, on an MLP's gate,
    ``fuse_act`` (0 off, 1 inside torch.compile, 2 always; read by :class:`_MLPForward`).
    """

    def __init__(self, layer: MixtureLinear, group: PackedGroup, pos: int, lo: int, hi: int) -> None:
        super().__init__(layer.base, layer.state, layer.dropout_p, experts=(layer.lora_A, layer.lora_B))
        self.training = layer.training
        self.group = group
        self.slot = group.slot
        self.bit, self.all_bits = 1 << pos, (1 << len(group.members)) - 1
        self.lo, self.hi = lo, hi
        self.fuse_act = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = LIVE[self.live_key] if self.live_key in LIVE else self.state.live  # noqa: SIM401
        w = live.expanded
        if w is None or live.expert_index is not None or torch.is_grad_enabled() or (self.dropout_p and self.training):
            return super().forward(x)  # the paths that never use the pack
        return self._packed_forward(x, rows_of(w, x), live.shared)

    def _packed_forward(self, x: torch.Tensor, w: torch.Tensor, shared: dict[int, list] | None) -> torch.Tensor:
        """The first sibling to run computes the whole group and leaves it in ``shared`` (a dict
        that lives for one forward of the model) for the others; each returns its slice.

        Why a per-forward dict, not a cache on the group: state written inside a compiled region
        onto objects that outlive it is replayed by Dynamo after every call, one attribute path
        per group (1.4 ms per decode step at 32 layers, measured). Without the dict (a layer
        called outside a model forward) the layer computes its group itself."""
        if shared is None:
            return self.group.compute(x, w)[..., self.lo : self.hi]
        entry = shared.get(self.slot)
        if entry is None or entry[0] is not x or entry[2] & self.bit:
            entry = shared[self.slot] = [x, self.group.compute(x, w), 0]
        entry[2] |= self.bit
        if entry[2] == self.all_bits:  # every sibling served: free the output as soon as possible
            shared.pop(self.slot, None)
        return entry[1][..., self.lo : self.hi]

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() give every parameter new storage: the pack no longer aliases
        # it, so the group unpacks (and swaps its plain layers back in).
        out = super()._apply(fn, recurse)
        self.group.invalidate()
        return out


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
    code), which first checks that the members still alias the pack; it swaps a
    :class:`PackedMixtureLinear` in for each member, and unpacking swaps plain layers back.
    ``.to()``/``.half()`` drop the pack (``PackedMixtureLinear._apply``); after ``param.data = ...``
    by hand, call :meth:`MixtureState.invalidate_packs` or set the weights again.
    """

    def __init__(self, members: list[MixtureLinear], places: list[tuple[nn.Module, str]], slot: int) -> None:
        self.members = members  # the layers in the model now: PackedMixtureLinear while packed
        self.places = places  # each member's (parent module, attribute name), for the swaps
        self.slot = slot  # this group's index in state.groups
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
        self._origins: list[MixtureLinear | None] = []  # the plain layers the packed ones replaced

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
        if any(isinstance(m, PackedMixtureLinear) for m in self.members):
            origins = self._origins or [None] * len(self.members)
            self._swap([_plain(m, o) for m, o in zip(self.members, origins, strict=True)])
            self._origins = []
        if self._mlp is not None and isinstance(self._mlp.__dict__.get("forward"), _MLPForward):
            del self._mlp.forward  # nothing packed to fuse: the MLP runs its own forward

    def _swap(self, layers: list[MixtureLinear]) -> None:
        """Put ``layers`` into the model in the members' places (and the state's layer list)."""
        for (parent, name), layer in zip(self.places, layers, strict=True):
            setattr(parent, name, layer)
        self.members[0].state.replace_layers({id(old): new for old, new in zip(self.members, layers, strict=True)})
        self.members = layers

    @property
    def fused(self) -> bool:
        """The expand may run as the fused kernel (always, or inside torch.compile; see MixtureState.fuse)."""
        return self.weight is not None and self._fusable and self._fuse is not False

    def ensure(self, force: bool = False, fuse: bool | None = None, fuse_act: bool = False) -> bool:
        """Pack if needed and possible; False keeps the members on the plain path."""
        self._fuse = fuse
        packed = self.ready() or self._pack(force)
        mode = 0
        if packed and fuse_act and self.act is not None and self.fused:
            mode = 2 if fuse else 1
        if packed:
            self.members[0].fuse_act = mode
        if self._mlp is not None:  # the MLP runs its own forward unless the activation is fused
            installed = isinstance(self._mlp.__dict__.get("forward"), _MLPForward)
            if mode and not installed:
                self._mlp.forward = _MLPForward(self._mlp)
            elif not mode and installed:
                del self._mlp.forward
        return packed

    def _packable(self, force: bool) -> bool:
        ref = self.members[0].base.weight
        if ref.device.type == "cpu" and not force:
            return False
        for m in self.members:
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
        # the plain layers themselves come back on unpacking, so references and hooks a user holds
        # on them (or a training loop's patched forward) stay live across a pack and unpack
        old = self._origins + [None] * (len(ms) - len(self._origins))
        self._origins = [o if isinstance(m, PackedMixtureLinear) else m for m, o in zip(ms, old, strict=True)]
        self._swap([PackedMixtureLinear(m, self, pos, lo, hi) for pos, (m, (lo, hi)) in enumerate(zip(ms, bounds, strict=True))])
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


def _plain(layer: MixtureLinear, origin: MixtureLinear | None = None) -> MixtureLinear:
    """A plain MixtureLinear over ``layer``'s base, experts and state (what unpacking swaps back):
    ``origin``, the plain layer it replaced, while it still holds the same parts."""
    if origin is not None and all(
        getattr(origin, k) is getattr(layer, k) for k in ("base", "state", "lora_A", "lora_B")
    ):
        origin.training = layer.training
        return origin
    plain = MixtureLinear(layer.base, layer.state, layer.dropout_p, experts=(layer.lora_A, layer.lora_B))
    plain.training = layer.training
    return plain


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
        mode = getattr(gate, "fuse_act", 0)  # a PackedMixtureLinear's; a plain layer has none
        if mode and (mode == 2 or torch.compiler.is_compiling()) and not torch.is_grad_enabled():
            live = LIVE[gate.live_key] if gate.live_key in LIVE else gate.state.live  # noqa: SIM401
            w = live.expanded
            if w is not None and live.expert_index is None and not (gate.dropout_p and gate.training):
                return mlp.down_proj(gate.group.compute_act(x, rows_of(w, x)))
        return type(mlp).forward(mlp, x)


def pack_groups(state: MixtureState, weights: torch.Tensor) -> None:
    """(Re)pack the state's groups for inference-style weights (called by ``MixtureState.set``)."""
    if state.pack is False:
        return
    rows = weights.shape[0]
    for group in state.groups:
        if group.ensure(force=state.pack is True, fuse=state.fuse, fuse_act=state.fuse_act) and group.fused and kernels.AUTOTUNE:
            kernels.tune(rows, rows, group.expand, group._ends)  # the decode shape; once per shape
            if group.members[0].fuse_act:
                kernels.tune(rows, rows, group.expand, group._ends, act=group.act)


def group_layers(model: nn.Module, state: MixtureState) -> None:
    """Apply the packed layout to a model after :func:`~personafuse.moe.mixture.inject_mixture`: form
    the sibling groups (every mixture layer is in one) on ``state`` and have ``state.set`` pack
    them for inference-style weights. Without this call the mixture runs unpacked."""
    for group in state.groups:
        group.invalidate()  # packed layers back to plain ones first
    state.groups = []
    grouped: set[int] = set()
    for parent in model.modules():
        if isinstance(parent.__dict__.get("forward"), _MLPForward):
            del parent.forward  # regrouping: the next routing decision installs it again
        for names in SHARED_INPUT_GROUPS:
            places = [(parent, n) for n in names if isinstance(getattr(parent, n, None), MixtureLinear)]
            members = [getattr(parent, n) for _, n in places]
            if len(members) > 1 and len({m.in_features for m in members}) == 1:
                group = PackedGroup(members, places, slot=len(state.groups))
                group.act = _fusable_act(parent, members)
                group._mlp = parent if group.act is not None else None
                state.groups.append(group)
                grouped.update(id(m) for m in members)
    for name, m in model.named_modules():
        if isinstance(m, MixtureLinear) and id(m) not in grouped:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            state.groups.append(PackedGroup([m], [(parent, child)], slot=len(state.groups)))
    if pack_groups not in state.on_inference_weights:
        state.on_inference_weights.append(pack_groups)


def group_of(layer: MixtureLinear) -> PackedGroup:
    """The packed group ``layer`` (plain or packed, in the model now or a reference kept from
    before a swap) belongs to: the group whose member shares its experts."""
    for group in layer.state.groups:
        if any(m.lora_A is layer.lora_A for m in group.members):
            return group
    raise ValueError("this layer is in no packed group: call packing.group_layers(model, state) first")
