"""Shop-MMLU parity: prompt, item similarity, clamping and aggregation against the reference.

Reference: KL4805/ShoppingMMLU@7b118da15635e0d61c45fe1713420a344ac5b738 (licence: the repository's
LICENSE). The ``ref_*`` functions are faithful transcriptions (pandas, printing and file output
removed) of

* ``skill_wise_eval/metrics.py:sent_transformer`` (cosine to the reference, or the mean cosine over a
  list of references, clamped at 0),
* ``skill_wise_eval/skill_evaluation.py`` (the per-task ``np.mean`` of the sample scores, then
  ``track_wise_score = np.mean`` over the tasks),
* ``task_wise_eval/hf_generation.py``'s unclamped ``current_score``,
* ``skill_wise_eval/hf_skill_inference.py``'s prompt (``system_prompt + input_field``).

FIXTURE: 22 canned replies over three generation tasks in the official file format, embedded by a
deterministic stand-in whose vectors make every cosine a known number; the ``expected`` column (and
the aggregate below it) was derived by hand by following ``sent_transformer`` and
``skill_evaluation.py`` step by step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from eval_support import FIXTURE_BENCHDATA
from personafuse.evaluation.benchmarks import ScoreContext, get_benchmark
from personafuse.evaluation.benchmarks.shopmmlu import read_system_prompt
from personafuse.evaluation.data import DataError

S2 = math.sqrt(2) / 2  # cos 45°
S3 = math.sqrt(3) / 2  # cos 30°


# ---- transcriptions of the reference --------------------------------------------------------------
def ref_sent_transformer(generation: str, truth: str | list[str], model: Any) -> float:
    """metrics.py:sent_transformer."""
    generation_embedding = model.encode([generation])[0]
    if isinstance(truth, str):
        truth_embedding = model.encode([truth])[0]
        score = (generation_embedding * truth_embedding).sum()
        score /= np.linalg.norm(generation_embedding, ord=2) * np.linalg.norm(truth_embedding, ord=2)
        if score > 0:
            return float(score)
        else:
            return 0
    else:
        scores = []
        for label_item in truth:
            truth_embedding = model.encode([label_item])[0]
            score_ = (generation_embedding * truth_embedding).sum()
            score_ /= np.linalg.norm(generation_embedding, ord=2) * np.linalg.norm(truth_embedding, ord=2)
            scores.append(score_)
        if np.mean(scores) > 0:
            return float(np.mean(scores))
        else:
            return 0


def ref_task_wise(generation: str, label: str | list[str], model: Any) -> float:
    """hf_generation.py's current_score for the sent-transformer metric (no clamping)."""
    generation_embedding = model.encode([generation])[0]
    labels = [label] if isinstance(label, str) else label
    scores = []
    for label_item in labels:
        truth_embedding = model.encode([label_item])[0]
        s = (generation_embedding * truth_embedding).sum()
        s /= np.linalg.norm(generation_embedding, ord=2) * np.linalg.norm(truth_embedding, ord=2)
        scores.append(s)
    return float(np.mean(scores))


def ref_skill_evaluation(rows: list[tuple[str, Any, str]], model: Any) -> tuple[dict[str, float], float]:
    """skill_evaluation.py for sent-transformer rows ``(task_name, output_field, model_output)``."""
    per_task: dict[str, dict[str, Any]] = {}
    for task_name, truth, generation in rows:
        per_task.setdefault(task_name, {"metric": "sent-transformer", "sample_score": []})
        per_task[task_name]["sample_score"].append(ref_sent_transformer(generation, truth, model))
    overall = {k: float(np.mean(v["sample_score"])) for k, v in per_task.items()}
    return overall, float(np.mean(list(overall.values())))


