"""Routing agreement (issue 34): hit rate, Wilson interval and contrast against a hand computation;
bad expectation files refused naming the line; the CLI on a real tiny checkpoint; the shipped
held-out file kept apart from every training source."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from personafuse.evaluation.data import DataError
from personafuse.evaluation.routing_analysis import (
    heldout_path,
    read_expectations,
    routing_agreement,
    wilson_interval,
)
from personafuse.traits import TAT_PRIOR, TRAIT_POLES


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _w(**kw: float) -> list[float]:
    """Ten weights: the named poles as given, the rest sharing what is left equally."""
    rest = (1 - sum(kw.values())) / (10 - len(kw))
    return [kw.get(p, rest) for p in TRAIT_POLES]


def test_agreement_matches_a_hand_computation(tmp_path: Path) -> None:
    f = _write(tmp_path / "e.jsonl", [
        {"query": "a", "situation": "math", "positive": ["high_C", "high_E"], "negative": ["high_N"]},
        {"query": "b", "situation": "math", "positive": ["C+", "E+"], "negative": ["high neuroticism"]},
        {"query": "c", "situation": "creativity", "positive": ["high_O"], "negative": ["high_C"]},
    ])
    weights = {
        "a": _w(high_C=0.3, high_E=0.1, high_N=0.05),  # pos mean 0.2, neg 0.05: hit, contrast 4
        "b": _w(high_C=0.1, high_E=0.1, high_N=0.2),  # pos 0.1, neg 0.2: miss, contrast 0.5
        "c": _w(high_O=0.15, high_C=0.1),  # pos 0.15, neg 0.1: hit, contrast 1.5
    }
    per: list[dict] = []
    res = routing_agreement(lambda qs: [weights[q] for q in qs], f, per_query=per)
    assert res["n"] == 3 and res["hit_rate"] == pytest.approx(2 / 3)
    assert res["contrast"] == pytest.approx(1.5)  # median of 4, 0.5, 1.5
    # Wilson 95 % for 2 of 3, by hand: centre (p + z²/2n)/(1 + z²/n), half-width z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    z, n, p = 1.959964, 3, 2 / 3
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert res["hit_rate_ci"] == pytest.approx([centre - half, centre + half])
    assert res["hit_rate_ci"] == pytest.approx([0.2077, 0.9385], abs=1e-4)
    m = res["by_situation"]["math"]
    assert m["n"] == 2 and m["hit_rate"] == 0.5 and m["contrast"] == pytest.approx(2.25)
    assert res["by_situation"]["creativity"] == {"hit_rate": 1.0, "hit_rate_ci": pytest.approx(list(wilson_interval(1, 1))), "contrast": pytest.approx(1.5), "n": 1}
    assert [q["hit"] for q in per] == [True, False, True] and per[1]["positive"] == ["high_C", "high_E"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"query": "q", "situation": "math", "positive": ["high_Q"], "negative": ["high_N"]}, "unknown pole 'high_Q'"),
        ({"query": "q", "situation": "math", "negative": ["high_N"]}, "missing field 'positive'"),
        ({"situation": "math", "positive": ["high_C"], "negative": ["high_N"]}, "missing field 'query'"),
        ({"query": "q", "situation": "math", "positive": ["high_C"], "negative": []}, "'negative' is empty"),
        ({"query": "q", "situation": "math", "positive": ["high_C"], "negative": ["C+"]}, "high_C is both"),
    ],
)
def test_bad_expectation_lines_are_refused_naming_the_line(tmp_path: Path, bad: dict, message: str) -> None:
    good = {"query": "fine", "situation": "math", "positive": ["high_C"], "negative": ["high_N"]}
    f = _write(tmp_path / "e.jsonl", [good, good, bad])
    with pytest.raises(DataError, match=rf"e\.jsonl:3: .*{message}"):
        read_expectations(f)


def test_routing_expect_command_on_a_tiny_checkpoint(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from conftest import build_tiny
    from personafuse.evaluation.cli import register

    pf = build_tiny(tmp_path)
    pf.save_pretrained(tmp_path / "ckpt")
    f = _write(tmp_path / "e.jsonl", [
        {"query": f"query {i}", "situation": s, "positive": ["high_A"], "negative": ["low_A"]}
        for i, s in enumerate(["social", "social", "therapist"])
    ])
    with torch.no_grad():
        w = pf.route([f"query {i}" for i in range(3)])
    hits = [bool(row[6] > row[7]) for row in w.tolist()]  # high_A, low_A
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["routing", "--model", f"pf:{tmp_path / 'ckpt'}", "--expect", str(f), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout[r.stdout.index("{"):])  # loading may log lines first
    assert set(got) == {"hit_rate", "hit_rate_ci", "contrast", "n", "by_situation"}
    assert got["n"] == 3 and got["hit_rate"] == pytest.approx(sum(hits) / 3)
    assert sorted(got["by_situation"]) == ["social", "therapist"]
    r = CliRunner().invoke(app, ["routing", "--model", f"pf:{tmp_path / 'ckpt'}", "--expect", str(f)])
    assert r.exit_code == 0 and "| all | 3 |" in r.output
    r = CliRunner().invoke(app, ["routing", "--expect", str(f)])
    assert r.exit_code != 0 and "--model" in r.output


def _table1_sides(situation: str) -> tuple[set[str], set[str]]:
    """Table 1: positive traits' high poles; negative traits' high poles, or (none listed) the
    opposite poles of the positives. TAT_PRIOR spells negative traits as their low poles."""
    prior = TAT_PRIOR[situation]
    pos = {p for p in prior if p.startswith("high_")}
    neg = {"high_" + p[4:] for p in prior if p.startswith("low_")} or {"low_" + p[5:] for p in pos}
    return pos, neg


def test_heldout_file_covers_table_1_and_is_apart_from_training_sources() -> None:
    from personafuse.data.sources import normalise_query, seed_queries
    from personafuse.evaluation.embedding import SentenceEmbedder

    rows = read_expectations(heldout_path())
    by_sit: dict[str, list[dict]] = {}
    for r in rows:
        by_sit.setdefault(r["situation"], []).append(r)
    assert set(by_sit) == set(TAT_PRIOR)
    for sit, rs in by_sit.items():
        assert len(rs) >= 12, sit
        pos, neg = _table1_sides(sit)
        assert all(set(r["positive"]) == pos and set(r["negative"]) == neg for r in rs), sit
    held = [r["query"] for r in rows]
    assert len({normalise_query(q) for q in held}) == len(held)
    # Every local training source: the seed set is the only one shipped (Hub sources are read at
    # generation time, never bundled); the demo's queries are the seed set's.
    seeds = [q.text for q in seed_queries()]
    assert not {normalise_query(q) for q in held} & {normalise_query(q) for q in seeds}
    emb = SentenceEmbedder.from_pretrained()  # the embedded all-MiniLM-L6-v2
    sim = emb.encode(held) @ emb.encode(seeds).T
    worst = int(sim.max(dim=1).values.argmax())
    assert float(sim.max()) < 0.8, (held[worst], float(sim.max()))
