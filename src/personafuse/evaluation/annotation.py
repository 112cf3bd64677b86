"""Pairwise human evaluation (paper §7): annotators compare two systems' replies to one prompt.

Input: JSONL files of responses, one line per prompt with ``id`` (or ``prompt_id``), ``prompt``
(or ``query``), ``response`` and optionally ``task`` (task type, e.g. ``emotion``/``reasoning``)
and ``system`` (defaults to the file's stem). Every prompt answered by two or more systems gives
one pair per system pair (or only pairs with ``reference`` when given).

Each annotator sees a pair as "Response A" and "Response B" in an order drawn at random for that
annotator and pair, and answers: which is preferred, a 1-5 confidence, which is more useful, and
which has more social presence. Pairs are handed out so that each gets ``annotators_per_pair``
judgements (7 in the paper), fewest-judged first. Everything lives in SQLite (WAL mode, one
transaction per answer), so a restart loses nothing.

Export: per pair the majority vote of its annotators (an even split counts half to each side),
then win rates per system pair and task type with percentile bootstrap intervals over pairs, as
CSV, Markdown and a bar chart.

Keeping the study sound over HTTP: annotators sign in with a participant token issued by the
study owner (``personafuse annotate tokens``; only its SHA-256 is stored), so an identity cannot
be typed in by someone else; each participant holds at most one open pair, so ``/api/next``
cannot lock pairs away from others; ``/api/summary`` (systems and running votes) needs the owner
key; and writes accept JSON bodies only.
"""

from __future__ import annotations

import csv
import hashlib
import json
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

# Module level, not inside create_annotation_app: FastAPI resolves the (postponed) annotations of
# the route functions from this module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from personafuse.serving.schemas import BadRequest, check_tree, parse_json

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
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AnnotationError(f"{f}:{n}: not JSON ({e})") from None
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


# ---------------------------------------------------------------------- results
def pair_outcomes(store: AnnotationStore) -> list[dict[str, Any]]:
    """Majority vote per pair and criterion: score of system_1 is 1 (won), 0.5 (even split) or 0."""
    votes: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for j in store.judgements():
        votes[j["pair_id"]].append(j)
    out = []
    for pid, js in votes.items():
        j0 = js[0]
        row = {"pair_id": pid, "prompt_id": j0["prompt_id"], "task": j0["task"], "system_1": j0["system_1"],
               "system_2": j0["system_2"], "annotators": len(js),
               "mean_confidence": sum(j["confidence"] for j in js) / len(js)}
        for c in CRITERIA:
            n1 = sum(j[c] == j0["system_1"] for j in js)
            row[c] = 1.0 if n1 * 2 > len(js) else 0.5 if n1 * 2 == len(js) else 0.0
        out.append(row)
    return out


def win_rates(store: AnnotationStore, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for o in pair_outcomes(store):
        for task in (o["task"], "all") if o["task"] != "all" else ("all",):
            groups[(o["system_1"], o["system_2"], task)].append(o)
    rng = np.random.default_rng(seed)
    rows = []
    for (s1, s2, task), outs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] == "all", kv[0][2])):
        for c in CRITERIA:
            scores = np.array([o[c] for o in outs])
            boots = scores[rng.integers(0, len(scores), size=(n_boot, len(scores)))].mean(1)
            rows.append({
                "system": s1, "opponent": s2, "task": task, "criterion": c, "pairs": len(scores),
                "wins": int((scores == 1).sum()), "ties": int((scores == 0.5).sum()), "losses": int((scores == 0).sum()),
                "win_rate": float(scores.mean()), "ci_low": float(np.percentile(boots, 2.5)),
                "ci_high": float(np.percentile(boots, 97.5)),
                "annotators_per_pair": float(np.mean([o["annotators"] for o in outs])),
                "mean_confidence": float(np.mean([o["mean_confidence"] for o in outs])),
            })
    return rows


