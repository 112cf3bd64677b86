"""The resumable runner, the eval/report CLI and the subjects (an OpenAI-compatible endpoint on
loopback, a tiny Hugging Face model, and a duck-typed PersonaFuse model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from eval_support import FIXTURE_BENCHDATA, ChatServer, make_tiny_llama
from personafuse.evaluation.cli import register
from personafuse.evaluation.runner import EvalConfig, RunMismatch, Runner, read_records
from personafuse.evaluation.subjects import (
    HFSubject,
    OpenAISubject,
    PersonaFuseSubject,
    load_subject,
    parse_routing,
)
from personafuse.traits import TRAIT_POLES

torch.set_num_threads(1)  # the test machine is shared; one thread avoids oversubscription stalls


def _gsm_reply(messages: list[dict[str, str]], body: dict) -> str:
    user = messages[-1]["content"]
    if "rolls an hour" in user:
        return "12*5 = 60 and 60-7 = 53\n#### 53"
    if "helmet" in user:
        return "The total is $1,300.\n#### 1,300"  # strict GSM8K reads only "#### N"
    return "I think 5."


def _runner(srv: ChatServer, out: Path, benchmarks: list[str], limit: int | None = None, **kw) -> Runner:
    cfg = EvalConfig(model="openai:m", benchmarks=benchmarks, out=str(out), data=str(FIXTURE_BENCHDATA), limit=limit, **kw)
    return Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False)


def test_run_writes_results_and_item_lines(tmp_path: Path) -> None:
    with ChatServer(_gsm_reply) as srv:
        res = _runner(srv, tmp_path, ["gsm8k"]).run()
    block = res["benchmarks"]["gsm8k"]
    assert block["score"] == pytest.approx(2 / 3) and block["n_items"] == 3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["benchmarks"]["gsm8k"]["score"] == pytest.approx(2 / 3)
    assert saved["subject"]["kind"] == "openai" and "gsm8k" in saved["timings"]
    lines = [json.loads(x) for x in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert {"id", "response", "parsed", "score", "prompt"} <= set(lines[0])
    assert [r["parsed"] for r in lines] == ["53", "1,300", None]  # strict-match: "#### N" only
    assert [r["parsed_flexible"] for r in lines] == ["53", "1,300", "5."]  # flexible: the last number ("." kept)


def test_resume_generates_only_missing_items(tmp_path: Path) -> None:
    with ChatServer(_gsm_reply) as srv:
        _runner(srv, tmp_path, ["gsm8k"], limit=2).run()
        assert len(srv.requests) == 2
        _runner(srv, tmp_path, ["gsm8k"], limit=3).run()  # a larger limit adds one item
        assert len(srv.requests) == 3
        _runner(srv, tmp_path, ["gsm8k"], limit=3).run()  # nothing left: no request, no model load
        assert len(srv.requests) == 3
    assert len(read_records(tmp_path / "gsm8k.jsonl")) == 3


def test_rescore_reparses_stored_responses(tmp_path: Path) -> None:
    with ChatServer(_gsm_reply) as srv:
        _runner(srv, tmp_path, ["gsm8k"]).run()
        p = tmp_path / "gsm8k.jsonl"
        recs = [json.loads(x) for x in p.read_text().splitlines()]
        recs[2]["response"] = "#### -2"  # as if the stored reply had been parsed wrongly before
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        n0 = len(srv.requests)
        cfg = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path), data=str(FIXTURE_BENCHDATA))
        res = Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False, rescore=True).run()
        assert len(srv.requests) == n0  # nothing regenerated
    assert res["benchmarks"]["gsm8k"]["score"] == 1.0
    assert json.loads(p.read_text().splitlines()[2])["parsed"] == "-2"


def test_max_new_tokens_override_is_sent_and_recorded(tmp_path: Path) -> None:
    with ChatServer(_gsm_reply) as srv:
        res = _runner(srv, tmp_path, ["gsm8k"], limit=2, max_new_tokens=7).run()
        sent = {b.get("max_tokens", b.get("max_completion_tokens")) for b in srv.requests}
    assert sent == {7}  # the limit the replies were generated under ...
    assert res["benchmarks"]["gsm8k"]["protocol"]["max_new_tokens"] == 7  # ... is the one recorded
    assert json.loads((tmp_path / "results.json").read_text())["benchmarks"]["gsm8k"]["protocol"]["max_new_tokens"] == 7


def test_results_record_the_protocol_and_rescore_says_what_changed(tmp_path: Path) -> None:
    with ChatServer(_gsm_reply) as srv:
        res = _runner(srv, tmp_path, ["gsm8k"]).run()
        proto = res["benchmarks"]["gsm8k"]["protocol"]
        assert proto["reference"]["repo"] and proto["reference"]["commit"]
        assert proto["max_new_tokens"] > 0 and len(proto["prompt_hash"]) == 16
        # The same items give the same hash; a different subsample gives another one.
        other = _runner(srv, tmp_path / "b", ["gsm8k"], limit=2).run()["benchmarks"]["gsm8k"]["protocol"]
        assert other["prompt_hash"] != proto["prompt_hash"]
        p = tmp_path / "gsm8k.jsonl"
        recs = [json.loads(x) for x in p.read_text().splitlines()]
        recs[0]["response"] = "no number here"  # one stored reply now scores differently
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        cfg = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path), data=str(FIXTURE_BENCHDATA))
        again = Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False, rescore=True).run()
    rs = again["benchmarks"]["gsm8k"]["rescore"]
    assert rs["items"] == 3 and rs["items_changed"] == 1
    assert rs["old_score"] == res["benchmarks"]["gsm8k"]["score"]
    assert rs["new_score"] == pytest.approx(res["benchmarks"]["gsm8k"]["score"] - 1 / 3)


def test_rescore_refuses_replies_to_another_prompt(tmp_path: Path) -> None:
    with ChatServer(_gsm_reply) as srv:
        _runner(srv, tmp_path, ["gsm8k"]).run()
        p = tmp_path / "gsm8k.jsonl"
        recs = [json.loads(x) for x in p.read_text().splitlines()]
        recs[1]["prompt"] = "an older prompt wording"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        before = p.read_text()
        cfg = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path), data=str(FIXTURE_BENCHDATA))
        with pytest.raises(RunMismatch, match=rf"item '{recs[1]['id']}'.*different prompt"):
            Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False, rescore=True).run()
    assert p.read_text() == before  # nothing rewritten


def test_raw_completion_protocol_reaches_the_endpoint_as_a_completion(tmp_path: Path) -> None:
    """GSM8K's reference (lm-eval) sends a raw completion: the OpenAI subject must use the
    completions endpoint with the prompt text as is; -o gsm8k.chat_template=true sends a chat."""
    with ChatServer(_gsm_reply) as srv:
        raw = _runner(srv, tmp_path / "raw", ["gsm8k"], limit=1).run()
        assert "prompt" in srv.requests[-1] and "messages" not in srv.requests[-1]
        assert srv.requests[-1]["prompt"].startswith("Question: ") and srv.requests[-1]["prompt"].endswith("Answer:")
        chat = _runner(srv, tmp_path / "chat", ["gsm8k"], limit=1, options={"gsm8k": {"chat_template": "true"}}).run()
        # the same five shots and question: raw text, or turns (--fewshot_as_multiturn), issue 31
        assert srv.requests[-2]["prompt"].endswith("\n\n" + srv.requests[-1]["messages"][-1]["content"])
        assert len(srv.requests[-1]["messages"]) == 11
    assert raw["benchmarks"]["gsm8k"]["protocol"]["chat_template"] is False
    assert chat["benchmarks"]["gsm8k"]["protocol"]["chat_template"] is True


def test_resume_after_a_torn_last_line(tmp_path: Path) -> None:
    with ChatServer(_gsm_reply) as srv:
        _runner(srv, tmp_path, ["gsm8k"]).run()
        p = tmp_path / "gsm8k.jsonl"
        lines = p.read_text().splitlines()
        p.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # crash mid-write
        n0 = len(srv.requests)
        res = _runner(srv, tmp_path, ["gsm8k"]).run()
        assert len(srv.requests) == n0 + 1
        # the redone record starts a line of its own: a third run reads all three and asks nothing
        assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == [json.loads(x)["id"] for x in lines]
        _runner(srv, tmp_path, ["gsm8k"]).run()
        assert len(srv.requests) == n0 + 1
    assert res["benchmarks"]["gsm8k"]["n_items"] == 3


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    with ChatServer(_gsm_reply) as srv:
        _runner(srv, tmp_path, ["gsm8k"], limit=1).run()
        with pytest.raises(RunMismatch, match="different configuration"):
            _runner(srv, tmp_path, ["gsm8k"], limit=1, seed=5)


def test_eqbench_retry_rule_resamples_unparseable_answers(tmp_path: Path) -> None:
    calls: list[float] = []

    def reply(messages, body):
        calls.append(body["temperature"])
        if len(calls) <= 2:  # the greedy answer and the first retry are unparseable
            return "I cannot tell."
        if "Hurt" in messages[-1]["content"]:
            return "Hurt: 8\nAmused: 0\nIndifferent: 1\nSuspicious: 6"
        return "Guilty: 6\nProud: 1\nDefensive: 7\nRelieved: 0"

    with ChatServer(reply) as srv:
        res = _runner(srv, tmp_path, ["eqbench"], limit=1).run()
    # Greedy first, then sampling at 0.01 + 0.15 per further attempt (the official schedule).
    assert calls == [0.0, pytest.approx(0.16), pytest.approx(0.31)]
    rec = next(iter(read_records(tmp_path / "eqbench.jsonl").values()))
    assert rec["attempts"] == 3 and rec["score"] == pytest.approx(10.0)
    assert res["benchmarks"]["eqbench"]["score"] == pytest.approx(100.0)
    assert res["benchmarks"]["eqbench"]["percent_parseable"] == 100.0


def test_eqbench_revision_keeps_the_first_partial_result(tmp_path: Path) -> None:
    """-o eqbench.revise=true: when no attempt fully parses, the reference (process_question's
    prev_result) stores the FIRST partially parsed attempt; the runner kept the last reply, here an
    unparseable one, and lost the item."""
    calls: list[float] = []

    def reply(messages, body):
        calls.append(body["temperature"])
        if len(calls) > 1:
            return "I cannot tell."
        if "Hurt" in messages[-1]["content"]:
            first = "Hurt: 8\nAmused: 0\nIndifferent: 1\nSuspicious: 6"
        else:
            first = "Guilty: 6\nProud: 1\nDefensive: 7\nRelieved: 0"
        return f"First pass scores:\n{first}\n\nCritique: fine.\n\nRevised scores:\nnone"  # revised part unparseable

    with ChatServer(reply) as srv:
        res = _runner(srv, tmp_path, ["eqbench"], limit=1, options={"eqbench": {"revise": True}}).run()
    assert len(calls) == 3  # a partial result is still retried
    rec = next(iter(read_records(tmp_path / "eqbench.jsonl").values()))
    assert rec["attempts"] == 3 and rec["response"].startswith("First pass scores:")
    assert rec["success"] is False and rec["first_pass_v2"] == pytest.approx(10.0) and rec["revised_v2"] is None
    assert res["benchmarks"]["eqbench"]["score"] == pytest.approx(100.0)  # the first pass counts


def test_cli_eval_and_report(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    cli = CliRunner()
    with ChatServer(_gsm_reply) as srv:
        for name in ("base", "new"):
            args = ["eval", "--model", "openai:m", "--base-url", srv.base_url, "--api-key", "k", "--benchmarks", "gsm8k", "--data", str(FIXTURE_BENCHDATA), "--out", str(tmp_path / name), "--no-progress"]
            if name == "base":
                args += ["--limit", "1"]
            r = cli.invoke(app, args)
            assert r.exit_code == 0, r.output
    r = cli.invoke(app, ["report", str(tmp_path / "new"), "--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    # base: 1 item right (1.0); new: 2 of 3 right → -33.3 %.
    assert "GSM8K" in r.output and "(-33.3%)" in r.output
    csv_text = (tmp_path / "rep" / "report.csv").read_text()
    assert "new,gsm8k,score,0.666" in csv_text
    assert (tmp_path / "rep" / "relative_general_intelligence_and_safety.png").stat().st_size > 1000


def test_cli_summary_shows_stderr_and_variants_and_rescore_fits_a_line(tmp_path: Path) -> None:
    """The printed summary carries each score's standard error and the variants scored on the same
    replies (GSM8K: flexible and official beside strict); --rescore's line is short enough not to wrap."""
    app = typer.Typer()
    register(app)
    args = ["eval", "--model", "openai:m", "--benchmarks", "gsm8k", "--data", str(FIXTURE_BENCHDATA), "--out", str(tmp_path / "o"), "--no-progress"]
    with ChatServer(_gsm_reply) as srv:
        args += ["--base-url", srv.base_url, "--api-key", "k"]
        r = CliRunner().invoke(app, args, terminal_width=100)
        assert r.exit_code == 0, r.output
        block = json.loads((tmp_path / "o" / "results.json").read_text())["benchmarks"]["gsm8k"]
        assert f"{block['score']:.4f} ± {block['stderr']:.4f}" in r.output
        assert f"score_flexible={block['score_flexible']:.4f}" in r.output and "score_official=" in r.output
        r = CliRunner().invoke(app, [*args, "--rescore"], terminal_width=100)
    assert r.exit_code == 0, r.output
    assert f"rescored gsm8k: 0 of 3 items changed; score {block['score']:.6g} -> {block['score']:.6g}" in r.output