# ---- a deterministic embedder -----------------------------------------------------------------------
VECTORS = {
    "R1": (1, 0, 0), "R2": (0, 1, 0), "R3": (0, 0, 1), "R4": (2, 0, 0),
    "same": (1, 0, 0), "opp": (-1, 0, 0), "diag": (1, 1, 0), "sixty": (1, math.sqrt(3), 0),
    "neg_diag": (-1, -1, 0), "z": (0, 0, 3), "": (0, 1, 1), "mix": (1, 0, -1),
}  # fmt: skip


class StandIn:
    """encode() like SentenceEmbedder (torch, L2-normalised rows)."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        v = torch.tensor([VECTORS[t] for t in texts], dtype=torch.float64)
        return torch.nn.functional.normalize(v, dim=-1)


class RefModel:
    """encode() like SentenceTransformer (numpy, unnormalised: the reference divides by the norms)."""

    def __init__(self, vectors: Any = None) -> None:
        self.vectors = vectors

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.vectors is not None:
            return self.vectors.encode(texts).numpy()
        return np.array([VECTORS[t] for t in texts], dtype=np.float64)


# (task, target, reply, expected clamped score, expected unclamped cosine), by hand from VECTORS
FIXTURE: list[tuple[str, Any, str, float, float]] = [
    ("review_answer", "R1", "same", 1.0, 1.0),
    ("review_answer", "R1", "opp", 0.0, -1.0),  # negative: clamped
    ("review_answer", "R1", "diag", S2, S2),
    ("review_answer", "R2", "sixty", S3, S3),
    ("review_answer", ["R1", "R2"], "sixty", (0.5 + S3) / 2, (0.5 + S3) / 2),  # mean over references
    ("review_answer", ["R1", "R3"], "opp", 0.0, -0.5),  # the mean is clamped, not each cosine
    ("review_answer", ["R1", "R3"], "mix", 0.0, 0.0),  # +cos45 and -cos45
    ("review_answer", "R3", "", S2, S2),  # an empty reply is embedded too
    ("review_answer", "R4", "same", 1.0, 1.0),  # an unnormalised reference vector
    ("review_answer", ["R2", "R3"], "z", 0.5, 0.5),
    ("product_qa", "R1", "neg_diag", 0.0, -S2),
    ("product_qa", "R2", "diag", S2, S2),
    ("product_qa", "R3", "z", 1.0, 1.0),
    ("product_qa", ["R1", "R2", "R3"], "diag", 2 * S2 / 3, 2 * S2 / 3),
    ("product_qa", "R2", "opp", 0.0, 0.0),  # orthogonal
    ("product_qa", "R1", "sixty", 0.5, 0.5),
    ("product_qa", ["R3"], "mix", 0.0, -S2),  # a one-element list
    ("review_summary", "R1", "mix", S2, S2),
    ("review_summary", "R2", "same", 0.0, 0.0),
    ("review_summary", "R3", "", S2, S2),
    ("review_summary", "R4", "opp", 0.0, -1.0),
    ("review_summary", ["R2"], "sixty", S3, S3),
]
# By hand: per-task means of the clamped column; task_mean = their mean; score = the item mean.
T_ANSWER = (1 + 0 + S2 + S3 + (0.5 + S3) / 2 + 0 + 0 + S2 + 1 + 0.5) / 10
T_QA = (0 + S2 + 1 + 2 * S2 / 3 + 0 + 0.5 + 0) / 7
T_SUMMARY = (S2 + 0 + S2 + 0 + S3) / 5


def write_tasks(root: Path, rows: list[tuple[str, Any, str, float, float]]) -> Path:
    """generation/<task>_dataset.json in the official layout (JSON lines), plus tasks the reference
    scores with other metrics (skipped unless named)."""
    gen = root / "generation"
    gen.mkdir(parents=True, exist_ok=True)
    by: dict[str, list[str]] = {}
    for i, (task, tgt, *_) in enumerate(rows):
        by.setdefault(task, []).append(json.dumps({"input_field": f"Question {i} for {task}.", "target_field": tgt}))
    for task, lines in by.items():
        (gen / f"{task}_dataset.json").write_text("\n".join(lines) + "\n")
    (gen / "attribute_extraction_dataset.json").write_text(json.dumps({"input_field": "x", "target_field": "y"}) + "\n")
    (gen / "simple_translation_dataset.json").write_text(json.dumps({"input_field": "x", "target_field": "y"}) + "\n")
    (root / "hf_skill_inference.py.txt").write_text((FIXTURE_BENCHDATA / "shopmmlu" / "hf_skill_inference.py.txt").read_text())
    return root


def load_fixture(tmp_path: Path) -> tuple[Any, list[Any], list[str]]:
    b = get_benchmark("shopmmlu")
    items = b.load(write_tasks(tmp_path / "shop", FIXTURE))
    by_task: dict[str, list[Any]] = {}
    for it in items:
        by_task.setdefault(it.categories["task"], []).append(it)
    # items come task file by task file (sorted names); line up the fixture rows the same way
    order = [it for t in sorted(by_task) for it in by_task[t]]
    assert order == items
    rows = sorted(FIXTURE, key=lambda r: r[0])
    return b, items, [r[2] for r in rows]


def test_fixture_matches_hand_derivation_and_reference(tmp_path: Path) -> None:
    b, items, replies = load_fixture(tmp_path)
    rows = sorted(FIXTURE, key=lambda r: r[0])
    assert [it.reference for it in items] == [r[1] for r in rows]
    recs = [{"categories": it.categories, **s} for it, s in zip(items, b.score_batch(items, [[r] for r in replies], ScoreContext(embedder=StandIn())), strict=True)]
    ref_model = RefModel()
    for rec, row, reply in zip(recs, rows, replies, strict=True):
        assert rec["score"] == pytest.approx(row[3], abs=1e-6), row
        assert rec["cosine"] == pytest.approx(row[4], abs=1e-6), row
        assert rec["score"] == pytest.approx(ref_sent_transformer(reply, row[1], ref_model), abs=1e-6)
        assert rec["cosine"] == pytest.approx(ref_task_wise(reply, row[1], ref_model), abs=1e-6)
    agg = b.aggregate(recs)
    per_task, track_wise = ref_skill_evaluation([(r[0], r[1], r[2]) for r in rows], ref_model)
    assert agg["by_task"] == pytest.approx({"product_qa": T_QA, "review_answer": T_ANSWER, "review_summary": T_SUMMARY}, abs=1e-6)
    assert agg["by_task"] == pytest.approx(per_task, abs=1e-6)
    assert agg["task_mean"] == pytest.approx((T_ANSWER + T_QA + T_SUMMARY) / 3, abs=1e-6)
    assert agg["task_mean"] == pytest.approx(track_wise, abs=1e-6)
    assert agg["score"] == pytest.approx(sum(r[3] for r in FIXTURE) / 22, abs=1e-6)
    assert agg["score_unclamped"] == pytest.approx(sum(r[4] for r in FIXTURE) / 22, abs=1e-6)
    assert agg["score"] != pytest.approx(agg["task_mean"], abs=1e-4)  # tasks of 10, 7, 5 items
    assert agg["stderr"] > 0 and agg["task_mean_stderr"] > 0 and agg["n"] == 22


def test_prompt_is_the_official_system_prompt_then_the_input(tmp_path: Path) -> None:
    b, items, _ = load_fixture(tmp_path)
    system = read_system_prompt(FIXTURE_BENCHDATA / "shopmmlu" / "hf_skill_inference.py.txt")
    assert system == "[fixture system prompt] Answer the shopping question.\n\n"
    assert items[0].prompt == system + "Question 10 for product_qa."  # hf_skill_inference: system_prompt + input_field
    p = b.protocol()
    assert p["max_new_tokens"] == 100 and p["prompt_source"] == "hf_skill_inference.py.txt:system_prompt"
    assert p["reference"]["commit"].startswith("7b118da")


def test_tasks_with_other_metrics(tmp_path: Path) -> None:
    root = write_tasks(tmp_path / "shop", FIXTURE)
    names = {it.categories["task"] for it in get_benchmark("shopmmlu").load(root)}
    assert names == {"review_answer", "product_qa", "review_summary"}  # extraction / translation skipped
    only = get_benchmark("shopmmlu", {"tasks": "product_qa"}).load(root)
    assert {it.categories["task"] for it in only} == {"product_qa"} and len(only) == 7
    with pytest.raises(DataError, match=r"attribute_extraction_dataset: the reference scores these with another metric \(rougel\)"):
        get_benchmark("shopmmlu", {"tasks": "attribute_extraction"}).load(root)
    (root / "hf_skill_inference.py.txt").write_text("prompt = 'no system prompt here'\n")
    with pytest.raises(DataError, match="no string constant system_prompt"):
        get_benchmark("shopmmlu").load(root)


def test_skill_file_keeps_the_sentence_transformer_rows(tmp_path: Path) -> None:
    """skills/<skill>.json as skill_evaluation.py reads it: input_field, output_field, task_name,
    task_type, metric; only the sent-transformer rows are generated and scored here."""
    root = write_tasks(tmp_path / "shop", FIXTURE)
    (root / "skills").mkdir()
    rows = [
        {"input_field": "Which is compatible?", "output_field": 2, "task_name": "compat", "task_type": "multiple-choice", "metric": "accuracy"},
        {"input_field": "Answer from the reviews.", "output_field": "R1", "task_name": "review_answer", "task_type": "generation", "metric": "sent-transformer"},
        {"input_field": "Summarise.", "output_field": ["R2", "R3"], "task_name": "review_summary", "task_type": "generation", "metric": "sent-transformer"},
    ]
    (root / "skills" / "skill3_user_behavior.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = get_benchmark("shopmmlu", {"skill": "skill3_user_behavior"})
    items = b.load(root)
    assert [(it.categories["task"], it.categories["skill"]) for it in items] == [("review_answer", "skill3_user_behavior"), ("review_summary", "skill3_user_behavior")]
    recs = [{"categories": it.categories, **s} for it, s in zip(items, b.score_batch(items, [["diag"], ["z"]], ScoreContext(embedder=StandIn())), strict=True)]
    assert [r["score"] for r in recs] == pytest.approx([S2, 0.5], abs=1e-6)
    bad = root / "skills" / "broken.json"
    bad.write_text(json.dumps({"input_field": "x", "task_name": "t", "metric": "sent-transformer"}) + "\n")
    with pytest.raises(DataError, match=r"broken\.json:1: missing field 'output_field'"):
        get_benchmark("shopmmlu", {"skill": "broken"}).load(root)


class RefSentenceTransformer:
    """``SentenceTransformer("all-MiniLM-L6-v2").encode`` as UKPLab/sentence-transformers builds it
    from the model folder (not installed here; transcribed, not our embedder): ``modules.json``'s
    pipeline Transformer -> Pooling -> Normalize; ``models/Transformer.py:tokenize`` (each text
    ``str(s).strip()``, lower-cased if ``do_lower_case``, then ``tokenizer(..., padding=True,
    truncation="longest_first", max_length=max_seq_length)`` from ``sentence_bert_config.json``);
    ``models/Pooling.py:forward`` with ``1_Pooling/config.json``'s mean mode (masked sum over the
    mask sum clamped at 1e-9); ``models/Normalize.py`` (L2). One text per forward pass. The
    weights and tokenizer files are the folder's (handed in, loaded once for both sides)."""

    def __init__(self, path: str, tok: Any, model: Any) -> None:
        root = Path(path)
        kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((root / "modules.json").read_text())]
        assert kinds == ["Transformer", "Pooling", "Normalize"], kinds
        self.cfg = json.loads((root / "sentence_bert_config.json").read_text())
        pooling = json.loads((root / "1_Pooling" / "config.json").read_text())
        assert pooling["pooling_mode_mean_tokens"] and not pooling.get("pooling_mode_cls_token")
        self.tok, self.model = tok, model

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            t = str(text).strip()
            if self.cfg.get("do_lower_case"):
                t = t.lower()
            enc = self.tok([t], padding=True, truncation="longest_first", return_tensors="pt", max_length=self.cfg["max_seq_length"])
            token_embeddings = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).expand(token_embeddings.size()).to(token_embeddings.dtype)
            v = torch.sum(token_embeddings * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
            out.append(torch.nn.functional.normalize(v, p=2, dim=1)[0].numpy())
        return np.stack(out)


def test_real_minilm_item_by_item() -> None:
    """The real all-MiniLM-L6-v2: our scores (our embedder, batched with padding) against the
    reference's metric on sentence-transformers' own encoding of each text alone, on awkward
    replies (empty, long, padded in a batch with short ones)."""
    from personafuse.embedded import resolve
    from personafuse.evaluation.embedding import SentenceEmbedder

    emb = SentenceEmbedder.from_pretrained()
    b = get_benchmark("shopmmlu")
    items = b.load(FIXTURE_BENCHDATA)
    replies = ["", "Thank you for your feedback. We are sorry the lid is loose; please contact us for a replacement. " * 12,
               "  Penguins live in Antarctica.  "]  # fmt: skip
    pairs = [(it, r) for it in items for r in replies]
    out = b.score_batch([p[0] for p in pairs], [[p[1]] for p in pairs], ScoreContext(embedder=emb))
    ref_model = RefSentenceTransformer(resolve("minilm").path, emb.tokenizer, emb.model)
    for (it, r), rec in zip(pairs, out, strict=True):
        assert rec["score"] == pytest.approx(ref_sent_transformer(r, it.reference, ref_model), abs=1e-5)
        assert rec["cosine"] == pytest.approx(ref_task_wise(r, it.reference, ref_model), abs=1e-5)
    assert len({round(rec["cosine"], 4) for rec in out}) > 3  # not a constant


def test_missing_data_is_named_before_the_prompt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--data at a benchdata folder without shopmmlu/ (the shared one): the error said the prompt
    file was missing and to "pass --data", which the user had done; it names the missing data now."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PERSONAFUSE_HUB_MIRROR", raising=False)
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(DataError, match=r"no generation \*_dataset\.json files in .*not on the Hub"):
        get_benchmark("shopmmlu").load(tmp_path)


