"""Persona-encoder probing with real encoders, and routing analysis (tables + radar PNGs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval_support import FIXTURE_BENCHDATA, FIXTURES, ChatServer
from personafuse.evaluation.data import DataError
from personafuse.evaluation.probing import load_probe_data, probe_accuracy, run_probe
from personafuse.evaluation.routing_analysis import analyse
from personafuse.evaluation.runner import EvalConfig, Runner
from personafuse.evaluation.subjects import OpenAISubject
from personafuse.traits import TRAIT_POLES, weights_dict

torch.set_num_threads(1)
INTENTS = FIXTURES / "probing" / "intents.csv"


def test_probe_trained_encoder_beats_untrained_base(tmp_path: Path) -> None:
    rep = run_probe(str(INTENTS), ["minilm", "random:minilm"], text_field="utterance", label_field="domain", seed=0, out=str(tmp_path))
    trained = rep["results"]["minilm"]["accuracy"]
    untrained = rep["results"]["random:minilm"]["accuracy"]
    assert trained >= 0.85 and trained > untrained
    assert rep["results"]["minilm"]["n_test"] == 8 and rep["results"]["minilm"]["n_classes"] == 3
    assert (tmp_path / "probe_intents.json").is_file() and "| minilm |" in rep["markdown"]


def test_probe_split_is_fixed() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = ["a", "b"] * 20
    assert probe_accuracy(x, y, seed=3) == probe_accuracy(x, y, seed=3)


def test_probe_data_errors() -> None:
    with pytest.raises(DataError, match="missing field 'text'"):
        load_probe_data(str(INTENTS))
    with pytest.raises(DataError, match="neither a local file"):
        load_probe_data("no-such-dataset")


def _weights_reply(messages, body):
    """An endpoint that, like a PersonaFuse server, reports routing weights beside the message:
    high_A grows and high_C shrinks with each question (ids 0, 1, 2)."""
    q = messages[-1]["content"]
    i = 0 if "rude joke" in q else 1 if "grease fire" in q else 2
    w = [0.0] * 10
    w[6], w[2] = (0.5 + 0.1 * i, 0.5 - 0.1 * i)
    return "Answer: B", {"personafuse": {"weights": weights_dict(w)}}


def test_routing_analysis_from_runs_and_situations(tmp_path: Path) -> None:
    # A run whose records carry the weights the endpoint reported.
    with ChatServer(_weights_reply) as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["safetybench"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA))
        res = Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False).run()
    assert res["benchmarks"]["safetybench"]["mean_weights"]["high_A"] == pytest.approx(0.6)

    def router(queries):
        out = []
        for q in queries:
            w = [0.0] * 10
            w[8 if ("died" in q or "passed" in q) else 2] = 1.0  # grief → high_N, else high_C
            out.append(weights_dict(w))
        return out

    rep = analyse([str(tmp_path / "run")], situations=str(FIXTURES / "situations.jsonl"), router=router, out=str(tmp_path / "routing"))
    by = {(r["source"], r["group"]): r for r in rep.rows}
    assert by[("run", "safetybench")]["high_A"] == pytest.approx(0.6) and by[("run", "safetybench")]["n"] == 3
    assert by[("situations", "grief")]["high_N"] == 1.0 and by[("situations", "grief")]["n"] == 2
    assert by[("situations", "math")]["high_C"] == 1.0
    routed = [json.loads(x) for x in (tmp_path / "routing" / "situations_routed.jsonl").read_text().splitlines()]
    assert routed[0]["source"] == "made-up" and set(routed[0]["weights"]) == set(TRAIT_POLES)  # other fields kept
    pngs = [f for f in rep.files if f.suffix == ".png"]
    assert len(pngs) == 2 and all(f.stat().st_size > 5000 for f in pngs)
    assert "| situations | grief | 2 |" in rep.markdown


def test_routing_analysis_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with ChatServer(lambda m, b: "Answer: B") as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["safetybench"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA))
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False).run()
    with pytest.raises(ValueError, match="no routing weights"):
        analyse([str(tmp_path / "run")])


def test_probe_and_routing_commands(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from personafuse.evaluation.cli import register

    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["probe", "--dataset", str(INTENTS), "--text-field", "utterance", "--label-field", "domain", "--encoder", "minilm", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "| minilm |" in r.output and (tmp_path / "probe_intents.md").is_file()
    with ChatServer(_weights_reply) as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["safetybench"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA))
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False).run()
    r = CliRunner().invoke(app, ["routing", str(tmp_path / "run"), "--out", str(tmp_path / "routing")])
    assert r.exit_code == 0, r.output
    assert "| run | safetybench | 3 |" in r.output and (tmp_path / "routing" / "radar_benchmarks__run.png").is_file()


def test_root_cli_registers_eval_commands() -> None:
    pytest.importorskip("personafuse.chat_cli", reason="the chat commands (registered first) are not on this branch yet")
    from personafuse import cli

    cli._register()
    names = {c.name for c in cli.app.registered_commands}
    assert {"eval", "report", "routing", "probe", "lm-eval"} <= names


# ---- CLINC150 by domain (paper Table 6: 10 domains + out-of-scope) ------------------------------
CLINC = FIXTURES / "probing" / "clinc150_plus_train.jsonl"


def _hub_parquet(path: Path) -> list[str]:
    """Our CLINC rows as the Hub stores them: parquet with ``intent`` as a class id, the id → name
    table in the file's embedded features. Returns the class names."""
    from datasets import ClassLabel, Dataset, Features, Value

    rows = [json.loads(x) for x in CLINC.read_text().splitlines()]
    names = sorted({r["intent"] for r in rows})
    feats = Features({"text": Value("string"), "intent": ClassLabel(names=names)})
    ds = Dataset.from_dict({"text": [r["text"] for r in rows], "intent": [names.index(r["intent"]) for r in rows]}, features=feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return names


def test_clinc_domain_map_is_the_official_one() -> None:
    from personafuse.evaluation.probing import CLINC150_DOMAINS, INTENT_DOMAIN

    assert len(CLINC150_DOMAINS) == 10 and all(len(v) == 15 for v in CLINC150_DOMAINS.values())
    assert len(INTENT_DOMAIN) == 151 and set(INTENT_DOMAIN.values()) == {*CLINC150_DOMAINS, "oos"}
    assert INTENT_DOMAIN["book_hotel"] == "travel" and INTENT_DOMAIN["timer"] == "utility"


def test_clinc150_labels_domains_by_default_and_intents_on_request(tmp_path: Path) -> None:
    dom = load_probe_data("clinc150", data=str(CLINC))
    assert sorted(set(dom.labels)) == ["banking", "oos", "travel", "utility"] and len(dom.texts) == 24
    intents = load_probe_data("clinc150-intents", data=str(CLINC))
    assert len(set(intents.labels)) == 7 and "book_flight" in intents.labels
    # The Hub's parquet (ids + embedded names), as a file and as a mirrored Hub snapshot.
    pq = tmp_path / "train.parquet"
    _hub_parquet(pq)
    assert load_probe_data("clinc150", data=str(pq)).labels == dom.labels


def test_clinc150_from_hub_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "mirror" / "clinc" / "clinc_oos"
    _hub_parquet(repo / "plus" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: plus\n  data_files:\n  - split: train\n    path: plus/train-*\n---\n")
    monkeypatch.setenv("PERSONAFUSE_HUB_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    d = load_probe_data("clinc150")
    assert sorted(set(d.labels)) == ["banking", "oos", "travel", "utility"] and d.name == "clinc150"
    monkeypatch.delenv("PERSONAFUSE_HUB_MIRROR")
    with pytest.raises(DataError, match=r"clinc150 comes from the Hub \(clinc/clinc_oos\)"):
        load_probe_data("clinc150")


def test_clinc150_unknown_intent_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "hi", "intent": "greeting"}\n{"text": "yo", "intent": "not_an_intent"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: intent 'not_an_intent' is not a CLINC150 intent"):
        load_probe_data("clinc150", data=str(p))


def test_clinc150_probe_runs_with_minilm(tmp_path: Path) -> None:
    rep = run_probe("clinc150", ["minilm"], data_file=str(CLINC), out=str(tmp_path))
    r = rep["results"]["minilm"]
    assert r["n_classes"] == 4 and r["n_test"] == 5
    # the reported accuracy is the probe's on MiniLM's embeddings of the same texts and split
    from personafuse.evaluation.probing import make_encoder

    d = load_probe_data("clinc150", data=str(CLINC))
    assert r["accuracy"] == probe_accuracy(make_encoder("minilm")(d.texts), d.labels, seed=0)["accuracy"]
    assert (tmp_path / "probe_clinc150.md").is_file()


# ---- encoder names mean what training means by them ---------------------------------------------
def test_encoder_names_follow_embedded_resolve() -> None:
    from personafuse.embedded import SMOLLM2_GGUF
    from personafuse.evaluation.probing import encoder_source

    for name in ("default-encoder", "smollm2"):
        src, pooling = encoder_source(name)
        assert src.gguf_file == SMOLLM2_GGUF and pooling == "auto"
    src, _ = encoder_source("minilm")
    assert src.gguf_file is None and src.path.endswith("model")
    assert encoder_source("minilm@last")[1] == "last"
    with pytest.raises(ValueError, match="unknown encoder"):
        encoder_source("bert")


def test_default_encoder_embeds_with_smollm2() -> None:
    """default-encoder is SmolLM2 (hidden size 576, last-token pooling), minilm is MiniLM (384)."""
    from personafuse.evaluation.probing import make_encoder

    texts = ["I can't sleep before my exam", "Solve 3x + 7 = 31"]
    smol = make_encoder("default-encoder")(texts)
    mini = make_encoder("minilm")(texts)
    assert smol.shape == (2, 576) and mini.shape == (2, 384)


def test_probe_pf_checkpoint_reads_the_persona_encoder(tmp_path: Path) -> None:
    """``pf:DIR`` goes through the --model grammar's loader and embeds with the router's encoder on
    the router's input text (PersonaFuseModel.persona_embeddings), batch by batch."""
    from conftest import build_tiny
    from personafuse.evaluation.probing import make_encoder

    pf = build_tiny(tmp_path)
    pf.save_pretrained(tmp_path / "ckpt")
    texts = [f"i feel so {w} about my exam" for w in ("anxious", "happy", "tired")] * 30  # 90: two batches
    got = make_encoder(f"pf:{tmp_path / 'ckpt'}")(texts)
    with torch.no_grad():
        want = pf.persona_embeddings(texts).float().numpy()
    assert got.shape == want.shape == (90, pf.config.embed_dim)
    assert abs(got - want).max() < 1e-5
    with pytest.raises(FileNotFoundError):
        make_encoder(f"pf:{tmp_path / 'missing'}")