def export(store: AnnotationStore, out: str | Path, n_boot: int = 2000, seed: int = 0) -> list[Path]:
    """Write win_rates.csv, win_rates.md, win_rates.png and judgements.csv into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = win_rates(store, n_boot=n_boot, seed=seed)
    fields = ["system", "opponent", "task", "criterion", "pairs", "wins", "ties", "losses", "win_rate", "ci_low",
              "ci_high", "annotators_per_pair", "mean_confidence"]
    csv_path = out / "win_rates.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    judg = store.judgements()
    j_path = out / "judgements.csv"
    with j_path.open("w", newline="") as f:
        cols = ["pair_id", "prompt_id", "task", "system_1", "system_2", "annotator", "preferred", "confidence",
                "usefulness", "social_presence", "a_is_1", "seconds", "created_at"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(judg)
    md = [f"# Human evaluation: win rates (majority vote per pair, {store.annotators_per_pair} annotators wanted per pair)", "",
          "Win rate of *system* against *opponent*; an even split counts as half a win. "
          "95 % intervals: percentile bootstrap over pairs.", ""]
    for c in CRITERIA:
        md += [f"## {CRITERION_LABEL[c]}", "", "| system | opponent | task | pairs | W / T / L | win rate | 95 % CI | annotators per pair | mean confidence |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["criterion"] == c):
            md.append(f"| {r['system']} | {r['opponent']} | {r['task']} | {r['pairs']} | {r['wins']} / {r['ties']} / {r['losses']} "
                      f"| {100 * r['win_rate']:.1f} % | {100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} % "
                      f"| {r['annotators_per_pair']:.1f} | {r['mean_confidence']:.2f} |")
        md.append("")
    md_path = out / "win_rates.md"
    md_path.write_text("\n".join(md))
    png_path = out / "win_rates.png"
    _plot(rows, png_path)
    return [csv_path, md_path, png_path, j_path]


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["system"], r["opponent"], r["task"]) for r in rows}, key=lambda g: (g[0], g[1], g[2] == "all", g[2]))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(groups) + 2), 3.6))
    width = 0.26
    for k, c in enumerate(CRITERIA):
        vals, lo, hi = [], [], []
        for g in groups:
            r = next(r for r in rows if (r["system"], r["opponent"], r["task"]) == g and r["criterion"] == c)
            vals.append(100 * r["win_rate"])
            lo.append(100 * (r["win_rate"] - r["ci_low"]))
            hi.append(100 * (r["ci_high"] - r["win_rate"]))
        xs = [i + (k - 1) * width for i in range(len(groups))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=CRITERION_LABEL[c])
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [f"{s}\nvs {o}\n({t})" for s, o, t in groups], fontsize=8)
    ax.set_ylabel("win rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Pairwise human evaluation (majority vote, 95 % bootstrap CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- web app
# Largest body /api/judgements reads: one judgement is ~200 bytes.
MAX_BODY_BYTES = 64 * 1024


class Refused(Exception):
    """An HTTP error of the annotation app (401, 413, 415, ...), answered in its JSON error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


def _participant(store: AnnotationStore, request: Request) -> str:
    token = _bearer(request)
    who = store.participant(token) if token else None
    if who is None:
        raise Refused(401, "sign in with the participant token the study owner gave you" if not token else "unknown participant token")
    return who


async def _json_body(request: Request) -> dict[str, Any]:
    """A JSON object body. Only ``application/json``: an HTML form or a text/plain post from another
    site (which a browser sends without asking) is refused."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise Refused(415, "send the judgement as JSON (Content-Type: application/json)")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise Refused(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        body = parse_json(raw)
        check_tree(body)
    except BadRequest as e:
        raise AnnotationError(e.message) from None
    if not isinstance(body, dict):
        raise AnnotationError("the request body must be a JSON object")
    return body


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def create_annotation_app(store: AnnotationStore, owner_key: str | None = None) -> FastAPI:
    """The annotation page and its API. ``owner_key`` guards ``/api/summary``; without one a
    random key is made (``app.state.owner_key``; ``personafuse annotate serve`` prints it)."""
    if owner_key is not None and not owner_key.strip():
        raise ValueError("owner_key is empty: give a key, or leave it out to have one made")
    static = Path(__file__).parent / "static"
    app = FastAPI(title="PersonaFuse human evaluation")
    app.state.owner_key = owner_key = owner_key or secrets.token_urlsafe(24)

    @app.exception_handler(AnnotationError)
    async def _bad(_request: Request, exc: AnnotationError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Refused)
    async def _refused(_request: Request, exc: Refused) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(500, "internal error (the details are in the server log)")  # the log has the traceback

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(static / "annotate.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ("annotate.js", "annotate.css"):
            raise Refused(404, "no such file")
        return FileResponse(static / name)

    @app.get("/api/next")
    def next_pair(request: Request) -> dict[str, Any]:
        who = _participant(store, request)
        return {"participant": who, "pair": store.next_pair(who), "progress": store.progress(who)}

    @app.post("/api/judgements")
    async def judge(request: Request) -> dict[str, Any]:
        who = _participant(store, request)
        body = await _json_body(request)
        # The identity is the token's; an "annotator" key (the old page sent one) is ignored.
        store.record(who, body.get("pair_id"), body)  # type: ignore[arg-type]
        return {"participant": who, "pair": store.next_pair(who), "progress": store.progress(who)}

    @app.get("/api/summary")
    def summary(request: Request) -> dict[str, Any]:
        if not secrets.compare_digest(_bearer(request).encode(), owner_key.encode()):
            raise Refused(401, "the summary needs the owner key: send 'Authorization: Bearer <owner key>'")
        return {"pairs": store.count_pairs(), "annotators_per_pair": store.annotators_per_pair,
                "judgements": len(store.judgements()), "outcomes": pair_outcomes(store)}

    return app
