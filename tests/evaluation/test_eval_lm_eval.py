"""The registered lm-eval ``personafuse`` model runs small local lm-eval tasks end to end on a tiny
model: loglikelihood (multiple choice), loglikelihood_rolling (perplexity) and generate_until.

On a tiny PersonaFuse model with non-zero random experts it also matches lm-eval's own ``HFLM`` on
the ``export_lora`` of the same mixture (log-likelihoods to 1e-4, greedy generations exactly), and
each request is routed on its context alone, as the query ``PersonaFuseModel.route`` gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval_support import make_tiny_llama
from personafuse.moe.routing import Routing

lm_eval = pytest.importorskip("lm_eval")
torch.set_num_threads(1)

TASKS = """
task: pf_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""", """
task: pf_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
""", """
task: pf_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
"""


def _write_tasks(d: Path) -> None:
    data = d / "tiny.jsonl"
    rows = [{"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 7)], "label": 0} for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for i, t in enumerate(TASKS):
        (d / f"task{i}.yaml").write_text(t.format(data=data))


def test_personafuse_model_runs_lm_eval_tasks(tmp_path: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import personafuse.evaluation.lm_eval_model  # noqa: F401  (registers "personafuse")

    model_dir = make_tiny_llama(tmp_path / "tiny")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    out = simple_evaluate(
        model="personafuse",
        model_args=f"model=hf:{model_dir},device=cpu,batch_size=2",
        tasks=["pf_tiny_mc", "pf_tiny_gen", "pf_tiny_ppl"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    res = out["results"]
    # A plain model under our class scores as lm-eval's own HFLM scores it, metric for metric.
    ref = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},device=cpu,batch_size=2,dtype=float32",
        tasks=["pf_tiny_mc", "pf_tiny_gen", "pf_tiny_ppl"],
        task_manager=TaskManager(include_path=str(tasks)),
    )["results"]
    for task, metric in (("pf_tiny_mc", "acc,none"), ("pf_tiny_gen", "exact_match,none"), ("pf_tiny_ppl", "word_perplexity,none")):
        assert res[task][metric] == pytest.approx(ref[task][metric], rel=1e-6), (task, metric)
    assert res["pf_tiny_ppl"]["word_perplexity,none"] > 1.0  # a random model is very perplexed
    assert len(out["samples"]["pf_tiny_mc"]) == 4


def test_resolve_weights_goes_through_routing() -> None:
    """resolve_weights is Routing.parse + Routing.resolve with the queries' router texts as keys:
    every mode as the Routing class defines it, a seeded Random Route draws per query (the same
    experts for a query in any batch), and the old JSON form still reads."""
    from personafuse.evaluation.lm_eval_model import resolve_weights
    from personafuse.moe.routing import Routing

    row = [0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03]
    calls: list[list] = []

    def router(texts):
        calls.append(list(texts))
        return torch.tensor([row] * len(texts))

    top = resolve_weights(Routing.parse("top_k:2"), ["q", "r"], router)
    assert top.shape == (2, 10) and torch.allclose(top[0, :2], torch.tensor([0.6, 0.4]))
    rnd = resolve_weights("random:5", ["q", "r", "s"], router)
    assert ((rnd > 0).sum(-1) == 5).all() and torch.allclose(rnd.sum(-1), torch.ones(3))
    # keyed by query: "r" draws the same experts alone, second in a batch, or after other calls
    alone = resolve_weights("random:5", ["r"], router)
    assert torch.equal(alone[0], rnd[1]) and torch.equal(resolve_weights("random:5", ["x", "r"], router)[1], rnd[1])
    pole = resolve_weights({"mode": "pole", "pole": "low_N"}, ["q"], router)
    assert pole[0, 9] == 1 and pole.sum() == 1
    blend = resolve_weights("blend:0.25:high_O=1", ["q"], router)
    assert torch.allclose(blend[0], 0.75 * torch.tensor(row) + 0.25 * torch.eye(10)[0])
    calls.clear()
    resolve_weights("pole:high_A", ["q"], router)
    resolve_weights("fixed:high_A=1", ["q"], router)
    assert calls == []  # modes that do not read the router never call it
    # chat queries: the router reads the conversation (the user turn), the key is its router text
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "r"}]
    assert torch.equal(resolve_weights("random:5", [chat], router)[0], rnd[1])
    many = resolve_weights("router", [f"q{i}" for i in range(150)], router)
    assert many.shape == (150, 10)  # the router chunks its own calls (test_router: route in chunks)
    with pytest.raises(ValueError, match="needs a router"):
        resolve_weights("router", ["q"], None)


# ---------------------------------------------------------------------------------------------
# Parity with lm-eval's own HFLM on the exported LoRA of the same mixture. The reference for
# "same log-likelihoods" is EleutherAI/lm-evaluation-harness@3e093bc90a87 (identical to the
# installed 0.4.13) lm_eval/models/huggingface.py: HFLM(pretrained=BASE, peft=ADAPTER) run on
# PersonaFuseModel.export_lora(w) of the experts, which holds the fixed mixture w exactly.

CONTEXTS = ["i feel so sad about my exam", "please help me with this math problem", "write a poem"]
CONTINUATIONS = [" i am so worried", " what is the idea", " thanks", " how do you solve this equation"]


@pytest.fixture(scope="module")
def tiny_pf(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from conftest import build_tiny

    d = tmp_path_factory.mktemp("pf_lm_eval")
    pf = build_tiny(d)  # experts' A and B random, non-zero (conftest.randomise_experts)
    assert all(layer.lora_B.abs().min() > 0 for layer in pf.mixture_layers.values())
    return pf, d / "base"


def _ll_requests(pairs: list[tuple[str, str]]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def _reference_lm(pf, base: Path, weights: torch.Tensor, d: Path):
    """lm-eval's own HFLM over the base with the exported LoRA of ``weights`` (one mixture) loaded
    by peft. Loaded here, not with HFLM's ``peft=``: that path first resizes the embeddings to
    len(tokenizer) (95 here, the tiny config has 160 rows), which would change the softmax."""
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = pf.export_lora(weights, d)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)).eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(base), device="cpu", batch_size=8)


def _ours(pf, routing: str, batch_size: int = 8):
    from personafuse.evaluation.lm_eval_model import PersonaFuseLM

    return PersonaFuseLM(model=pf, routing=routing, device="cpu", batch_size=batch_size)


def _assert_same_ll(ours: list, ref: list, what: str) -> None:
    assert len(ours) == len(ref)
    for i, ((a, ga), (b, gb)) in enumerate(zip(ours, ref, strict=True)):
        assert a == pytest.approx(b, abs=1e-4), f"{what} request {i}: {a} vs lm-eval's {b}"
        assert ga == gb, f"{what} request {i}: is_greedy {ga} vs lm-eval's {gb}"


def test_fixed_mixture_loglikelihoods_equal_lm_eval_hflm_on_the_export(tiny_pf: tuple, tmp_path: Path) -> None:
    """Log-likelihoods (and rolling ones) at fixed weights through our adapter equal HFLM's on the
    exported peft LoRA of the same weights, and the experts do change them (not the base alone)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    pf, base = tiny_pf
    w = torch.softmax(torch.randn(10, generator=torch.Generator().manual_seed(5)) * 2, dim=-1)
    spec = "fixed:" + ",".join(f"{x:.6f}" for x in w.tolist())
    ours = _ours(pf, spec, batch_size=3)
    w = torch.tensor(Routing.parse(spec).weights)  # the normalised row Routing makes of it
    ref = _reference_lm(pf, base, w, tmp_path / "lora")
    pairs = [(c, x) for c in CONTEXTS for x in CONTINUATIONS]
    got = ours.loglikelihood(_ll_requests(pairs))
    _assert_same_ll(got, ref.loglikelihood(_ll_requests(pairs)), "fixed")
    plain = HFLM(pretrained=str(base), tokenizer=str(base), device="cpu", batch_size=8, dtype="float32")
    base_ll = plain.loglikelihood(_ll_requests(pairs))
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, base_ll, strict=True)) > 1e-2  # experts matter
    docs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(c + x,), idx=0) for c, x in pairs[:5]]
    for a, b in zip(ours.loglikelihood_rolling(docs), ref.loglikelihood_rolling(docs), strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_one_context_one_mixture_across_its_continuations(tiny_pf: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the router, every continuation of a context is scored under the router's weights for
    that context alone (not context plus continuation): each batch row's weights are its
    context's, in batches mixing contexts, and each context's log-likelihoods equal HFLM's on the
    exported LoRA of its own mixture."""
    from lm_eval.models.huggingface import HFLM

    pf, base = tiny_pf
    ours = _ours(pf, "router", batch_size=5)  # batches that mix contexts
    seen: list[tuple[list[int], list[float]]] = []
    real_call = HFLM._model_call

    def spy(self, inps, attn_mask=None, labels=None):
        out = real_call(self, inps, attn_mask, labels)
        if self is ours:
            seen.extend(zip(inps.tolist(), ours.last_weights.tolist(), strict=True))
        return out

    monkeypatch.setattr(HFLM, "_model_call", spy)
    pairs = [(c, x) for c in CONTEXTS for x in CONTINUATIONS]
    got = ours.loglikelihood(_ll_requests(pairs))
    routed = {c: pf.route([c])[0] for c in CONTEXTS}
    assert not torch.allclose(routed[CONTEXTS[0]], routed[CONTEXTS[1]], atol=1e-4)  # the router tells them apart
    tok = ours.tokenizer
    assert len(seen) == len(pairs)  # multi-token continuations: one row each
    for ids, w in seen:
        ctx = next(c for c in CONTEXTS if ids[: len(tok.encode(c))] == tok.encode(c))
        assert torch.allclose(torch.tensor(w), routed[ctx], atol=1e-6), f"a row of {ctx!r} ran under another mixture"
    for j, c in enumerate(CONTEXTS):
        ref = _reference_lm(pf, base, routed[c], tmp_path / f"lora{j}")
        mine = [r for (cc, _), r in zip(pairs, got, strict=True) if cc == c]
        _assert_same_ll(mine, ref.loglikelihood(_ll_requests([(c, x) for x in CONTINUATIONS])), c)


def test_coinciding_inputs_of_different_contexts_keep_their_own_mixtures(tiny_pf: tuple, tmp_path: Path) -> None:
    """("i feel", " so sad about") and ("i feel so", " sad about") feed the model the same tokens,
    but under two contexts' mixtures: each is still scored under its own (separate passes)."""
    pf, base = tiny_pf
    pairs = [("i feel", " so sad about"), ("i feel so", " sad about")]
    got = _ours(pf, "router").loglikelihood(_ll_requests(pairs))
    for i, (c, x) in enumerate(pairs):
        ref = _reference_lm(pf, base, pf.route([c])[0], tmp_path / f"lora{i}")
        _assert_same_ll([got[i]], ref.loglikelihood(_ll_requests([(c, x)])), c)


def test_chat_templated_context_routes_on_the_user_message(tiny_pf: tuple, tmp_path: Path) -> None:
    """With --apply_chat_template the request's context is a rendered chat: the router reads what
    PersonaFuseModel.route reads for that conversation (router_text: the user's message, no system
    prompt, no template text, no assistant prefill), and the scores match HFLM's on the export."""
    from personafuse.moe.model import router_text

    pf, base = tiny_pf
    ours = _ours(pf, "router")
    user = "i feel so sad about my exam"
    chat = [{"role": "system", "content": "you are a kind friend"}, {"role": "user", "content": user}]
    ctx = ours.apply_chat_template(chat)
    prefilled = ours.apply_chat_template([*chat, {"role": "assistant", "content": "i am"}], add_generation_prompt=False)
    pairs = [(ctx, x) for x in CONTINUATIONS] + [(prefilled, x) for x in CONTINUATIONS]
    got = ours.loglikelihood(_ll_requests(pairs))
    assert torch.allclose(ours.last_weights, pf.route([user]).expand(len(ours.last_weights), -1), atol=1e-6)
    assert not torch.allclose(pf.route([user]), pf.route([ctx]), atol=1e-4)  # the template text would route elsewhere
    ref = _reference_lm(pf, base, pf.route([user])[0], tmp_path / "lora")
    _assert_same_ll(got, ref.loglikelihood(_ll_requests(pairs)), "chat")
    assert "<|user|>" in ctx and ours.query(ctx) == chat and router_text(ours.query(ctx)) == user
    assert ours.query(prefilled) == chat  # a task's gen_prefix is the answer's start, not the query
    assert ours.query("plain text") == "plain text"  # a raw context is the user's message itself


def test_generation_uses_each_contexts_mixture_and_matches_lm_eval(tiny_pf: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    pf, base = tiny_pf
    gen = {"until": ["<|end|>"], "max_gen_toks": 6, "do_sample": False}
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(c, dict(gen)), idx=0) for c in CONTEXTS]
    ours = _ours(pf, "router", batch_size=3)
    used: list[torch.Tensor] = []
    real_gen = HFLM._model_generate

    def spy(self, context, max_length, stop, **kw):
        out = real_gen(self, context, max_length, stop, **kw)
        if self is ours:
            used.append(ours.last_weights.clone())
        return out

    monkeypatch.setattr(HFLM, "_model_generate", spy)
    ours.generate_until(reqs)
    assert len(used) == 1 and used[0].shape == (3, 10)
    expected = pf.route(CONTEXTS)
    # lm-eval batches the longest context first; each row carries its own context's weights
    order = sorted(range(3), key=lambda i: -len(ours.tok_encode(CONTEXTS[i])))
    assert torch.allclose(used[0], expected[order], atol=1e-6)
    w = pf.route(["write a poem"])[0]
    spec = "fixed:" + ",".join(f"{x:.8f}" for x in w.tolist())
    fixed = _ours(pf, spec, batch_size=3)
    ref = _reference_lm(pf, base, torch.tensor(Routing.parse(spec).weights), tmp_path / "lora")
    assert fixed.generate_until(reqs) == ref.generate_until(reqs)


def test_direct_model_call_needs_a_request_for_text_routing(tiny_pf: tuple) -> None:
    from personafuse.traits import POLE_INDEX

    pf, _ = tiny_pf
    ids = torch.tensor([[7, 8, 9]])
    with pytest.raises(ValueError, match="outside an lm-eval request: routing mode 'router'"):
        _ours(pf, "router")._model_call(ids)
    lm = _ours(pf, "pole:high_C")
    lm._model_call(ids)
    assert lm.last_weights[0, POLE_INDEX["high_C"]] == 1 and lm.last_weights.sum() == 1
    with pytest.raises(ValueError, match="model_args routing='top_k:0'"):
        _ours(pf, "top_k:0")


def test_simple_evaluate_with_chat_template_routes_user_messages(tiny_pf: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through lm-eval's own evaluator (requests built by its tasks, chat template applied by its
    evaluator), the router is asked about the documents' questions only."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    pf, _ = tiny_pf
    asked: list = []
    real_route = pf.route
    monkeypatch.setattr(pf, "route", lambda qs, tau=None: (asked.extend(qs), real_route(qs, tau))[1])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    out = simple_evaluate(model=_ours(pf, "router", batch_size=4), tasks=["pf_tiny_mc", "pf_tiny_gen"],
                          task_manager=TaskManager(include_path=str(tasks)), apply_chat_template=True, log_samples=True)  # fmt: skip
    questions = {f"What is {i} plus one?" for i in range(4)}
    from personafuse.moe.model import router_text

    assert {router_text(q) for q in asked} == questions | {f"Q: {q}\nA:" for q in questions}
    # the reported accuracy is that of the log-likelihoods our adapter returned for the 4 documents
    samples = out["samples"]["pf_tiny_mc"]
    right = [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in samples]
    assert len(samples) == 4 and out["results"]["pf_tiny_mc"]["acc,none"] == pytest.approx(sum(right) / 4)


@pytest.mark.parametrize("entry", ["lm_eval", "module"])
def test_documented_command_line(tmp_path: Path, entry: str) -> None:
    """lm-eval's own ``lm_eval`` script finds ``--model personafuse`` (through the start-up hook the
    package installs), and ``python -m personafuse.evaluation.lm_eval_model`` (what
    ``personafuse lm-eval`` runs) hands the same arguments to lm-eval's CLI."""
    import os
    import subprocess
    import sys

    model_dir = make_tiny_llama(tmp_path / "tiny")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [*([str(Path(sys.executable).parent / "lm_eval")] if entry == "lm_eval" else [sys.executable, "-m", "personafuse.evaluation.lm_eval_model"]),
         "--model", "personafuse", "--model_args", f"model=hf:{model_dir}",
         "--tasks", "pf_tiny_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2", "--apply_chat_template", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pf_tiny_mc" in out.stdout and "acc" in out.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_lm_eval_gsm8k_and_personafuse_eval_agree_item_by_item(tmp_path: Path) -> None:
    """``personafuse lm-eval`` running lm-eval's own ``gsm8k`` (its installed yaml included
    unchanged, only the data read from the fixture's test/train files) and our shipped
    ``gsm8k_local``, with ``--apply_chat_template --fewshot_as_multiturn``, against ``personafuse
    eval --benchmarks gsm8k -o gsm8k.chat_template=true`` on the same tiny model and items: the same
    rendered 5-shot context, the same greedy reply and the same strict/flexible score per document."""
    import os
    import shutil
    import subprocess
    import sys

    from eval_support import FIXTURE_BENCHDATA
    from personafuse.evaluation.lm_eval_tasks import TASKS_DIR
    from personafuse.evaluation.runner import EvalConfig, Runner, read_records
    from personafuse.evaluation.subjects import SubjectOptions, load_subject

    model_dir = make_tiny_llama(tmp_path / "tiny")
    folder = FIXTURE_BENCHDATA / "gsm8k"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gsm8k_parity.yaml").write_text(json.dumps({
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"), "task": "gsm8k_parity",
        "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}}}))  # fmt: skip
    for f in ("gsm8k_local.yaml", "gsm8k_local.py"):  # one --include_path holds both tasks
        shutil.copy(TASKS_DIR / f, tasks / f)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "personafuse.evaluation.lm_eval_model", "--model", "personafuse", "--model_args", f"model=hf:{model_dir}",
         "--tasks", "gsm8k_parity,gsm8k_local", "--include_path", str(tasks), "--metadata", json.dumps({"data_file": str(folder / "test.jsonl")}),
         "--device", "cpu", "--batch_size", "1", "--apply_chat_template", "--fewshot_as_multiturn", "--gen_kwargs", "max_gen_toks=8",
         "--log_samples", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert res["configs"]["gsm8k_parity"]["num_fewshot"] == res["configs"]["gsm8k_local"]["num_fewshot"] == 5

    def samples(task: str, filt: str = "strict-match") -> dict[str, dict]:
        rows = [json.loads(x) for x in next((tmp_path / "out").rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        return {s["doc"]["question"]: s for s in rows if s["filter"] == filt}

    theirs, local, flex = samples("gsm8k_parity"), samples("gsm8k_local"), samples("gsm8k_parity", "flexible-extract")
    subject = load_subject(f"hf:{model_dir}", SubjectOptions(batch_size=1))
    cfg = EvalConfig(model=f"hf:{model_dir}", benchmarks=["gsm8k"], out=str(tmp_path / "ours"), data=str(FIXTURE_BENCHDATA),
                     max_new_tokens=8, options={"gsm8k": {"chat_template": "true"}})  # fmt: skip
    block = Runner(cfg, lambda: subject, progress=False).run()["benchmarks"]["gsm8k"]
    assert block["protocol"]["num_fewshot"] == 5 and block["n"] == len(theirs) == len(local) == 3
    for rec in read_records(tmp_path / "ours" / "gsm8k.jsonl").values():
        q = rec["prompt"][-1]["content"].removeprefix("Question: ").removesuffix("\nAnswer:")
        s = theirs[q]
        ctx = s["arguments"]["gen_args_0"]["arg_0"]
        assert subject.tokenizer.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True) == ctx, q
        assert local[q]["arguments"]["gen_args_0"]["arg_0"] == ctx  # the shipped task draws the same shots
        assert rec["response"].strip() == s["resps"][0][0].strip(), q
        assert (rec["score"], rec["score_flexible"]) == (s["exact_match"], flex[q]["exact_match"]), q
    r = res["results"]["gsm8k_parity"]
    assert block["score"] == pytest.approx(r["exact_match,strict-match"]) and block["score_flexible"] == pytest.approx(r["exact_match,flexible-extract"])


def test_gsm8k_local_without_data_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from personafuse.evaluation.data import DataError
    from personafuse.evaluation.lm_eval_tasks import gsm8k_local

    monkeypatch.setattr("personafuse.evaluation.data.find_benchdata", lambda explicit=None: None)
    with pytest.raises(DataError, match="gsm8k_local: no data file"):
        gsm8k_local.load()
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl not found: the task's 5 shots come from the train split"):
        gsm8k_local.load(data_file=str(bad), version=3.0)
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:1: missing field 'answer'"):
        gsm8k_local.load(data_file=str(bad), version=3.0)


def test_eq_bench_local_sends_lm_evals_prompt_with_80_tokens(tmp_path: Path) -> None:
    """Through lm-eval's own evaluator, each ``eq_bench_local`` request is what lm-eval's
    ``eq_bench`` sends (lm_eval/tasks/eq_bench/default.yaml: ``doc_to_text: prompt`` over the Hub
    copy, whose prompts carry no revision part, and its ``generation_kwargs``, read here from the
    installed yaml): the official file's prompt cut by remove_revision_instructions, 80 tokens."""
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from eval_support import FIXTURE_BENCHDATA
    from personafuse.evaluation.benchmarks.eqbench import remove_revision_instructions
    from personafuse.evaluation.lm_eval_tasks import TASKS_DIR

    model_dir = make_tiny_llama(tmp_path / "tiny")
    data = FIXTURE_BENCHDATA / "eq-bench" / "eq_bench_fixture_questions.json"
    questions = list(json.loads(data.read_text()).values())
    theirs = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "eq_bench" / "default.yaml").read_text().replace("!function", ""))
    out = simple_evaluate(model="personafuse", model_args=f"model=hf:{model_dir},device=cpu,batch_size=2", tasks=["eq_bench_local"],
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"eq_bench_file": str(data)}), log_samples=True, limit=1)  # fmt: skip
    samples = out["samples"]["eq_bench_local"]
    assert len(samples) == 1 and len(questions) == 2
    for s, q in zip(samples, questions, strict=False):
        (ctx, gen), = s["arguments"]
        assert "Critique: <your critique here>" in q["prompt"] and ctx == remove_revision_instructions(q["prompt"])
        assert {k: gen[k] for k in theirs["generation_kwargs"]} == theirs["generation_kwargs"] and gen["max_gen_toks"] == 80
    assert out["configs"]["eq_bench_local"]["metadata"]["version"] == theirs["metadata"]["version"]


