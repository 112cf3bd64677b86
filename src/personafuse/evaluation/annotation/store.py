"""The human study's store: pairs, participants and judgements in SQLite.

Each annotator sees a pair as "Response A" and "Response B" in an order drawn at random for that
annotator and pair, and answers: which is preferred, a 1-5 confidence, which is more useful, and
which has more social presence. Pairs are handed out so that each gets ``annotators_per_pair``
judgements (7 in the paper), fewest-judged first. Everything lives in SQLite (WAL mode, one
transaction per answer), so a restart loses nothing. Participants sign in with a token issued by
the study owner (``personafuse annotate tokens``); only its SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import Any

from personafuse.fileio import read_jsonl

CRITERIA = ("preferred", "usefulness", "social_presence")
CRITERION_LABEL = {"preferred": "overall preference", "usefulness": "perceived usefulness", "social_presence": "social presence"}
# An annotator who opened a pair and left keeps it reserved this long before others may take it.
RESERVATION_S = 30 * 60
# Version 1 (no version row): the tables below without ``participants``. Version 2 adds it.
SCHEMA_VERSION = 2
# Imported tokens must be at least this long: a short one could be guessed.
MIN_TOKEN_CHARS = 16

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS participants (
    id TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, issued_at REAL NOT NULL);
"""


class AnnotationError(ValueError):
    pass


