"""``PipelineConfig``: the settings of one ``personafuse data generate`` run (kept apart from the
pipeline so the CLI reads its option defaults and help from these fields without importing it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from personafuse.configs import config_class, help_field

if TYPE_CHECKING:
    from personafuse.data.teachers import Teacher

MODES = ("persona_cot", "direct", "human_like")


@config_class
class PipelineConfig:
    mode: str = help_field("persona_cot", " | ".join(MODES))
    constrained: bool = False  # pole choice by log-likelihood (needs a scoring teacher)
    single_call: bool = help_field(False, "Free mode: all three steps in one request.")
    concurrency: int = 32  # queries in flight
    cue_tokens: int = 256
    traits_tokens: int = 384
    response_tokens: int = 1024
    temperature: float = help_field(0.0, "Sampling temperature (0 = greedy).")
    poles_per_cue: int = help_field(2, "Constrained mode: at most this many poles per cue.")
    # Rules the paper does not state, with our defaults: a record may not activate both poles of one
    # trait (such replies are counted as "both_poles" rejects); True keeps them.
    allow_both_poles: bool = help_field(False, "Keep replies that activate both poles of one trait (the paper does not say; by default they are 'both_poles' rejects).")
    trim_truncated: bool = False  # cut a length-truncated answer at its last full sentence
    max_consecutive_errors: int = 50  # abort when the teacher keeps failing (server down)
    # endpoint rejects allowed before the run exits non-zero: "N" queries or "P%" of those attempted
    max_endpoint_failures: str = help_field("5%", "Exit non-zero when more queries than this fail at the endpoint: a count (25) or a share of the queries attempted (5%).")
    repetition_penalty: float = 1.0  # passed to local teachers

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        endpoint_failure_limit(self.max_endpoint_failures, 0)  # fail early on a bad spec

    def endpoint_failure_limit(self, attempted: int) -> float:
        return endpoint_failure_limit(self.max_endpoint_failures, attempted)

    def settings(self, teacher: Teacher) -> dict[str, Any]:
        """What must stay the same when a run is resumed into the same folder."""
        from personafuse.data import prompts

        return {
            "mode": self.mode,
            "teacher": teacher.name,
            "prompt_version": prompts.PROMPT_VERSION,
            "constrained": self.constrained if self.mode == "persona_cot" else False,
            "single_call": self.single_call if self.mode == "persona_cot" else False,
            # only when set, so that folders written before the option existed still resume
            **({"allow_both_poles": True} if self.allow_both_poles and self.mode == "persona_cot" else {}),
        }


def endpoint_failure_limit(spec: str, attempted: int) -> float:
    """How many endpoint rejects ``--max-endpoint-failures`` allows: ``"25"`` or ``"5%"`` of the
    queries attempted."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return attempted * pct / 100
        n = int(text)
        if n < 0:
            raise ValueError
        return float(n)
    except ValueError:
        raise ValueError(f"--max-endpoint-failures {spec!r}: give a count (25) or a share of the queries (5%)") from None
