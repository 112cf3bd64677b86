"""Shared pieces for the evaluation tests: fixture paths, a real OpenAI-compatible HTTP server on
loopback (:class:`personafuse.backends.loopback.ChatServer`, shared with benchmarks/standins.py),
and a tiny randomly initialised causal LM saved to disk."""

from __future__ import annotations

import os
from pathlib import Path

from personafuse.backends.loopback import ChatServer as ChatServer  # the tests import it from here

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_BENCHDATA = FIXTURES / "benchdata"


def real_benchdata() -> Path | None:
    """``$PERSONAFUSE_BENCHDATA`` or ``../shared/benchdata`` next to the repository, if present."""
    env = os.environ.get("PERSONAFUSE_BENCHDATA")
    if env and Path(env).is_dir():
        return Path(env)
    p = Path(__file__).resolve().parents[1].parent / "shared" / "benchdata"
    return p if p.is_dir() else None


def make_tiny_llama(path: Path) -> Path:
    """A 2-layer random Llama with the embedded SmolLM2 tokenizer (chat template included)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from personafuse.embedded import resolve

    src = resolve("default")
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
