"""``EvalConfig``: one ``personafuse eval`` run (the runner's; the grid's eval section is
``reproduce.config.GridEvalConfig``). Kept apart from the runner so the CLI reads its option
defaults and help from these fields without importing the runner."""

from __future__ import annotations

from typing import Any

from personafuse.configs import config_class, help_field

# Persona-CoT prompting's budget for steps 1 and 2 each (the pipeline's cue and trait replies are JSON
# of about 60-200 tokens); `eval --reasoning-tokens`, the grid's eval.reasoning_tokens and
# evaluation.cot_prompting all default to it.
REASONING_TOKENS = 512


@config_class
class EvalConfig:
    model: str = help_field("default", "default | base | hf:ID_OR_PATH | lora:DIR | openai:MODEL | pf:DIR")
    benchmarks: list[str] = help_field(help="comma-separated benchmark names", factory=lambda: ["emobench", "eqbench", "gsm8k"])
    out: str = help_field("runs/eval", "run directory (results.json + NAME.jsonl); resumed if it exists")
    data: str | None = help_field(None, "folder laid out like ../shared/benchdata, or one benchmark's file")
    limit: int | None = help_field(None, "seeded subsample of N items per benchmark")
    seed: int = help_field(0, "sampling, option shuffles and routing seed")
    # the --limit subsample: the same items whatever --seed (seeds compare alike)
    item_seed: int = help_field(0, "which items --limit picks; the same for every --seed, so seeds compare the same items")
    judge: str | None = None
    routing: str | None = help_field(None, "PersonaFuse routing: router | fixed:POLE=W,... | random:K | pole:NAME | top_k:K")
    batch_size: int = help_field(8, "generation batch size")
    chunk_size: int = 16  # items generated and written per step (the unit of resumption)
    max_new_tokens: int | None = help_field(None, "override every benchmark's generation length")
    system_prompt: str | None = help_field(None, "system message put first in every chat prompt (prompting baselines); raw-completion prompts get none")
    options: dict[str, dict[str, Any]] = help_field(factory=dict)  # per-benchmark options
    # Persona-CoT prompting (evaluation.cot_prompting): reasoning tokens before the answer; None: off
    persona_cot: int | None = None

    def identity(self) -> dict[str, Any]:
        """What must match for a directory to be resumed (limit and batch sizes may change)."""
        out = {"model": self.model, "seed": self.seed, "routing": self.routing, "judge": self.judge, "options": self.options, "max_new_tokens": self.max_new_tokens, "system_prompt": self.system_prompt}
        if self.persona_cot is not None:  # only when on: directories written before it still resume
            out["persona_cot"] = self.persona_cot
        return out