def test_bad_option_and_model_specs() -> None:
    with pytest.raises(ValueError, match="unknown --model"):
        load_subject("nonsense:thing")
    with pytest.raises(ValueError, match="bad routing spec"):
        parse_routing("random:x")
    assert parse_routing("random:2", seed=3) == {"mode": "random", "k": 2, "seed": 3}
    assert parse_routing("pole:A+") == {"mode": "pole", "pole": "high_A"}
    fixed = parse_routing("fixed:high_A=3,low_N=1")
    assert fixed["mode"] == "fixed" and fixed["weights"][6] == 0.75 and fixed["weights"][9] == 0.25


def test_hf_subject_on_a_tiny_model(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "tiny")
    subj = load_subject(f"hf:{path}")
    assert isinstance(subj, HFSubject)
    gens = subj.generate(["Hi", [{"role": "user", "content": "A longer question here?"}], "x"], max_new_tokens=4)
    # Each prompt alone: a batched call that forgot to undo its length sort would differ here.
    alone = [subj.generate([p], max_new_tokens=4)[0] for p in ["Hi", [{"role": "user", "content": "A longer question here?"}], "x"]]
    assert [g.text for g in gens] == [g.text for g in alone] and len({g.text for g in alone}) == 3
    assert all(g.weights is None for g in gens)


