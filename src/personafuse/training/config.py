"""One config per training run (YAML or JSON), defaults from the paper's Appendix A.

Saved as ``train_config.json`` beside every checkpoint it produces.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from personafuse.configs import build, config_class, read_mapping
from personafuse.moe.config import PersonaFuseConfig

STAGES = ("warmup", "router", "joint")
# The Random Route k baseline (paper Table 3: "post-training: PersonaFuse", random activation in
# place of the router) trains warm-up and joint only.
RANDOM_ROUTE_STAGES = ("warmup", "joint")


@config_class
class StageConfig:
    steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 1e-4
    # Rows per forward/backward pass; a step's rows are split into chunks of this size.
    micro_batch_size: int = 8
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    optimizer: str = "adamw"  # or "sgd"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    # Learning rate for the persona encoder's pretrained backbone (router and joint stages); None
    # means ``lr``. The paper uses one rate; a lower one here keeps a small encoder from drifting
    # while the fresh projection and expert embeddings move fast.
    encoder_lr: float | None = None


def _warmup() -> StageConfig:  # Appendix A: batch 32 x accumulation 8, 1,000 steps, lr 1e-4
    return StageConfig(steps=1000, batch_size=32, grad_accum=8, lr=1e-4)


def _router() -> StageConfig:  # Appendix A: batch 64, lr 1e-4 (steps not given)
    return StageConfig(steps=1000, batch_size=64, grad_accum=1, lr=1e-4, micro_batch_size=64)


def _joint() -> StageConfig:  # Appendix A: batch 32, lr 1e-5, 300 steps
    return StageConfig(steps=300, batch_size=32, grad_accum=1, lr=1e-5)


@config_class
class TrainConfig:
    data: str = "runs/data"  # a directory of records*.jsonl (or one JSONL file)
    # Records for the router stage alone (it reads only query and p), e.g. many labelled queries
    # where few have responses; None: ``data``. Give the router stage steps to match: 120 steps of 8
    # see 312 queries three times each, too few (docs/training.md).
    router_data: str | None = None
    out: str = "runs/train"
    model: PersonaFuseConfig = field(default_factory=PersonaFuseConfig)
    warmup: StageConfig = field(default_factory=_warmup)  # per-expert batch size in stage 1
    router: StageConfig = field(default_factory=_router)
    joint: StageConfig = field(default_factory=_joint)
    sft: StageConfig = field(default_factory=_warmup)  # single-LoRA baselines
    beta: float = 1.0  # L_router = L_contrastive + beta * L_trait (paper text; Appendix A says 0.5)
    gamma: float = 0.2  # L_joint = L_lm + gamma * L_router (paper text; Appendix A says 1.0)
    margin: float = 0.0  # m in L_contrastive
    max_length: int = 1024
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that supports it, else no
    gradient_checkpointing: bool = False
    save_every: int = 200
    seed: int = 0
    # k > 0 trains the Random Route k baseline instead of PersonaFuse: the same warm-up, no router
    # stage, and a joint stage where each sequence gets k experts drawn at random (1/k each, seeded)
    # and only the experts learn. Evaluate it with ``--routing random:k``.
    random_route: Annotated[int, Field(strict=True)] = 0  # strict: True or "2" is not a count

    def __post_init__(self) -> None:
        k = self.random_route
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 10:
            raise ValueError(f"random_route must be an integer from 0 (off) to 10 experts, got {k!r}")

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this run trains, in order (each starts from the previous one's model)."""
        return RANDOM_ROUTE_STAGES if self.random_route else STAGES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """The config of a mapping; a stage section given in part keeps that stage's other
        defaults (``warmup: {steps: 5}``)."""
        data = dict(data)
        for key in REMOVED_FIELDS.keys() & data.keys():  # saved train_config.json files still load
            warnings.warn(f"{source}: '{key}' is no longer a setting ({REMOVED_FIELDS[key]}); ignored", stacklevel=2)
            del data[key]
        return build(cls, data, source)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A YAML or JSON training file."""
        return cls.from_dict(read_mapping(path, "training config"), source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# Fields that earlier releases wrote into train_config.json, with what happens instead.
REMOVED_FIELDS = {"log_every": "every step is logged"}

