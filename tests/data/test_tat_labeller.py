"""The second labeller of the tiny preset: the paper's Table 1 (Trait Activation Theory) matched to
each query with the embedded sentence encoder (all-MiniLM-L6-v2, the real model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import REPO, cli_env, lines
from personafuse.data.schema import make_record
from personafuse.data.tat_labeller import TASK_DESCRIPTIONS, TATLabeller, relabel_records
from personafuse.training.records import load_records
from personafuse.traits import TAT_PRIOR, tat_prior, vector_from_poles

QUERIES = {
    "Solve for x: 3x + 7 = 22. Show the steps.": "math",
    "What is 17 times 23?": "math",
    "Brainstorm five names for a bakery that also sells books.": "creativity",
    "Write a short poem about the sea at night.": "creativity",
    "My package is two weeks late and nobody answers my emails.": "customer_service",
    "I was charged twice for my subscription.": "customer_service",
    "I lost my mom last month and I feel empty.": "therapist",
    "My friend forgot my birthday again. Should I say something?": "social_cognition",
    "My colleague keeps taking credit for my work, what is he thinking?": "social_cognition",
}


@pytest.fixture(scope="module")
def labeller() -> TATLabeller:
    return TATLabeller()


def test_every_table_1_task_has_a_description():
    assert set(TASK_DESCRIPTIONS) == set(TAT_PRIOR)


def test_queries_get_the_poles_of_the_task_they_are_about(labeller):
    labels = labeller.label(list(QUERIES))
    assert [lab.task for lab in labels] == list(QUERIES.values())
    for lab in labels:
        assert lab.p == tat_prior(lab.task)
        assert max(lab.similarity, key=lab.similarity.get) == lab.task


def _record(i: int, query: str, poles: tuple[str, ...]) -> dict:
    return make_record(id=f"r{i}", query=query, situation=None, source="test", mode="persona_cot",
                       cues={"social": "s", "task": "t"}, traits=list(poles), trait_reasons=[],
                       p=vector_from_poles(poles), response="A reply.", rationale=None, teacher="default",
                       prompt_version="pcot-v1", constrained=True, timings={}, raw={"cues": "c"})


def test_relabel_writes_new_records_that_train_and_keeps_the_teachers(tmp_path: Path, labeller):
    src = tmp_path / "src"
    src.mkdir()
    rows = [_record(i, q, ("high_E",)) for i, q in enumerate(QUERIES)]
    (src / "records-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = relabel_records(src, tmp_path / "tat", labeller)
    assert summary["records"] == len(QUERIES) and summary["tasks"]["math"] == 2
    out = lines(tmp_path / "tat", "records")
    for row, task in zip(out, QUERIES.values(), strict=True):
        assert row["p"] == tat_prior(task) and row["raw"]["teacher_p"] == vector_from_poles(("high_E",))
        assert row["raw"]["cues"] == "c" and set(row["raw"]["tat_similarity"]) == set(TAT_PRIOR)
        assert row["trait_reasons"][0]["reason"].startswith(f"TAT Table 1: {task}")
    assert [r.p for r in load_records(tmp_path / "tat", require_p=True)] == [tuple(r["p"]) for r in out]
    # below --min-similarity a query keeps the teacher's labels
    strict = relabel_records(src, tmp_path / "strict", labeller, min_similarity=0.99)
    assert strict["kept_teacher"] == len(QUERIES) and strict["changed"] == 0 and strict["tasks"] == {}
    assert all(r["p"] == vector_from_poles(("high_E",)) and r["raw"]["tat_task"] is None for r in lines(tmp_path / "strict", "records"))
    # nothing already written is replaced
    with pytest.raises(FileExistsError, match="already holds records"):
        relabel_records(src, tmp_path / "tat", labeller)
    # a line that is not a generated record is named
    (src / "records-00001.jsonl").write_text(json.dumps({"query": "q", "response": "r", "p": [1] + [0] * 9}) + "\n")
    with pytest.raises(ValueError, match=r"records-00001\.jsonl:1: not a generated record"):
        relabel_records(src, tmp_path / "tat2", labeller)
    assert not (tmp_path / "tat2").exists()


def test_cli(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "records-00000.jsonl").write_text(json.dumps(_record(0, "What is 17 times 23?", ("high_A",))) + "\n")
    r = subprocess.run([sys.executable, "-m", "personafuse.data.cli", "relabel", str(src), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["tasks"] == {"math": 1}
    r = subprocess.run([sys.executable, "-m", "personafuse.data.cli", "relabel", str(src), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert r.returncode == 2 and "already holds records" in r.stderr
