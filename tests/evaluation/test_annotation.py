"""The pairwise human-evaluation store: loading, assignment, A/B order, SQLite, majority vote, export."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from personafuse.evaluation.annotation import (
    AnnotationError,
    AnnotationStore,
    export,
    pair_outcomes,
    win_rates,
)

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

    from personafuse.evaluation.annotation import create_annotation_app
    from serve_support import LiveServer

    store = AnnotationStore(tmp_path / "ann.sqlite", annotators_per_pair=2)
    store.load_responses(files[:2])
    [(_, token)] = store.issue_tokens(["bo"])
    auth = {"authorization": f"Bearer {token}"}
    with LiveServer(create_annotation_app(store, owner_key="owner-secret-key")) as s:
        pair = httpx.get(s.url + "/api/next", headers=auth).json()["pair"]
        body = {"pair_id": pair["pair_id"], "preferred": "A", "confidence": 9, "usefulness": "A", "social_presence": "B"}
        r = httpx.post(s.url + "/api/judgements", json=body, headers=auth)
        assert r.status_code == 400 and "confidence" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/api/judgements", content=b"{oops", headers={**auth, "content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/api/judgements", json={**body, "confidence": 2}, headers=auth)
        assert r.status_code == 200 and r.json()["progress"]["done_by_you"] == 1 and r.json()["participant"] == "bo"
        summary = httpx.get(s.url + "/api/summary", headers={"authorization": "Bearer owner-secret-key"}).json()
        assert summary["judgements"] == 1


# ---------------------------------------------------------------------- hostile use of the app
def _app(tmp_path, files, per_pair=1):
    from personafuse.evaluation.annotation import create_annotation_app

    store = AnnotationStore(tmp_path / "ann.sqlite", annotators_per_pair=per_pair)
    store.load_responses(files[:2])  # 6 pairs
    return store, create_annotation_app(store, owner_key="the-owner-key-123")


def _open_reservations(store, who):
    return store.db.execute(
        "SELECT COUNT(*) FROM assignments a WHERE a.annotator = ? AND NOT EXISTS"
        " (SELECT 1 FROM judgements j WHERE j.pair_id = a.pair_id AND j.annotator = a.annotator)",
        (who,),
    ).fetchone()[0]


def test_sign_in_needs_a_token_the_owner_issued(tmp_path, files):
    """A typed name used to be an identity anyone could reuse (and invent by the hundred)."""
    import httpx

    from serve_support import LiveServer

    store, app = _app(tmp_path, files)
    [(_, old_token)] = store.issue_tokens(["ana"])
    [(_, token)] = store.issue_tokens(["ana"])  # issued again: the first token stops working
    with LiveServer(app) as s:
        for headers, params in [({}, {"annotator": "ana"}), ({"authorization": "Bearer made-up-token-123456"}, {}),
                                ({"authorization": f"Bearer {old_token}"}, {})]:
            r = httpx.get(s.url + "/api/next", headers=headers, params=params)
            assert r.status_code == 401 and "token" in r.json()["error"]["message"], r.text
        r = httpx.get(s.url + "/api/next", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["participant"] == "ana" and r.json()["pair"] is not None
    assert store.db.execute("SELECT COUNT(*) FROM assignments").fetchone()[0] == 1  # only ana's


def test_next_cannot_lock_pairs_away(tmp_path, files):
    """One participant asking for pairs over and over holds one pair; the others stay available."""
    import httpx

    from serve_support import LiveServer

    store, app = _app(tmp_path, files, per_pair=1)
    tokens = dict(store.issue_tokens(count=2))
    greedy, fair = (f"Bearer {t}" for t in tokens.values())
    with LiveServer(app) as s:
        seen = {httpx.get(s.url + "/api/next", headers={"authorization": greedy}).json()["pair"]["pair_id"] for _ in range(20)}
        assert len(seen) == 1 and _open_reservations(store, "p001") == 1
        others = {httpx.get(s.url + "/api/next", headers={"authorization": fair}).json()["pair"]["pair_id"]}
    assert others and not others & seen  # the second participant gets a different pair
    assert store.db.execute("SELECT COUNT(*) FROM assignments").fetchone()[0] == 2


def test_summary_needs_the_owner_key(tmp_path, files):
    import httpx

    from serve_support import LiveServer

    store, app = _app(tmp_path, files)
    [(_, token)] = store.issue_tokens(["ana"])
    with LiveServer(app) as s:
        for headers in ({}, {"authorization": f"Bearer {token}"}, {"authorization": "Bearer wrong"}):
            r = httpx.get(s.url + "/api/summary", headers=headers)
            assert r.status_code == 401 and "owner key" in r.json()["error"]["message"]
            assert "outcomes" not in r.text
        r = httpx.get(s.url + "/api/summary", headers={"authorization": "Bearer the-owner-key-123"})
        assert r.status_code == 200 and r.json()["pairs"] == 6
    with pytest.raises(ValueError, match="owner_key is empty"):
        from personafuse.evaluation.annotation import create_annotation_app

        create_annotation_app(store, owner_key=" ")


def test_posts_are_json_only_and_hostile_bodies_get_the_apps_error(tmp_path, files):
    """Cross-site form posts (form-encoded or text/plain) are refused; deep nesting, lone
    surrogates, huge ids and odd values are a 4xx in the app's error shape (they were 500s)."""
    import httpx

    from serve_support import LiveServer

    store, app = _app(tmp_path, files)
    [(_, token)] = store.issue_tokens(["ana"])
    auth = {"authorization": f"Bearer {token}"}
    answers = {"preferred": "A", "confidence": 3, "usefulness": "A", "social_presence": "B"}
    with LiveServer(app) as s:
        pair_id = httpx.get(s.url + "/api/next", headers=auth).json()["pair"]["pair_id"]
        good = json.dumps({"pair_id": pair_id, **answers}).encode()
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = httpx.post(s.url + "/api/judgements", content=good, headers={**auth, "content-type": ctype})
            assert r.status_code == 415 and "JSON" in r.json()["error"]["message"]
        hostile = [
            (b'{"pair_id": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nests deeper"),
            (json.dumps({"pair_id": 10**30, **answers}).encode(), 400, "pair_id"),
            (json.dumps({"pair_id": pair_id, **answers, "seconds": [1]}).encode(), 400, "seconds"),
            (json.dumps({"pair_id": pair_id, **answers, "seconds": 1e300}).encode(), 400, "seconds"),
            (b'{"pair_id": 1, "preferred": "\\ud800"}', 400, "surrogate"),
            (b'{"pair_id": ' + b"9" * 5000 + b"}", 400, "too many digits"),
            (b'{"x": "' + b"a" * 70_000 + b'"}', 413, "larger than"),
        ]
        for raw, status, needle in hostile:
            r = httpx.post(s.url + "/api/judgements", content=raw, headers={**auth, "content-type": "application/json"})
            assert r.status_code == status and needle in r.json()["error"]["message"], (raw[:40], r.text[:200])
            assert set(r.json()) == {"error"}
        r = httpx.get(s.url + "/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
        r = httpx.post(s.url + "/api/judgements", content=good, headers={**auth, "content-type": "application/json"})
        assert r.status_code == 200  # and it still works
    assert len(store.judgements()) == 1


# The schema as personafuse wrote it before participant tokens (main at a12fc80), to build a
# database "from today's version" and check that it opens without losing a judgement.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    system TEXT NOT NULL, prompt_id TEXT NOT NULL, prompt TEXT NOT NULL, task TEXT NOT NULL,
    response TEXT NOT NULL, PRIMARY KEY (system, prompt_id));
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, prompt_id TEXT NOT NULL, task TEXT NOT NULL, prompt TEXT NOT NULL,
    system_1 TEXT NOT NULL, system_2 TEXT NOT NULL, response_1 TEXT NOT NULL, response_2 TEXT NOT NULL,
    UNIQUE (prompt_id, system_1, system_2));