def test_request_for_one_real_item_is_the_references(tmp_path: Path) -> None:
    """What the runner sends for one item: skill_wise_eval/hf_skill_inference.py's prompt, the file's
    ``system_prompt`` constant followed by the item's ``input_field`` (the fixture stands in for the
    file, whose text we do not copy), tokenised as a raw completion, 100 new tokens for a
    non-multiple-choice item, greedy: the completions endpoint, no chat messages."""
    import ast

    from eval_support import ChatServer
    from personafuse.evaluation.runner import EvalConfig, Runner
    from personafuse.evaluation.subjects import OpenAISubject

    root = write_tasks(tmp_path / "shop", FIXTURE[:1])
    script = (FIXTURE_BENCHDATA / "shopmmlu" / "hf_skill_inference.py.txt").read_text()
    system_prompt = next(n.value.value for n in ast.parse(script).body if isinstance(n, ast.Assign) and n.targets[0].id == "system_prompt")  # type: ignore[attr-defined]
    with ChatServer(lambda m, b: "same") as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["shopmmlu"], out=str(tmp_path / "run"), data=str(root),
                         options={"shopmmlu": {"tasks": FIXTURE[0][0]}})  # fmt: skip
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False, embedder_factory=StandIn).run()
    (body,) = srv.requests
    assert body["prompt"] == system_prompt + f"Question 0 for {FIXTURE[0][0]}."
    assert (body["max_tokens"], body["temperature"]) == (100, 0.0) and "messages" not in body