class _FakeRouting:
    """Stands in for personafuse.Routing until the model lands (it only records its arguments)."""

    def __init__(self, **kw):
        self.kw = kw


class _DuckPersonaFuse:
    """The documented PersonaFuse surface, just enough to exercise the wrapper's duck typing."""

    def __init__(self):
        self.seen = []

    def generate(self, prompts, routing=None, *, max_new_tokens=128, do_sample=False, batch_size=8):
        self.seen.append((routing.kw, batch_size, len(prompts)))
        w = torch.zeros(10)
        w[6] = 1.0
        return [type("G", (), {"text": f" reply {i} ", "weights": w})() for i, _ in enumerate(prompts)]

    def route(self, queries):
        return torch.full((len(queries), 10), 0.1)


def test_personafuse_subject_records_weights(tmp_path: Path) -> None:
    model = _DuckPersonaFuse()
    subj = PersonaFuseSubject(model, parse_routing("random:2", seed=1), routing_factory=_FakeRouting, batch_size=2)
    gens = subj.generate(["a", "b", "c"], max_new_tokens=3)
    assert [g.text for g in gens] == ["reply 0", "reply 1", "reply 2"]
    assert gens[0].weights == {p: (1.0 if p == "high_A" else 0.0) for p in TRAIT_POLES}
    assert model.seen == [({"mode": "random", "k": 2, "seed": 1}, 2, 3)]  # one call, model batches
    assert subj.route(["q"])[0]["low_N"] == pytest.approx(0.1)
    assert subj.describe()["routing"]["mode"] == "random"