CREATE TABLE IF NOT EXISTS assignments (
    pair_id INTEGER NOT NULL REFERENCES pairs(id), annotator TEXT NOT NULL,
    a_is_1 INTEGER NOT NULL, assigned_at REAL NOT NULL, PRIMARY KEY (pair_id, annotator));
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id), annotator TEXT NOT NULL,
    a_is_1 INTEGER NOT NULL, preferred TEXT NOT NULL, confidence INTEGER NOT NULL,
    usefulness TEXT NOT NULL, social_presence TEXT NOT NULL, seconds REAL, created_at REAL NOT NULL,
    UNIQUE (pair_id, annotator));
"""


def write_v1_database(path):
    """Two pairs; alice judged pair 1 (and has pair 2 open), bob judged pair 1 too."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO meta VALUES ('annotators_per_pair', '3')")
    for pid in ("q1", "q2"):
        for system in ("baseline", "personafuse"):
            db.execute("INSERT INTO responses VALUES (?, ?, ?, 'emotion', ?)", (system, pid, f"prompt {pid}", f"{system} on {pid}"))
        db.execute(
            "INSERT INTO pairs (prompt_id, task, prompt, system_1, system_2, response_1, response_2)"
            " VALUES (?, 'emotion', ?, 'baseline', 'personafuse', ?, ?)", (pid, f"prompt {pid}", f"baseline on {pid}", f"personafuse on {pid}"))
    for who, pair_id, a_is_1 in (("alice", 1, 1), ("bob", 1, 0), ("alice", 2, 0)):
        db.execute("INSERT INTO assignments VALUES (?, ?, ?, 1000.0)", (pair_id, who, a_is_1))
    db.execute("INSERT INTO judgements (pair_id, annotator, a_is_1, preferred, confidence, usefulness, social_presence,"
               " seconds, created_at) VALUES (1, 'alice', 1, '2', 4, '2', '1', 12.5, 1001.0)")
    db.execute("INSERT INTO judgements (pair_id, annotator, a_is_1, preferred, confidence, usefulness, social_presence,"
               " seconds, created_at) VALUES (1, 'bob', 0, '2', 5, '1', '2', 8.0, 1002.0)")
    db.close()


