"""Routing modes: how a request's ten mixture weights are chosen.

``router``  the learned router's weights (default)
``fixed``   caller-given weights (normalised to sum to 1)
``blend``   (1 - alpha) * router + alpha * fixed
``top_k``   the router's k largest weights, renormalised
``pole``    one expert with weight 1
``random``  Random Route k (paper §6.1): k experts drawn at random, weight 1/k each (seeded)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from personafuse.chat import Prompt
from personafuse.moe.router import router_text
from personafuse.traits import NUM_POLES, POLE_INDEX, TraitError, pole_name, weights_from_any

MODES = ("router", "fixed", "blend", "top_k", "pole", "random")


# Other spellings of the modes (the CLI accepts ``topk:2``, so the class does too).
ALIASES = {"topk": "top_k", "one": "pole", "expert": "pole", "random_route": "random"}


@dataclass
class Routing:
    """How a request's ten mixture weights are chosen.

    ======================================  ==================================================
    ``Routing()``                           the learned router (default)
    ``Routing("fixed", weights=w)``         ``w`` (ten numbers or ``{pole: weight}``), normalised
    ``Routing("blend", weights=w, alpha=a)`` ``(1 - a) * router + a * w``
    ``Routing("top_k", k=2)``               the router's ``k`` largest weights, renormalised
    ``Routing("pole", pole="high_C")``      one expert, weight 1
    ``Routing("random", k=2, seed=0)``      Random Route: ``k`` experts drawn per query, ``1/k`` each
    ======================================  ==================================================

    Random Route with an integer ``seed`` draws the same experts for the same query text however
    it is batched (and in every process); ``seed=None`` draws fresh experts on every call.
    :meth:`parse` reads the CLI form (``"top_k:2"``) and :meth:`from_dict` the server's JSON form.
    """

    mode: str = "router"
    weights: Sequence[float] | Mapping[str, float] | None = None
    alpha: float = 0.5
    k: int = 1
    pole: str | None = None
    seed: int | None = 0
    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mode = str(self.mode).strip().lower().replace("-", "_")
        self.mode = ALIASES.get(mode, mode)
        if self.mode not in MODES:
            raise TraitError(f"unknown routing mode {self.mode!r}; expected one of {', '.join(MODES)}")
        # a field the mode does not read is a mistake, not something to drop without a word
        if self.weights is not None and self.mode not in ("fixed", "blend"):
            raise TraitError(f"routing mode {self.mode!r} does not use 'weights'; use mode 'fixed' or 'blend'")
        if self.pole is not None and self.mode != "pole":
            raise TraitError(f"routing mode {self.mode!r} does not use 'pole'; use mode 'pole'")
        if self.mode in ("fixed", "blend"):
            if self.weights is None:
                raise TraitError(f"routing mode {self.mode!r} needs 'weights'")
            self.weights = weights_from_any(self.weights, normalise=True)
        if self.mode == "blend":
            self.alpha = _alpha(self.alpha)  # stored as the number it was checked as ("0.5" broke the mix)
        if self.mode == "random" and self.seed is not None and not _is_seed(self.seed):
            raise TraitError(f"routing 'seed' must be an integer from -2**63 to 2**63-1 (or null), got {self.seed!r}")
        if self.mode in ("top_k", "random") and not (
            isinstance(self.k, int) and not isinstance(self.k, bool) and 1 <= self.k <= NUM_POLES
        ):
            raise TraitError(f"routing 'k' must be an integer from 1 to {NUM_POLES}, got {self.k!r}")
        if self.mode == "pole":
            if self.pole is None:
                raise TraitError("routing mode 'pole' needs 'pole' (e.g. high_A)")
            self.pole = pole_name(self.pole)

    @property
    def needs_router(self) -> bool:
        return self.mode in ("router", "blend", "top_k")

    def resolve(
        self, batch_size: int, router_weights: torch.Tensor | None = None, keys: Sequence[str] | None = None
    ) -> torch.Tensor:
        """[batch_size, 10] weights for this mode; ``router_weights`` is required when
        :attr:`needs_router`.

        Random Route draws: with ``keys`` (the query texts) and an integer ``seed`` each row's draw
        is seeded by ``(seed, key)``, so a query gets the same experts however it is batched or
        chunked; otherwise the draws continue one stream across calls (seeded by ``seed``, or
        fresh when it is None), never repeating a pattern."""
        if self.needs_router and router_weights is None:
            raise ValueError(f"routing mode {self.mode!r} needs the router's weights")
        if self.mode == "router":
            return router_weights  # type: ignore[return-value]
        ref = router_weights
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        if self.mode in ("fixed", "blend"):
            fixed = torch.tensor(self.weights, dtype=dtype, device=device).expand(batch_size, -1)
            if self.mode == "fixed":
                return fixed.clone()
            return (1 - self.alpha) * router_weights + self.alpha * fixed  # type: ignore[operator]
        if self.mode == "top_k":
            vals, idx = router_weights.topk(self.k, dim=-1)  # type: ignore[union-attr]
            out = torch.zeros_like(router_weights).scatter(-1, idx, vals)
            return out / out.sum(-1, keepdim=True)
        if self.mode == "pole":
            out = torch.zeros(batch_size, NUM_POLES, dtype=dtype, device=device)
            out[:, POLE_INDEX[self.pole]] = 1.0  # type: ignore[index]
            return out
        # random: k distinct experts per row, weight 1/k each.
        out = torch.zeros(batch_size, NUM_POLES, dtype=dtype)
        for b in range(batch_size):
            if keys is not None and self.seed is not None:
                digest = hashlib.sha256(f"{self.seed}:{keys[b]}".encode()).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            else:
                if self._generator is None:
                    self._generator = torch.Generator()
                    self._generator.manual_seed(self.seed if self.seed is not None else torch.seed())
                gen = self._generator
            pick = torch.randperm(NUM_POLES, generator=gen)[: self.k]
            out[b, pick] = 1.0 / self.k
        return out.to(device)

    def weights_for(self, queries: Sequence[Prompt], router: Callable[[list[Prompt]], Any] | None) -> torch.Tensor:
        """[len(queries), 10] float32 weights for these queries, the one resolution every caller
        uses (``PersonaFuseModel.generate``, the lm-eval adapter): ``router`` (e.g.
        ``PersonaFuseModel.route``) runs only for the modes that read it, and each query's
        :func:`~personafuse.moe.router.router_text` is its key, so a seeded Random Route draws the
        same experts for a query however it is batched."""
        router_w = None
        if self.needs_router:
            if router is None:
                raise ValueError(f"routing mode {self.mode!r} needs a router; this model has none")
            router_w = torch.as_tensor(router(list(queries)), dtype=torch.float32) if queries else torch.empty(0, NUM_POLES)
        return self.resolve(len(queries), router_w, keys=[router_text(q) for q in queries]).float()

    @classmethod
    def coerce(cls, routing: Routing | str | Mapping[str, Any] | None) -> Routing:
        """A :class:`Routing` from itself, its CLI form, its JSON form or None (the router)."""
        if routing is None:
            return cls()
        if isinstance(routing, Routing):
            return routing
        if isinstance(routing, str):
            return cls.parse(routing)
        if isinstance(routing, Mapping):
            return cls.from_dict(routing)
        raise TypeError(
            "routing must be a Routing, its CLI form (e.g. 'top_k:2') or its JSON form "
            f"(e.g. {{'mode': 'top_k', 'k': 2}}), got {type(routing).__name__}"
        )

    @classmethod
    def parse(cls, text: str, seed: int | None = 0) -> Routing:
        """Parse the CLI form: ``router``, ``pole:high_A``, ``top_k:3``, ``random:2`` (``random``
        alone: one expert), ``fixed:high_A=0.6,low_N=0.4`` or ten numbers in pole order,
        ``blend:0.3:high_A=1``."""
        head, _, rest = text.strip().partition(":")
        head = head.strip().lower().replace("-", "_")
        head = ALIASES.get(head, head)  # the spellings the class accepts
        if head in ("router", ""):
            return cls("router")
        if head == "pole":
            return cls("pole", pole=rest)
        if head in ("top_k", "random"):
            try:
                k = int(rest) if rest.strip() or head != "random" else 1  # plain "random": one expert
            except ValueError:
                raise TraitError(f"routing {text!r}: expected {head}:K with an integer K") from None
            return cls("random", k=k, seed=seed) if head == "random" else cls("top_k", k=k)
        if head == "fixed":
            return cls("fixed", weights=_parse_weights(rest, text))
        if head == "blend":
            a, _, w = rest.partition(":")
            try:
                alpha = float(a)
            except ValueError:
                raise TraitError(f"routing {text!r}: expected blend:ALPHA:pole=w,...") from None
            return cls("blend", weights=_parse_weights(w, text), alpha=alpha)
        raise TraitError(f"unknown routing mode {head!r} in {text!r}; expected one of {', '.join(MODES)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what :meth:`from_dict` reads): the mode and the fields it uses."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode in ("top_k", "random"):
            out["k"] = self.k
        if self.mode == "random":
            out["seed"] = self.seed
        if self.mode == "pole":
            out["pole"] = self.pole
        if self.mode in ("fixed", "blend"):
            out["weights"] = list(self.weights)  # type: ignore[arg-type]
        if self.mode == "blend":
            out["alpha"] = self.alpha
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Routing:
        """The JSON form used by the server's ``persona`` field."""
        known = {"mode", "weights", "alpha", "k", "pole", "seed"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TraitError(
                f"persona: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))


def _alpha(value: Any) -> float:
    """The blend share as a float in [0, 1]; numbers and numeric strings (as JSON clients send them)."""
    try:
        alpha = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        alpha = math.nan
    if not 0.0 <= alpha <= 1.0:  # NaN fails this too
        raise TraitError(f"routing 'alpha' must be a number in [0, 1], got {value!r}")
    return alpha


def _is_seed(value: Any) -> bool:
    # torch's generators take 64-bit seeds; the range is vLLM's for a request seed (int64).
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _parse_weights(text: str, whole: str) -> dict[str, float] | list[float]:
    """``pole=weight,...`` pairs, or ten bare numbers in pole order."""
    if "=" not in text and text.strip():
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise TraitError(f"routing {whole!r}: expected pole=weight pairs or ten numbers") from None
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq:
            raise TraitError(f"routing {whole!r}: expected pole=weight, got {part!r}")
        try:
            out[pole_name(name)] = float(value)
        except ValueError:
            raise TraitError(f"routing {whole!r}: weight for {name!r} is not a number: {value!r}") from None
    if not out:
        raise TraitError(f"routing {whole!r}: no weights given")
    return out