def test_personafuse_subject_sends_the_system_prompt() -> None:
    """--system-prompt reached hf/openai subjects only: `--model default` (a PersonaFuse model) ran
    without it and recorded it in its config as if it had been used."""
    from personafuse.chat import RawPrompt

    sent = []

    class _Model(_DuckPersonaFuse):
        def generate(self, prompts, routing=None, **kw):
            sent.extend(prompts)
            return super().generate(prompts, routing, **{k: v for k, v in kw.items() if k in ("max_new_tokens", "batch_size")})

    subj = PersonaFuseSubject(_Model(), parse_routing("router"), routing_factory=_FakeRouting, system_prompt="Be kind.")
    subj.generate(["q", [{"role": "user", "content": "u"}], RawPrompt("Question: 1+1\nAnswer:")], max_new_tokens=3)
    assert sent[0] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"}]
    assert sent[1] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "u"}]
    assert sent[2] == "Question: 1+1\nAnswer:" and isinstance(sent[2], RawPrompt)  # raw completions stay raw



def test_load_subject_hands_the_system_prompt_to_personafuse(monkeypatch: pytest.MonkeyPatch) -> None:
    import personafuse.evaluation.subjects as subjects
    from personafuse.evaluation.subjects import SubjectOptions

    monkeypatch.setattr(subjects, "load_personafuse", lambda spec, **placement: _DuckPersonaFuse())
    subj = load_subject("default", SubjectOptions(system_prompt="Be kind."))
    assert isinstance(subj, PersonaFuseSubject) and subj.system_prompt == "Be kind."


def test_cli_reports_bad_data_cleanly(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    d = tmp_path / "data" / "gsm8k"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text('{"question": "q"}\n')
    r = CliRunner().invoke(app, ["eval", "--model", "openai:m", "--benchmarks", "gsm8k", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 2
    assert "test.jsonl:1: missing field 'answer'" in r.output
    r = CliRunner().invoke(app, ["eval", "--model", "openai:m", "--benchmarks", "nope", "--out", str(tmp_path / "o2"), "--no-progress"])
    assert r.exit_code == 2 and "unknown benchmark 'nope'" in r.output


def test_lora_subject_loads_adapter_on_its_base(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = make_tiny_llama(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)  # a fixed random (non-zero) adapter
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)
    subj = load_subject(f"lora:{tmp_path / 'adapter'}")
    plain = load_subject(f"hf:{base_dir}")
    prompts = ["Hello there", "What is two plus two?"]
    with_adapter = subj.generate(prompts, max_new_tokens=6)
    without = plain.generate(prompts, max_new_tokens=6)
    assert subj.describe()["base"] == str(base_dir)
    assert [g.text for g in with_adapter] != [g.text for g in without]  # the adapter is live
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_subject(f"lora:{tmp_path / 'base'}")
