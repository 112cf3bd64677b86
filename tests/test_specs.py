"""One grammar of --model specs (personafuse.specs), one meaning per spelling in every command.

`default` used to be PersonaFuse with untrained experts in chat/serve but the plain base model in
eval; these tests hold eval, chat/serve and the parser to one reading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer

from conftest import build_tiny
from personafuse.chat_cli import load_model
from personafuse.evaluation.subjects import HFSubject, PersonaFuseSubject, load_subject
from personafuse.specs import EMBEDDED, ModelSpec

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [
        ("default", "personafuse", EMBEDDED),
        ("base", "hf", EMBEDDED),
        ("pf:runs/pf/joint/model", "personafuse", "runs/pf/joint/model"),
        ("hf:HuggingFaceTB/SmolLM2-135M", "hf", "HuggingFaceTB/SmolLM2-135M"),
        ("lora:adapters/x", "lora", "adapters/x"),
        ("openai:gpt-4o", "openai", "gpt-4o"),
        ("Qwen/Qwen2.5-0.5B", "hf", "Qwen/Qwen2.5-0.5B"),
    ],
)
def test_each_spelling_has_one_meaning(text, kind, target):
    s = ModelSpec.parse(text)
    assert (s.kind, s.target) == (kind, target)


@pytest.mark.parametrize("bad", ["", "pf:", "hf:  "])
def test_bad_specs_name_themselves(bad):
    with pytest.raises(ValueError, match="model spec|empty"):
        ModelSpec.parse(bad)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spec")
    model = build_tiny(d)
    model.save_pretrained(d / "ckpt")
    return d


def test_a_checkpoint_is_personafuse_in_eval_and_chat(ckpt):
    for spec in (f"pf:{ckpt / 'ckpt'}", str(ckpt / "ckpt")):
        assert ModelSpec.parse(spec).kind == "personafuse"
        subj = load_subject(spec)
        assert isinstance(subj, PersonaFuseSubject)
        chat = load_model(spec)
        assert type(chat) is type(subj.model)
        w = subj.model.route(["i am so anxious"])
        assert torch.allclose(w, chat.route(["i am so anxious"]))


def test_a_plain_model_is_plain_in_eval_and_the_base_of_fresh_experts_in_chat(ckpt):
    base = str(ckpt / "base")
    subj = load_subject(base)
    assert isinstance(subj, HFSubject) and subj.source == {"path": base}
    with pytest.raises(typer.BadParameter, match="neither a PersonaFuse checkpoint"):
        load_model(str(ckpt))  # a folder that is neither kind


def test_openai_and_lora_are_refused_where_experts_are_needed():
    with pytest.raises(typer.BadParameter, match="cannot carry PersonaFuse experts"):
        load_model("openai:gpt-4o")


@pytest.mark.e2e
def test_default_is_the_embedded_personafuse_in_eval_and_chat():
    subj = load_subject("default")
    assert isinstance(subj, PersonaFuseSubject) and subj.describe()["name"] == "personafuse-default"
    base = load_subject("base")
    assert isinstance(base, HFSubject) and base.describe()["name"] == "smollm2-135m-instruct"
    chat = load_model("default")
    q = ["I've been so anxious I can't sleep"]
    assert torch.allclose(subj.model.route(q), chat.route(q), atol=1e-5)
