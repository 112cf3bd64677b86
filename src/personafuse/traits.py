"""The shared vocabulary: Big Five traits, their ten poles, activation vectors and the TAT prior.

Every other module speaks in these terms. The ten poles always come in the paper's order
(footnote 3): high and low pole of Openness, Conscientiousness, Extraversion, Agreeableness,
Neuroticism. An activation vector ``p`` is ten 0/1 entries in that order; a weight vector ``w``
is ten non-negative numbers in that order (summing to 1 when it comes from the router).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

TRAITS: tuple[str, ...] = ("O", "C", "E", "A", "N")
TRAIT_NAMES: dict[str, str] = {
    "O": "Openness",
    "C": "Conscientiousness",
    "E": "Extraversion",
    "A": "Agreeableness",
    "N": "Neuroticism",
}
TRAIT_POLES: tuple[str, ...] = tuple(f"{level}_{t}" for t in TRAITS for level in ("high", "low"))
NUM_POLES = len(TRAIT_POLES)
POLE_INDEX: dict[str, int] = {p: i for i, p in enumerate(TRAIT_POLES)}

# Short descriptions used in prompts and displays (our own wording).
POLE_DESCRIPTIONS: dict[str, str] = {
    "high_O": "imaginative, curious, open to unusual ideas",
    "low_O": "conventional, concrete, prefers the familiar",
    "high_C": "organised, thorough, careful and precise",
    "low_C": "relaxed, spontaneous, loose about structure",
    "high_E": "energetic, talkative, upbeat and assertive",
    "low_E": "quiet, reserved, calm and unhurried",
    "high_A": "warm, compassionate, cooperative and kind",
    "low_A": "blunt, critical, challenging and competitive",
    "high_N": "sensitive, emotionally attuned, easily worried",
    "low_N": "calm, steady, emotionally stable and reassuring",
}


class TraitError(ValueError):
    """Raised for an invalid pole name, activation vector or weight vector."""


def pole_name(pole: str) -> str:
    """Normalise a pole spelling to its canonical name.

    Accepts ``high_O``, ``O+``, ``+O``, ``high openness``, ``High Openness``, ``low-N``,
    ``low neuroticism`` and similar. Raises :class:`TraitError` naming the input otherwise.
    """
    raw = pole
    s = str(pole).strip()
    if s in POLE_INDEX:
        return s
    low = s.lower().replace("-", " ").replace("_", " ").strip()
    if len(s) == 2 and s[0] in "+-" and s[1].upper() in TRAITS:
        return ("high_" if s[0] == "+" else "low_") + s[1].upper()
    if len(s) == 2 and s[1] in "+-" and s[0].upper() in TRAITS:
        return ("high_" if s[1] == "+" else "low_") + s[0].upper()
    parts = low.split()
    if len(parts) == 2 and parts[0] in ("high", "low"):
        level, trait = parts
        for code, name in TRAIT_NAMES.items():
            if trait in (code.lower(), name.lower()) or (trait == "extroversion" and code == "E"):
                return f"{level}_{code}"
    raise TraitError(f"unknown pole {raw!r}; expected one of {', '.join(TRAIT_POLES)}")


def vector_from_poles(poles: str | Iterable[str]) -> list[int]:
    """Activation vector (ten 0/1 ints) from pole names (one name, or an iterable of names)."""
    if isinstance(poles, str):  # one pole, not its characters
        poles = [poles]
    p = [0] * NUM_POLES
    for pole in poles:
        p[POLE_INDEX[pole_name(pole)]] = 1
    return p


def poles_from_vector(p: Sequence[float], threshold: float = 0.5) -> list[str]:
    """Names of the poles whose entry is above ``threshold`` (validates the length)."""
    check_length(p, "activation vector")
    return [TRAIT_POLES[i] for i, v in enumerate(p) if float(v) > threshold]


def check_length(v: Sequence[float], what: str = "vector") -> None:
    if len(v) != NUM_POLES:
        raise TraitError(f"{what} has {len(v)} entries; expected {NUM_POLES} ({', '.join(TRAIT_POLES)})")


def validate_activation(p: Sequence[float], *, allow_both_poles: bool = True, what: str = "p") -> list[int]:
    """Check an activation vector: ten entries, each 0 or 1, not all zero.

    With ``allow_both_poles=False`` a vector that activates both poles of one trait is rejected too.
    Returns the vector as a list of ints.
    """
    check_length(p, what)
    out: list[int] = []
    for i, v in enumerate(p):
        if v not in (0, 1, True, False, 0.0, 1.0):
            raise TraitError(f"{what}[{i}] ({TRAIT_POLES[i]}) is {v!r}; activation entries must be 0 or 1")
        out.append(int(v))
    if not any(out):
        raise TraitError(f"{what} is all zero: at least one pole must be active")
    if not allow_both_poles and (both := both_poles(out)):
        t = both[0]
        raise TraitError(f"{what} activates both poles of {TRAIT_NAMES[t]} (high_{t} and low_{t})")
    return out


def both_poles(p: Sequence[float]) -> list[str]:
    """The traits (``O``, ``C``, ...) whose high and low pole are both active in ``p``."""
    return [t for t in TRAITS if p[POLE_INDEX[f"high_{t}"]] and p[POLE_INDEX[f"low_{t}"]]]


def weights_from_any(
    weights: Sequence[float] | Mapping[str, float], *, normalise: bool = False, what: str = "weights"
) -> list[float]:
    """Ten non-negative floats from a list of ten numbers or a ``{pole: weight}`` mapping.

    Poles missing from a mapping get 0. Raises :class:`TraitError` naming the bad entry for a wrong
    length, an unknown pole, a negative or non-finite value, or (with ``normalise``) an all-zero vector.
    """
    if isinstance(weights, Mapping):
        vec = [0.0] * NUM_POLES
        seen: dict[int, object] = {}
        for k, v in weights.items():
            try:
                idx = POLE_INDEX[pole_name(k)]
            except TraitError as e:
                raise TraitError(f"{what}: {e}") from None
            if idx in seen:  # two spellings of one pole ("high_A" and "A+"): which one is meant?
                raise TraitError(f"{what}: {seen[idx]!r} and {k!r} both name {TRAIT_POLES[idx]}")
            seen[idx] = k
            vec[idx] = _number(v, f"{what}[{k!r}]")
    else:
        if isinstance(weights, str | bytes):
            raise TraitError(f"{what} must be ten numbers or a {{pole: weight}} mapping, got a string")
        vec = [_number(v, f"{what}[{i}]") for i, v in enumerate(weights)]
        check_length(vec, what)
    for i, v in enumerate(vec):
        if v < 0:
            raise TraitError(f"{what}: {TRAIT_POLES[i]} is negative ({v}); weights must be >= 0")
    if normalise:
        total = sum(vec)
        if total <= 0:
            raise TraitError(f"{what} are all zero; at least one must be positive")
        if not math.isfinite(total):
            # Finite weights whose sum overflows (1e308 each): v / inf would turn every weight
            # into 0, so scale by the largest first.
            top = max(vec)
            vec = [v / top for v in vec]
            total = sum(vec)
        vec = [v / total for v in vec]
    return vec


def _number(v: object, what: str) -> float:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraitError(f"{what} is {v!r}, not a number") from None
    if not math.isfinite(f):
        raise TraitError(f"{what} is {f}, not a finite number")
    return f


def weights_dict(w: Sequence[float]) -> dict[str, float]:
    """``{pole: weight}`` in the canonical order (the JSON shape every interface reports)."""
    check_length(w, "weights")
    return {pole: float(x) for pole, x in zip(TRAIT_POLES, w, strict=True)}


def big_five_summary(w: Sequence[float]) -> dict[str, float]:
    """Net score per trait in [-1, 1]: weight of the high pole minus weight of the low pole,
    divided by the total weight. Positive means the mixture leans to the high pole."""
    check_length(w, "weights")
    total = sum(float(x) for x in w) or 1.0
    return {
        TRAIT_NAMES[t]: (float(w[POLE_INDEX[f"high_{t}"]]) - float(w[POLE_INDEX[f"low_{t}"]])) / total
        for t in TRAITS
    }


def describe(w: Sequence[float], top: int = 3) -> str:
    """One line naming the strongest poles, e.g. ``high_A 0.31 · low_N 0.22 · high_C 0.15``."""
    check_length(w, "weights")
    order = sorted(range(NUM_POLES), key=lambda i: -float(w[i]))[:top]
    return " · ".join(f"{TRAIT_POLES[i]} {float(w[i]):.2f}" for i in order)


# Trait Activation Theory prior (paper Table 1): which poles each kind of task calls for.
TAT_PRIOR: dict[str, tuple[str, ...]] = {
    "creativity": ("high_O", "low_C"),
    "math": ("high_C", "high_E", "low_N"),
    "social_cognition": ("high_A",),
    "customer_service": ("high_C", "high_A", "low_N"),
    "therapist": ("high_C", "high_A", "low_N", "low_E"),
}


def tat_prior(task: str) -> list[int]:
    """Activation vector the TAT prior gives for a task name (``creativity``, ``math``, ...)."""
    key = task.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in TAT_PRIOR:
        raise TraitError(f"no TAT prior for task {task!r}; known: {', '.join(TAT_PRIOR)}")
    return vector_from_poles(TAT_PRIOR[key])
