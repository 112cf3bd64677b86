"""The pairwise human-evaluation store: loading, assignment, A/B order, SQLite, majority vote, export."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from personafuse.serving.annotation import AnnotationError, AnnotationStore, export, pair_outcomes, win_rates

PROMPTS = {f"p{i}": ("emotion" if i < 3 else "reasoning", f"question number {i}") for i in range(6)}


def write_system(path, name, quality):
    rows = [
        {"id": pid, "prompt": text, "task": task, "response": f"{quality} answer from {name} to {pid}"}
        for pid, (task, text) in PROMPTS.items()
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    return [
        write_system(tmp_path / "personafuse.jsonl", "personafuse", "good"),
        write_system(tmp_path / "baseline.jsonl", "baseline", "poor"),
        write_system(tmp_path / "other.jsonl", "other", "poor"),
    ]


def judge_all(store, annotators, pick):
    """Every annotator answers until nothing is left; ``pick(pair)`` returns the letter to choose."""
    seen = {a: set() for a in annotators}
    orders = set()
    for _ in range(1000):  # bounded
        progressed = False
        for a in annotators:
            pair = store.next_pair(a)
            if pair is None:
                continue
            assert pair["pair_id"] not in seen[a], "an annotator got the same pair twice"
            seen[a].add(pair["pair_id"])
            letter = pick(pair)
            orders.add((pair["pair_id"], "good" in pair["response_a"]))
            store.record(a, pair["pair_id"], {"preferred": letter, "confidence": 4, "usefulness": letter, "social_presence": "A"})
            progressed = True
        if not progressed:
            return orders
    raise AssertionError("assignment did not finish")


def test_pairs_assignment_and_win_rates(tmp_path, files):
    store = AnnotationStore(tmp_path / "ann.sqlite", annotators_per_pair=3)
    assert store.load_responses(files) == 6 * 3  # three system pairs per prompt
    assert store.load_responses(files) == 0  # reloading is a no-op
    orders = judge_all(store, [f"ann{i}" for i in range(5)], lambda p: "A" if "good" in p["response_a"] else "B")
    counts = sqlite3.connect(tmp_path / "ann.sqlite").execute(
        "SELECT pair_id, COUNT(*) FROM judgements GROUP BY pair_id"
    ).fetchall()
    assert len(counts) == 18 and {n for _, n in counts} == {3}  # every pair got exactly 3 annotators
    # The A/B order varies: the good reply was shown as A for some pairs and as B for others.
    assert {good_is_a for _, good_is_a in orders} == {True, False}

    rates = {(r["system"], r["opponent"], r["task"], r["criterion"]): r for r in win_rates(store, n_boot=200)}
    pf = rates[("baseline", "personafuse", "all", "preferred")]  # names sorted: baseline is system_1
    assert pf["win_rate"] == 0.0 and pf["pairs"] == 6 and pf["losses"] == 6
    assert rates[("baseline", "other", "emotion", "preferred")]["pairs"] == 3
    # Social presence was always "A": position, not system, so the outcome is mixed and the CI spans it.
    sp = rates[("baseline", "personafuse", "all", "social_presence")]
    assert sp["ci_low"] <= sp["win_rate"] <= sp["ci_high"]


def test_reference_system_and_majority_vote_with_ties(tmp_path, files):
    store = AnnotationStore(tmp_path / "ann.sqlite", annotators_per_pair=2, reference="personafuse")
    assert store.load_responses(files) == 6 * 2  # only pairs with the reference
    # Annotator x prefers the good reply, y the poor one: every pair is split 1-1, a tie.
    judge_all(store, ["x"], lambda p: "A" if "good" in p["response_a"] else "B")
    judge_all(store, ["y"], lambda p: "B" if "good" in p["response_a"] else "A")
    outcomes = pair_outcomes(store)
    assert len(outcomes) == 12 and all(o["system_1"] == "personafuse" for o in outcomes)
    assert all(o["preferred"] == 0.5 and o["annotators"] == 2 for o in outcomes)
    r = next(r for r in win_rates(store, n_boot=100) if r["opponent"] == "baseline" and r["task"] == "all" and r["criterion"] == "preferred")
    assert (r["wins"], r["ties"], r["losses"], r["win_rate"]) == (0, 6, 0, 0.5)


def test_bad_answers_are_rejected(tmp_path, files):
    store = AnnotationStore(tmp_path / "ann.sqlite", annotators_per_pair=1)
    store.load_responses(files)
    pair = store.next_pair("z")
    assert store.next_pair("z") == pair  # the open pair is handed out again until answered
    good = {"preferred": "A", "confidence": 3, "usefulness": "B", "social_presence": "A"}
    for bad, msg in [({"preferred": "C"}, "preferred"), ({"confidence": 6}, "confidence"), ({"confidence": "3"}, "confidence")]:
        with pytest.raises(AnnotationError, match=msg):
            store.record("z", pair["pair_id"], {**good, **bad})
    with pytest.raises(AnnotationError, match="was not given"):
        store.record("someone-else", pair["pair_id"], good)
    store.record("z", pair["pair_id"], good)
    with pytest.raises(AnnotationError, match="already judged"):
        store.record("z", pair["pair_id"], good)
    with pytest.raises(AnnotationError, match="annotator"):
        store.next_pair("  ")


def test_export_files(tmp_path, files):
    store = AnnotationStore(tmp_path / "ann.sqlite", annotators_per_pair=1)
    store.load_responses(files[:2])
    judge_all(store, ["a"], lambda p: "A" if "good" in p["response_a"] else "B")
    paths = export(store, tmp_path / "out", n_boot=100)
    assert [p.name for p in paths] == ["win_rates.csv", "win_rates.md", "win_rates.png", "judgements.csv"]
    rows = list(csv.DictReader(paths[0].read_text().splitlines()))
    overall = [r for r in rows if r["task"] == "all" and r["criterion"] == "preferred"]
    assert overall[0]["system"] == "baseline" and float(overall[0]["win_rate"]) == 0.0
    assert {r["task"] for r in rows} == {"all", "emotion", "reasoning"}
    assert "perceived usefulness" in paths[1].read_text()
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    judg = list(csv.DictReader(paths[3].read_text().splitlines()))
    assert len(judg) == 6 and {j["preferred"] for j in judg} == {"personafuse"}


def test_bad_input_files(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": 1, "prompt": "q"}\n')
    with pytest.raises(AnnotationError, match="x.jsonl:1"):
        AnnotationStore(tmp_path / "a.sqlite").load_responses([f])


def test_http_api_rejects_bad_judgements_and_keeps_serving(tmp_path, files):
    import httpx

    from personafuse.serving.annotation import create_annotation_app
    from serve_support import LiveServer

    store = AnnotationStore(tmp_path / "ann.sqlite", annotators_per_pair=2)
    store.load_responses(files[:2])
    with LiveServer(create_annotation_app(store)) as s:
        pair = httpx.get(s.url + "/api/next", params={"annotator": "bo"}).json()["pair"]
        body = {"annotator": "bo", "pair_id": pair["pair_id"], "preferred": "A", "confidence": 9, "usefulness": "A", "social_presence": "B"}
        r = httpx.post(s.url + "/api/judgements", json=body)
        assert r.status_code == 400 and "confidence" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/api/judgements", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/api/judgements", json={**body, "confidence": 2})
        assert r.status_code == 200 and r.json()["progress"]["done_by_you"] == 1
        assert httpx.get(s.url + "/api/summary").json()["judgements"] == 1
