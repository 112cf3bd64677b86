"""Local stand-ins for what the large reproduce presets fetch: random models of the presets' own
architecture families, the four Hub query datasets as small files in each dataset's own schema, and
a judge on loopback. Used by tests/reproduce/test_reproduce_presets.py (tiny widths, CPU) and
benchmarks/gpu_e2e.sh (Llama-3.1-8B width, made on the device; nothing large is carried).

    python benchmarks/standins.py --out DIR [--family llama3] [--width 8b] [--layers 2] [--device cuda]

writes DIR/base (random weights, the embedded SmolLM2 tokenizer), DIR/encoder (a random Qwen2),
DIR/sources/*.json[l] and prints the ``--set`` overrides that point a preset at them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from personafuse.backends.loopback import ChatServer

# The presets' base models: SmolLM2-1.7B-Instruct and Llama-3.1-8B are both LlamaForCausalLM; what
# tells them apart is kept (SmolLM2 ties its embeddings, Llama 3.1 scales RoPE its own way).
FAMILIES: dict[str, dict[str, Any]] = {
    "smollm2": {"tie_word_embeddings": True, "rope_theta": 130000.0, "max_position_embeddings": 8192},
    "llama3": {"tie_word_embeddings": False, "rope_theta": 500000.0, "max_position_embeddings": 131072,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}},
}
# hidden, intermediate, attention heads, key/value heads
WIDTHS = {"tiny": (32, 64, 4, 2), "8b": (4096, 14336, 32, 8), "1.7b": (2048, 8192, 32, 32)}


def _tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer (chat template included), from its converted cache."""
    from personafuse import embedded

    return embedded.load_tokenizer(embedded.resolve("default"))


def make_base(path: Path, family: str = "llama3", width: str = "tiny", layers: int = 2, device: str = "cpu",
              dtype: str = "float32") -> Path:
    """A random ``family`` model of ``width`` with ``layers`` layers, saved with the embedded tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    h, m, heads, kv = WIDTHS[width]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=m, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, torch_dtype=dtype, **FAMILIES[family])
    torch.manual_seed(0)
    with torch.device(device):  # made where it runs: a GPU initialises 8B-wide layers in seconds
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_encoder(path: Path) -> Path:
    """A tiny random Qwen2 (the presets' encoder is Qwen2.5-0.5B) with the embedded tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer()
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


TOPICS = ["a job interview", "my sister's wedding speech", "a python script that renames photos", "a sad week",
          "learning the cello at forty", "a landlord who will not fix the heating", "a history essay on trade routes",
          "training for a first marathon"]


def hub_sources(folder: Path) -> dict[str, str]:
    """ShareGPT, WildChat, PersonaHub and Infinity-Instruct rows in their own schemas (a few queries
    shared across them, to exercise the cross-source de-duplication); returns ``{kind: spec}``."""
    folder.mkdir(parents=True, exist_ok=True)
    q = [f"Could you help me with {t}? ({i})" for i, t in enumerate(TOPICS)]
    shared = "Could you help me with a job interview? (0)"
    files = {
        "sharegpt": ("sharegpt.json", [{"id": f"sg{i}", "conversations": [{"from": "human", "value": f"ShareGPT: {x}"}, {"from": "gpt", "value": "Sure."}]}
                                       for i, x in enumerate(q)] + [{"id": "sg-shared", "conversations": [{"from": "human", "value": shared}]}]),
        "wildchat": ("wildchat.jsonl", [{"conversation": [{"role": "user", "content": f"WildChat: {x}", "language": "English"}],
                                         "language": "English", "toxic": False, "redacted": False} for x in [*q, shared]]),
        "personahub": ("personahub.jsonl", [{"input persona": "a nurse", "synthesized text": f"PersonaHub: {x}"} for x in q]),
        "infinity": ("infinity.jsonl", [{"conversations": [{"from": "human", "value": f"Infinity: {x}"}], "langdetect": "en"} for x in [*q, shared]]),
    }
    specs = {}
    for kind, (name, rows) in files.items():
        p = folder / name
        text = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
        p.write_text(text, encoding="utf-8")
        specs[kind] = f"{kind}:{p}"
    return specs


def _judge_reply(messages: list[dict[str, str]]) -> str:
    """Arena-Hard's label or MentalChat16K's rating, whichever the prompt asks for."""
    text = " ".join(str(m.get("content", "")) for m in messages)
    return "My final verdict is tie: [[A=B]]" if "[[A>>B]]" in text or "<|User Prompt|>" in text else "Rating: [[5]]"


class JudgeServer(ChatServer):
    """An OpenAI-compatible judge on loopback: one verdict per request, nothing else."""

    def __init__(self) -> None:
        super().__init__(lambda messages, body: _judge_reply(messages))


def preset_sets(folder: Path, teacher_url: str, judge_url: str, *, launcher: str = "accelerate launch --cpu --num_processes 2",
                benchdata: Path | None = None) -> list[str]:
    """The ``--set`` overrides that run a large preset on the stand-ins in ``folder`` (tiny steps,
    one seed, one item per benchmark)."""
    src = hub_sources(folder / "sources")
    sources = [src["sharegpt"], src["wildchat"], src["personahub"], src["infinity"], "seeds"]
    sets = [f"model={folder / 'base'}", f"train.model.encoder_model={folder / 'encoder'}", f"data.source={json.dumps(sources)}",
            "data.limit=308", "data.heldout=1", f"teacher.base_url={teacher_url}", f"eval.judge_base_url={judge_url}",
            f"train_launcher={launcher}", "seeds=[0]", "eval.limit=1", "eval.batch_size=4", "eval.reasoning_tokens=4",
            "eval.reply_tokens=4", "eval.threads=1", "teacher.max_new_tokens=64", "train.max_length=64", "train.save_every=1",
            "train.gradient_checkpointing=false", "train.mixed_precision='no'", "train.model.dtype=float32"]
    for stage in ("warmup", "router", "joint", "sft"):
        sets += [f"train.{stage}.steps=1", f"train.{stage}.batch_size=2", f"train.{stage}.grad_accum=1", f"train.{stage}.micro_batch_size=1"]
    options = {b: {"max_new_tokens": 4} for b in ("emobench", "eqbench", "tombench", "gpqa", "arenahard", "gsm8k", "safetybench", "shopmmlu", "mentalchat")}
    options["gsm8k"]["num_fewshot"] = 0
    sets.append(f"eval.options={json.dumps(options)}")
    if benchdata is not None:
        sets.append(f"eval.data={benchdata}")
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama3")
    ap.add_argument("--width", choices=sorted(WIDTHS), default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    make_base(a.out / "base", a.family, a.width, a.layers, a.device, a.dtype)
    make_encoder(a.out / "encoder")
    hub_sources(a.out / "sources")
    print(f"stand-ins in {a.out}: base ({a.family}, {a.width} width, {a.layers} layers), encoder (Qwen2), sources")


if __name__ == "__main__":
    main()