def test_a_database_from_the_previous_version_opens_with_every_judgement(tmp_path):
    path = tmp_path / "study.sqlite"
    write_v1_database(path)
    store = AnnotationStore(path)
    assert store.meta("schema_version") == "2" and store.annotators_per_pair == 3
    judged = [(j["annotator"], j["pair_id"], j["preferred"], j["confidence"], j["seconds"]) for j in store.judgements()]
    assert judged == [("alice", 1, "personafuse", 4, 12.5), ("bob", 1, "personafuse", 5, 8.0)]
    assert [o["preferred"] for o in pair_outcomes(store)] == [0.0]  # both chose personafuse (system 2)
    # An annotator of the old study gets a token under the old name and carries on where she was.
    [(who, token)] = store.issue_tokens(["alice"])
    assert store.participant(token) == "alice"
    nxt = store.next_pair("alice")
    assert nxt["pair_id"] == 2 and nxt["response_a"] == "personafuse on q2"  # her open pair, her A/B order
    assert store.progress("alice")["done_by_you"] == 1
    AnnotationStore(path)  # opening it again changes nothing
    assert len(AnnotationStore(path).judgements()) == 2


def test_a_database_from_a_newer_version_is_not_touched(tmp_path):
    path = tmp_path / "study.sqlite"
    AnnotationStore(path)._set_meta("schema_version", "99")
    with pytest.raises(AnnotationError, match="newer"):
        AnnotationStore(path)


def test_tokens_command_mints_imports_and_lists(tmp_path, files):
    import typer
    from typer.testing import CliRunner

    from personafuse.serving.cli import register

    app = typer.Typer()
    register(app)  # the commands of 'personafuse serve' and 'personafuse annotate'

    db = tmp_path / "study.sqlite"
    AnnotationStore(db).load_responses(files[:2])
    runner = CliRunner()
    out = tmp_path / "tokens.tsv"
    r = runner.invoke(app, ["annotate", "tokens", "alice", "--mint", "2", "--db", str(db), "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    assert [pid for pid, _ in lines] == ["alice", "p001", "p002"] and (out.stat().st_mode & 0o777) == 0o600
    store = AnnotationStore(db)
    assert all(store.participant(token) == pid for pid, token in lines)
    listed = tmp_path / "from-platform.csv"
    listed.write_text("# id,token\nprolific-7,0123456789abcdef-xyz\n")
    assert runner.invoke(app, ["annotate", "tokens", "--db", str(db), "--import", str(listed)]).exit_code == 0
    assert AnnotationStore(db).participant("0123456789abcdef-xyz") == "prolific-7"
    listed.write_text("weak,short\n")
    r = runner.invoke(app, ["annotate", "tokens", "--db", str(db), "--import", str(listed)])
    assert r.exit_code != 0 and "at least 16" in r.output
    r = runner.invoke(app, ["annotate", "tokens", "--db", str(db)])
    assert r.exit_code == 0 and "prolific-7\t0 judgements" in r.output and "0123456789abcdef" not in r.output
