"""Persona-CoT data generation: teachers, the three-step procedure, validation, sources and store.

Training records are ``(q, r, p)`` plus cues, traits, rationale and provenance (see docs/data.md).
Heavy dependencies (torch, transformers, openai, datasets) load only when the part that needs them
runs, so ``personafuse data --help`` stays fast.
"""

from __future__ import annotations

from personafuse.data.prompts import PROMPT_VERSION
from personafuse.data.validation import REJECT_REASONS, Rejection

__all__ = ["PROMPT_VERSION", "REJECT_REASONS", "Rejection"]
