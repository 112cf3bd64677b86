"""The grid's variants (the paper's Table 3 rows), one row each: what a variant trains on, how it
trains, how it runs at inference and what it shares. The plan, the cells' commands and the report
read these rows; nothing parses a variant's name. A new variant is one row here (CONTRIBUTING.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str  # the key configs list (``variants: [...]``) and the cells' folders use
    title: str  # how the report names it (the paper's Table 3 wording)
    # The records it learns from (a mode of ``personafuse data generate``); None: no training.
    data: str | None = None
    # ``personafuse train baseline --kind KIND`` (plain LoRA SFT); None with data: the PersonaFuse
    # pipeline (warm-up, router, joint stages: ``personafuse train``).
    baseline: str | None = None
    # K random experts at 1/K instead of the router: trained with ``--random-route K`` (no router
    # stage), evaluated and replying with ``--routing random:K``.
    random_route: int | None = None
    # No training: the model names the cues and poles, then answers (``--persona-cot-prompting``).
    persona_cot_prompting: bool = False
    # Learns from the TAT labeller's vectors (``personafuse data relabel``) instead of the teacher's.
    relabelled: bool = False
    # Starts from PersonaFuse's warm-up experts of the same seed (the warm-up reads neither the
    # router nor the routing, so the same records, seed and steps give the same experts).
    shares_warmup: bool = False
    # Has a learned router: the report analyses its routing (agreement, held-out situations).
    routed: bool = False
    # A variant configs list; False: added by a setting (``data.labeller: both``).
    listed: bool = True

    @property
    def trained(self) -> bool:
        return self.data is not None

    def model_spec(self, base: str, seed: int) -> str:
        """The ``--model`` spec that evaluates this variant (paths relative to the grid's folder)."""
        if not self.trained:
            return base
        folder = f"train/{self.name}/seed{seed}"
        if self.baseline:
            return f"lora:{folder}/baseline-{self.baseline}/adapter"
        return f"pf:{folder}/joint/model"

    def train_args(self) -> list[str]:
        """``personafuse train`` arguments that make this variant, before the config."""
        return ["baseline", "--kind", self.baseline] if self.baseline else []

    def train_flags(self) -> list[str]:
        """``personafuse train`` flags after the config."""
        return ["--random-route", str(self.random_route)] if self.random_route is not None else []

    def inference_flags(self, reasoning_tokens: int) -> list[str]:
        """How the eval and replies cells run it: random routing, or reasoning before the answer."""
        out = ["--routing", f"random:{self.random_route}"] if self.random_route is not None else []
        if self.persona_cot_prompting:
            out += ["--persona-cot-prompting", "--reasoning-tokens", str(reasoning_tokens)]
        return out


# The reference variant: the one the others' warm-up, the probing and the pairwise study start from.
PERSONAFUSE = "personafuse"
# The report's relative improvements are over this one (the paper reports them over Direct-FT).
BASELINE = "direct_ft"
TAT_VARIANT = "personafuse_tat"

# The paper's Table 3 rows in its order, then the ones a setting adds; in report order.
VARIANT_TABLE: dict[str, Variant] = {v.name: v for v in (
    Variant("base", "Base"),
    Variant(BASELINE, "Direct-FT", data="direct", baseline="direct"),
    Variant("human_like_ft", "Human-like-FT", data="human_like", baseline="human_like"),
    Variant("pcot_ft", "Persona-CoT-FT", data="persona_cot", baseline="cot_sft"),  # SFT on Persona-CoT data, no experts
    Variant("pcot_prompting", "Persona-CoT prompting", persona_cot_prompting=True),
    Variant("random_route_1", "Random Route 1", data="persona_cot", random_route=1, shares_warmup=True),
    Variant("random_route_2", "Random Route 2", data="persona_cot", random_route=2, shares_warmup=True),
    Variant("random_route_5", "Random Route 5", data="persona_cot", random_route=5, shares_warmup=True),
    Variant(PERSONAFUSE, "PersonaFuse", data="persona_cot", routed=True),
    # data.labeller: both: PersonaFuse again, its router and joint stages retrained on the TAT
    # labeller's vectors (the warm-up experts reused), for the router analysis under both labellings
    Variant(TAT_VARIANT, "PersonaFuse (TAT labels)", data="persona_cot", relabelled=True, shares_warmup=True, routed=True,
            listed=False),
)}


def variant(name: str) -> Variant:
    """The row of ``name``; KeyError naming the known ones."""
    try:
        return VARIANT_TABLE[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANT_TABLE)}") from None


def listed_variants() -> tuple[str, ...]:
    """The variants a config may list, in the table's order (the default grid: all of them)."""
    return tuple(v.name for v in VARIANT_TABLE.values() if v.listed)


def variant_title(name: str) -> str:
    return variant(name).title