def test_eq_bench_local_prompts_are_the_cut_rule_for_all_171_v2_items() -> None:
    from eval_support import real_benchdata
    from personafuse.evaluation.benchmarks.eqbench import remove_revision_instructions
    from personafuse.evaluation.lm_eval_tasks import eq_bench_local

    real = real_benchdata()
    if real is None or not (real / "eq-bench" / "eq_bench_v2_questions_171.json").is_file():
        pytest.skip("../shared/benchdata not present")
    path = real / "eq-bench" / "eq_bench_v2_questions_171.json"
    docs = eq_bench_local.load(eq_bench_file=str(path))["validation"]
    raw = list(json.loads(path.read_text()).values())
    assert len(docs) == len(raw) == 171
    cut = [remove_revision_instructions(q["prompt"]) for q in raw]
    assert list(docs["prompt"]) == cut and not any("Revised scores" in p for p in cut)
    # the same text personafuse eval sends a remote subject (no system turn)
    ours = get_benchmark_prompts(path)
    assert ours == cut


def get_benchmark_prompts(path: Path) -> list:
    from personafuse.evaluation.benchmarks import get_benchmark

    return [it.prompt for it in get_benchmark("eqbench", {"system": "none"}).load(path)]


def test_eq_bench_local_docs_score_100_with_the_reference_answer() -> None:
    import ast

    from eval_support import FIXTURE_BENCHDATA
    from personafuse.evaluation.lm_eval_tasks import eq_bench_local

    data = sorted((FIXTURE_BENCHDATA / "eq-bench").glob("*.json"))[0]
    docs = eq_bench_local.load(eq_bench_file=str(data))["validation"]
    ref = ast.literal_eval(docs[0]["reference_answer_fullscale"])
    answer = "\n".join(f"{ref[f'emotion{i}']}: {ref[f'emotion{i}_score']}" for i in range(1, 5))
    assert eq_bench_local.calculate_score_fullscale(docs[0], [answer]) == {"eqbench": 100.0, "percent_parseable": 100}
    with pytest.raises(Exception, match="no_such.json"):
        eq_bench_local.load(eq_bench_file="/nonexistent/no_such.json")


def test_device_model_argument_places_the_model(tmp_path: Path) -> None:
    """HFLM leaves a model it is handed where it is; the adapter puts it on ``device`` first
    (before, ``--device cuda`` ran a PersonaFuse checkpoint on the CPU)."""
    from conftest import build_tiny

    pf = build_tiny()
    from personafuse.evaluation.lm_eval_model import PersonaFuseLM

    lm = PersonaFuseLM(model=pf, routing="router", device="meta", batch_size=1)
    assert lm.device.type == "meta" and pf.device.type == "meta"
    assert next(pf.base_model.parameters()).device.type == "meta"
    with pytest.raises(TypeError, match="PersonaFuseModel"):
        PersonaFuseLM(model=object())
