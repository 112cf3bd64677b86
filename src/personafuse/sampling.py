"""The one sampler: temperature and nucleus (top-p) sampling, one seeded generator per row.

The server's decode loop, ``PersonaFuseModel.generate`` and the evaluation's ``HFSubject`` all draw
their sampled tokens here, so the same prompt, settings and seed give the same text in ``chat``,
``serve`` and ``eval`` (issue 33; before, each had a sampler of its own). The logits pass through
transformers' own warpers (``TemperatureLogitsWarper``, ``TopPLogitsWarper``: huggingface/transformers,
src/transformers/generation/logits_process.py), then one draw from the row's ``torch.Generator``:
a row's tokens depend on its seed, never on the rows it is batched with.
"""

from __future__ import annotations

import random

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

# vLLM's rule (vllm-project/vllm, vllm/sampling_params.py, ``_SAMPLING_EPS``): a temperature below
# 1e-5 means greedy. Dividing logits by a smaller one overflows to inf and the softmax to NaN.
GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """The next-token distribution of a row is not usable (NaN or infinite logits)."""


def row_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one row: seeded, or from a fresh random seed. A seed torch cannot take
    raises (RuntimeError, ValueError, OverflowError or TypeError, as ``manual_seed`` does)."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else random.randrange(2**63))
    return g


def warpers(temperature: float, top_p: float = 1.0) -> LogitsProcessorList:
    """transformers' processors for these settings (top-p keeps at least the most likely token)."""
    out = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
    if top_p < 1.0:
        out.append(TopPLogitsWarper(float(top_p), min_tokens_to_keep=1))
    return out


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One row's next token from its [vocab] logits; :class:`SamplingError` where the
    probabilities are not finite (never a token drawn from garbage)."""
    scores = warpers(temperature, top_p)(None, logits.detach().float().cpu()[None])[0]  # type: ignore[arg-type]
    probs = torch.softmax(scores, dim=-1)
    total = probs.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0.0:
        raise SamplingError(f"next-token probabilities are not finite (temperature {temperature})")
    return int(torch.multinomial(probs, 1, generator=generator))


class BatchSampler:
    """Next tokens of a batch whose rows share settings, each row with its own generator seeded
    with ``seed`` (so a prompt's reply does not depend on its batch-mates): the ``pick`` of
    :func:`personafuse.moe.decoding.greedy_generate`'s loop."""

    def __init__(self, rows: int, temperature: float, top_p: float = 1.0, seed: int | None = None) -> None:
        if not temperature >= GREEDY_BELOW:
            raise ValueError(f"sampling needs a temperature of at least {GREEDY_BELOW}, got {temperature!r}")
        if not 0.0 <= top_p <= 1.0:  # 0 keeps only the most likely token, as the server's API allows
            raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
        self.temperature, self.top_p = temperature, top_p
        self.generators = [row_generator(seed) for _ in range(rows)]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = [sample_row(logits[b], self.temperature, self.top_p, g) for b, g in enumerate(self.generators)]
        return torch.tensor(tokens, dtype=torch.long, device=logits.device)
