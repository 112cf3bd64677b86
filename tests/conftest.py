"""Shared fixtures: tiny randomly initialised models built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs TEST_WORKERS processes) each worker, and every process a
# test starts, computes on one thread: N workers x N torch threads on N cores only thrash.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

WORDS = [
    "i",
    "am",
    "feel",
    "so",
    "anxious",
    "sad",
    "happy",
    "angry",
    "tired",
    "worried",
    "about",
    "my",
    "exam",
    "work",
    "job",
    "boss",
    "friend",
    "family",
    "what",
    "is",
    "the",
    "how",
    "do",
    "you",
    "solve",
    "prove",
    "write",
    "a",
    "poem",
    "story",
    "idea",
    "ideas",
    "brainstorm",
    "for",
    "new",
    "product",
    "please",
    "help",
    "me",
    "with",
    "this",
    "math",
    "problem",
    "equation",
    "x",
    "y",
    "plus",
    "minus",
    "times",
    "two",
    "three",
    "four",
    "five",
    "can",
    "code",
    "python",
    "function",
    "bug",
    "error",
    "refund",
    "order",
    "late",
    "package",
    "customer",
    "service",
    "thanks",
    "hello",
    "why",
    "when",
    "where",
    "who",
    "it",
    "not",
    "and",
    "or",
    "but",
    "to",
    "of",
    "in",
    "on",
    "at",
    "be",
    "was",
    "were",
    "will",
    "would",
    "should",
    "could",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>", bos_token="<s>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_causal_lm(kind: str = "llama", vocab_size: int = 160, seed: int = 0, init_range: float = 0.02):
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=2,
        tie_word_embeddings=False,
        # Training tests pass 0.3: with the default 0.02 a frozen random lm_head caps logits near
        # +-0.6, so no adapter could fit a response.
        initializer_range=init_range,
    )
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig}
    if kind == "gemma":
        common["head_dim"] = 8
    cfg = configs[kind](**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_encoder(kind: str = "bert", vocab_size: int = 160, seed: int = 1):
    from transformers import AutoModel, BertConfig, Qwen2Config

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=0,
        )
    else:
        cfg = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            architectures=["Qwen2ForCausalLM"],
        )
    return AutoModel.from_config(cfg).eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def build_tiny(
    tmp_path: Path | None = None,
    base_kind: str = "llama",
    encoder_kind: str = "bert",
    randomise: bool = True,
    init_range: float = 0.02,
    **cfg,
):
    """A tiny PersonaFuseModel. With ``tmp_path`` the base and encoder are saved there first so the
    config references real paths (needed for save/from_pretrained)."""
    from personafuse import PersonaFuseConfig, PersonaFuseModel

    tok = make_tokenizer()
    base = tiny_causal_lm(base_kind, init_range=init_range)
    enc = tiny_encoder(encoder_kind)
    base_path = enc_path = "unused"
    if tmp_path is not None:
        base_path, enc_path = str(tmp_path / "base"), str(tmp_path / "encoder")
        base.save_pretrained(base_path)
        tok.save_pretrained(base_path)
        enc.save_pretrained(enc_path)
        tok.save_pretrained(enc_path)
    config = PersonaFuseConfig(base_model=base_path, encoder_model=enc_path, embed_dim=16, **cfg)
    model = PersonaFuseModel.from_config(
        config, base_model=base, tokenizer=tok, encoder_backbone=enc, encoder_tokenizer=make_tokenizer()
    )
    if randomise:
        randomise_experts(model)
    return model.eval()


def routed_batch_and_plain_logits(pf) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three 6-token rows with a different mixture each, and ``pf``'s logits for them on the plain
    path (gradients on: the layers never use a pack), the reference the inference layouts match."""
    ids = torch.randint(7, 150, (3, 6), generator=torch.Generator().manual_seed(3))
    w = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(4)) * 2, dim=-1)
    with torch.enable_grad():
        plain = pf(ids, weights=w).logits.detach()
    return ids, w, plain


def randomise_experts(model, seed: int = 123, scale: float = 0.3) -> None:
    """Give every expert a non-zero B so that experts differ (fresh LoRA B is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.mixture_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)


# Synthetic Persona-CoT records whose wording determines p (for training tests).
SYNTHETIC_CLASSES = {
    "support": (
        ["anxious", "worried", "sad", "tired"],
        ["high_A", "low_N"],
        "i am so sorry you feel this way",
    ),
    "math": (["solve", "equation", "math", "prove"], ["high_C", "high_E", "low_N"], "x is two plus three"),
    "creative": (["brainstorm", "idea", "poem", "story"], ["high_O", "low_C"], "a new idea for a poem"),
    "service": (
        ["refund", "order", "package", "customer"],
        ["high_C", "high_A", "low_N"],
        "thanks your refund is on the way",
    ),
}
FILLER = [
    "i",
    "am",
    "about",
    "my",
    "the",
    "with",
    "this",
    "please",
    "help",
    "me",
    "can",
    "you",
    "what",
    "how",
]


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    import random

    from personafuse.traits import vector_from_poles

    rng = random.Random(seed)
    names = sorted(SYNTHETIC_CLASSES)
    out = []
    for j in range(n):
        cls = names[j % len(names)]
        keys, poles, reply = SYNTHETIC_CLASSES[cls]
        words = rng.sample(keys, 2) + rng.sample(FILLER, 4)
        rng.shuffle(words)
        q = " ".join(words)
        out.append(
            {
                "id": f"{cls}-{j}",
                "query": q,
                "response": reply,
                "p": vector_from_poles(poles),
                "situation": cls,
            }
        )
    return out


def write_jsonl(path, rows) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def records_on_disk(tmp_path, n: int, seed: int) -> list:
    """``n`` synthetic records written to ``tmp_path/data`` and loaded back as training Records
    (the folder ``train_config`` points at)."""
    from personafuse.training.records import load_records

    write_jsonl(tmp_path / "data" / "records-00000.jsonl", synthetic_records(n, seed=seed))
    return load_records(tmp_path / "data")


def train_config(tmp_path, **kw):
    """A TrainConfig over ``tmp_path/data`` writing to ``tmp_path/out``, full precision."""
    from personafuse.training.config import TrainConfig

    return TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "out"), mixed_precision="no", **kw)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, whole files go to the workers in collection order (`--dist loadfile`,
    so a module's fixtures are built once; `make test` passes `--no-loadscope-reorder`, without which
    xdist re-sorts the files by test count and this order is lost); the files with slow tests go
    first, then those that load the embedded model, so the longest ones never start last and leave
    one worker idle (longest first). Within a file the order stays as written."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank: dict[str, int] = {}
    for item in items:
        r = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("e2e") else 2
        rank[item.nodeid.split("::")[0]] = min(r, rank.get(item.nodeid.split("::")[0], 2))
    first_seen = {f: i for i, f in reversed(list(enumerate(item.nodeid.split("::")[0] for item in items)))}
    items.sort(key=lambda it: (rank[it.nodeid.split("::")[0]], first_seen[it.nodeid.split("::")[0]]))


# Prompts whose lengths are out of order, so a length sort reorders them: batched generation must
# still return reply k for prompt k (tests/evaluation/test_eval_subjects.py, tests/moe/test_generation.py).
UNSORTED_PROMPTS = [
    "please help me with this math problem and my exam",
    "hello",
    "i feel so anxious about my job",
    [{"role": "user", "content": "write a poem"}],
    "why",
    "can you solve the equation x plus two",
]