class AnnotationStore:
    def __init__(self, path: str | Path, annotators_per_pair: int | None = None, reference: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged answer is on disk
        self._migrate()
        if annotators_per_pair is not None:
            if annotators_per_pair < 1:
                raise AnnotationError("annotators_per_pair must be at least 1")
            self._set_meta("annotators_per_pair", str(annotators_per_pair))
        if reference is not None:
            self._set_meta("reference", reference)

    def _migrate(self) -> None:
        """Bring a database of any earlier version up to :data:`SCHEMA_VERSION`, keeping every row.
        Version 1 (written before participant tokens) only lacks the ``participants`` table."""
        has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        found = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
        version = int(found[0]) if found else 1
        if version > SCHEMA_VERSION:
            raise AnnotationError(f"{self.path} was written by a newer PersonaFuse (schema {version}); upgrade to open it")
        self.db.executescript(SCHEMA)  # CREATE TABLE IF NOT EXISTS: adds what is missing only
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def annotators_per_pair(self) -> int:
        return int(self.meta("annotators_per_pair", "7"))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ loading
    def load_responses(self, files: Iterable[str | Path]) -> int:
        """Add the files' responses and build the pairs; already-loaded lines are kept as they were
        (so a restart with the same files changes nothing). Returns the number of new pairs."""
        rows = []
        for f in files:
            f = Path(f)
            # strict: a response file cut short must not silently lose its last reply
            for n, obj in read_jsonl(f, error=AnnotationError, strict=True):
                pid = obj.get("id", obj.get("prompt_id"))
                prompt = obj.get("prompt", obj.get("query"))
                if pid is None or prompt is None or not isinstance(obj.get("response"), str):
                    raise AnnotationError(f"{f}:{n}: needs 'id', 'prompt' (or 'query') and a string 'response'")
                rows.append((str(obj.get("system") or f.stem), str(pid), str(prompt), str(obj.get("task") or "all"), obj["response"]))
        reference = self.meta("reference")
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?)", rows)
                by_prompt: dict[str, list[sqlite3.Row]] = defaultdict(list)
                for r in self.db.execute("SELECT * FROM responses ORDER BY prompt_id, system"):
                    by_prompt[r["prompt_id"]].append(r)
                before = self.db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
                for pid, rs in by_prompt.items():
                    if len({r["prompt"] for r in rs}) > 1:
                        raise AnnotationError(f"prompt {pid!r} has different prompt texts in different systems")
                    for r1, r2 in combinations(rs, 2):
                        if reference is not None:
                            if reference not in (r1["system"], r2["system"]):
                                continue
                            if r2["system"] == reference:  # the reference is always system_1
                                r1, r2 = r2, r1
                        self.db.execute(
                            "INSERT OR IGNORE INTO pairs (prompt_id, task, prompt, system_1, system_2, response_1, response_2)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (pid, r1["task"], r1["prompt"], r1["system"], r2["system"], r1["response"], r2["response"]),
                        )
                after = self.db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return after - before

    def count_pairs(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    # ------------------------------------------------------------------ participants
    def issue_tokens(self, names: Iterable[str] = (), count: int = 0) -> list[tuple[str, str]]:
        """New tokens for the named participants (a name that has one gets a new one; the old
        stops working) and for ``count`` new participants ``p001``, ``p002``, ... Returns
        ``(participant, token)`` pairs: the only time a token is seen, since only its hash is kept."""
        issued = [(_name(n), secrets.token_urlsafe(18)) for n in names]
        with self._lock:
            taken = {r[0] for r in self.db.execute("SELECT id FROM participants")}
            taken |= {r[0] for r in self.db.execute("SELECT DISTINCT annotator FROM assignments")}
        n = 0
        while count > 0:
            n += 1
            if (pid := f"p{n:03d}") not in taken and pid not in dict(issued):
                issued.append((pid, secrets.token_urlsafe(18)))
                count -= 1
        self._store_tokens(issued)
        return issued

    def import_tokens(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Register tokens issued elsewhere (e.g. by a recruitment platform)."""
        rows = [(_name(pid), token.strip()) for pid, token in pairs]
        for pid, token in rows:
            if len(token) < MIN_TOKEN_CHARS or not token.isprintable():
                raise AnnotationError(f"token for {pid!r}: use at least {MIN_TOKEN_CHARS} printable characters")
        self._store_tokens(rows)
        return len(rows)

    def _store_tokens(self, pairs: list[tuple[str, str]]) -> None:
        now = time.time()
        with self._lock:
            self.db.execute("BEGIN")
            try:
                for pid, token in pairs:
                    self.db.execute("DELETE FROM participants WHERE id = ?", (pid,))
                    self.db.execute("INSERT INTO participants VALUES (?, ?, ?)", (pid, _token_hash(token), now))
                self.db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self.db.execute("ROLLBACK")
                raise AnnotationError("a token was given to two participants; issue distinct tokens") from None
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def participant(self, token: str) -> str | None:
        """The participant this token was issued to, or None."""
        row = self.db.execute("SELECT id FROM participants WHERE token_sha256 = ?", (_token_hash(token),)).fetchone()
        return row[0] if row else None

    def participants(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT p.id, p.issued_at, (SELECT COUNT(*) FROM judgements j WHERE j.annotator = p.id) AS judgements"
            " FROM participants p ORDER BY p.id"
        )
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ assignment
    def progress(self, annotator: str) -> dict[str, int]:
        target = self.annotators_per_pair
        done = self.db.execute("SELECT COUNT(*) FROM judgements WHERE annotator = ?", (annotator,)).fetchone()[0]
        total = self.db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
        return {"done_by_you": done, "judgements": total, "wanted": self.count_pairs() * target}

    def next_pair(self, annotator: str) -> dict[str, Any] | None:
        """The pair this annotator should judge next (the same one again until it is answered)."""
        annotator = _name(annotator)
        target = self.annotators_per_pair
        now = time.time()
        with self._lock:
            row = self.db.execute(
                "SELECT a.pair_id, a.a_is_1 FROM assignments a LEFT JOIN judgements j"
                " ON j.pair_id = a.pair_id AND j.annotator = a.annotator"
                " WHERE a.annotator = ? AND j.id IS NULL ORDER BY a.assigned_at LIMIT 1",
                (annotator,),
            ).fetchone()
            if row is None:
                # Pairs this annotator has not seen, with fewer judgements + live reservations than wanted.
                cands = self.db.execute(
                    """SELECT p.id,
                         (SELECT COUNT(*) FROM judgements j WHERE j.pair_id = p.id) AS n_done,
                         (SELECT COUNT(*) FROM assignments a WHERE a.pair_id = p.id AND a.assigned_at > ?
                            AND NOT EXISTS (SELECT 1 FROM judgements j2 WHERE j2.pair_id = a.pair_id
                                            AND j2.annotator = a.annotator)) AS n_open
                       FROM pairs p
                       WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.pair_id = p.id AND a.annotator = ?)""",
                    (now - RESERVATION_S, annotator),
                ).fetchall()
                cands = [c for c in cands if c["n_done"] + c["n_open"] < target]
                if not cands:
                    return None
                rng = random.Random(f"{annotator}:{len(cands)}:{now}")
                least = min(c["n_done"] + c["n_open"] for c in cands)
                pick = rng.choice([c for c in cands if c["n_done"] + c["n_open"] == least])
                a_is_1 = rng.random() < 0.5  # the per-pair random A/B order, kept for this annotator
                self.db.execute(
                    "INSERT INTO assignments VALUES (?, ?, ?, ?)", (pick["id"], annotator, int(a_is_1), now)
                )
                row = {"pair_id": pick["id"], "a_is_1": int(a_is_1)}
            p = self.db.execute("SELECT * FROM pairs WHERE id = ?", (row["pair_id"],)).fetchone()
        a_is_1 = bool(row["a_is_1"])
        return {
            "pair_id": p["id"],
            "prompt": p["prompt"],
            "task": p["task"],
            "response_a": p["response_1"] if a_is_1 else p["response_2"],
            "response_b": p["response_2"] if a_is_1 else p["response_1"],
        }

    def record(self, annotator: str, pair_id: int, answers: dict[str, Any]) -> None:
        """Store one judgement; answers use the letters the annotator saw (A/B)."""
        annotator = _name(annotator)
        for c in CRITERIA:
            if answers.get(c) not in ("A", "B"):
                raise AnnotationError(f"{c}: choose 'A' or 'B'")
        conf = answers.get("confidence")
        if not isinstance(conf, int) or isinstance(conf, bool) or not 1 <= conf <= 5:
            raise AnnotationError("confidence: give a whole number from 1 to 5")
        seconds = answers.get("seconds")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)
                                    or not math.isfinite(seconds) or not 0 <= seconds <= 1e7):
            raise AnnotationError("seconds: give the time spent in seconds (a number from 0 to 10,000,000) or leave it out")
        if not isinstance(pair_id, int) or isinstance(pair_id, bool):
            raise AnnotationError("pair_id: a whole number is required")
        if not 0 <= pair_id < 2**63:  # SQLite's integers are 64-bit: a larger id names no pair
            raise AnnotationError(f"pair_id: pair {pair_id} was not given to {annotator!r}")
        with self._lock:
            a = self.db.execute(
                "SELECT a_is_1 FROM assignments WHERE pair_id = ? AND annotator = ?", (pair_id, annotator)
            ).fetchone()
            if a is None:
                raise AnnotationError(f"pair_id: pair {pair_id} was not given to {annotator!r}")
            try:
                self.db.execute(
                    "INSERT INTO judgements (pair_id, annotator, a_is_1, preferred, confidence, usefulness,"
                    " social_presence, seconds, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (pair_id, annotator, a[0], *(_to_slot(answers[c], a[0]) for c in ("preferred",)), conf,
                     _to_slot(answers["usefulness"], a[0]), _to_slot(answers["social_presence"], a[0]),
                     None if seconds is None else float(seconds), time.time()),
                )
            except sqlite3.IntegrityError:
                raise AnnotationError(f"pair_id: {annotator!r} already judged pair {pair_id}") from None

    def judgements(self) -> list[dict[str, Any]]:
        """Every judgement with the systems it chose (``1``/``2`` slots resolved to names)."""
        out = []
        for r in self.db.execute(
            "SELECT j.*, p.prompt_id, p.task, p.system_1, p.system_2 FROM judgements j JOIN pairs p ON p.id = j.pair_id ORDER BY j.id"
        ):
            d = dict(r)
            for c in CRITERIA:
                d[c] = d["system_1"] if d[c] == "1" else d["system_2"]
            out.append(d)
        return out


def _name(annotator: str) -> str:
    name = (annotator or "").strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise AnnotationError("annotator: give a name or id (1-100 printable characters)")
    return name


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _to_slot(letter: str, a_is_1: int) -> str:
    """'A'/'B' as shown → '1'/'2' as stored (system_1/system_2), so the order never leaks into results."""
    return "1" if (letter == "A") == bool(a_is_1) else "2"
