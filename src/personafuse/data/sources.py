"""Query sources: the bundled seed set, local files with a field mapping, and Hub dataset adapters.

Every source yields :class:`Query` objects. Errors about the input name the file and the line (or
row) so a bad file can be fixed without guesswork.

Hub adapters (``sharegpt``, ``wildchat``, ``personahub``, ``infinity``) take either a Hub id (read
with ``datasets`` in streaming mode) or a local file of the same shape (JSONL/JSON/Parquet), so they
can be tested and used offline. They keep the first user turn, filter by language and length,
de-duplicate by normalised text and sample with a seed.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import io
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personafuse.configs import default
from personafuse.data.source_options import SourceOptions as S
from personafuse.fileio import read_jsonl


class SourceError(ValueError):
    """Bad query source: missing file, wrong field mapping, empty source, unreadable line."""


@dataclass
class Query:
    text: str
    situation: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return query_id(self.text)


def normalise_query(text: str) -> str:
    """The form used for ids and de-duplication: NFKC, case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def query_id(text: str) -> str:
    return hashlib.sha256(normalise_query(text).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------- raw row reading

def _format_of(path: Path) -> str:
    name = path.name.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"),
                     (".tsv", "tsv"), (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(ext):
            return fmt
    raise SourceError(f"{path}: unknown file type; expected one of .jsonl .json .csv .tsv .parquet")


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` pairs; ``where`` is ``"file:line N"`` (or ``row N`` for Parquet/JSON)."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: file not found")
    if path.is_dir():
        raise SourceError(f"{path}: is a folder; pass a file")
    fmt = _format_of(path)
    if fmt == "jsonl":
        # strict: a query file cut short is lost data, not a torn write of ours to skip
        for n, row in read_jsonl(path, error=SourceError, strict=True):
            yield f"{path}:{n}", row
    elif fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):  # {"data": [...]} style
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise SourceError(f"{path}: expected a JSON list of objects")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise SourceError(f"{path}: item {i}: expected an object, got {type(row).__name__}")
            yield f"{path}: item {i}", row
    elif fmt in ("csv", "tsv"):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise SourceError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    raise SourceError(f"{path}:{reader.line_num}: more cells than header columns")
                yield f"{path}:{reader.line_num}", dict(row)
        except csv.Error as e:
            raise SourceError(f"{path}:{reader.line_num}: unreadable CSV ({e})") from None
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise SourceError(f"{path}: unreadable Parquet ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}: row {i}", row


def _get(row: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = row
    for part in dotted.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(part)
    return cur


# ---------------------------------------------------------------------------------------- sources


def seed_queries() -> list[Query]:
    """The bundled seed set (written for this project; tagged by situation)."""
    res = importlib.resources.files("personafuse.data") / "seeds" / "seed_queries.jsonl"
    with importlib.resources.as_file(res) as path:
        return [Query(row["query"], row["situation"], "seeds", {"line": n})
                for n, row in read_jsonl(path, error=SourceError, strict=True)]


def file_queries(path: str | Path, mapping: Mapping[str, str] | None = None) -> list[Query]:
    """Queries from a local JSONL/JSON/CSV/TSV/Parquet file.

    ``mapping`` maps our fields to the file's columns: ``{"query": "instruction",
    "situation": "category"}``; dotted paths reach into nested objects (``"messages.0.content"``).
    Without a mapping the query column is the first of ``query``, ``prompt``, ``instruction``,
    ``question``, ``text`` that the first row has.
    """
    mapping = dict(mapping or {})
    unknown = set(mapping) - {"query", "situation", "id"}
    if unknown:
        raise SourceError(f"unknown field mapping key(s) {sorted(unknown)}; use query=COL, situation=COL")
    out: list[Query] = []
    qcol = mapping.get("query")
    for where, row in read_rows(path):
        if qcol is None:
            qcol = next((c for c in ("query", "prompt", "instruction", "question", "text") if c in row), None)
            if qcol is None:
                raise SourceError(
                    f"{where}: no query column found (looked for query, prompt, instruction, question, text; "
                    f"the row has {', '.join(map(str, row)) or 'no fields'}); pass --field query=COLUMN"
                )
        try:
            text = _get(row, qcol)
        except KeyError:
            raise SourceError(
                f"{where}: field {qcol!r} not found (mapping query={qcol}); the row has {', '.join(map(str, row))}"
            ) from None
        if not isinstance(text, str):
            raise SourceError(f"{where}: field {qcol!r} is {type(text).__name__}, expected text")
        if not text.strip():
            raise SourceError(f"{where}: field {qcol!r} is empty")
        situation = None
        if "situation" in mapping:
            try:
                situation = _get(row, mapping["situation"])
            except KeyError:
                raise SourceError(
                    f"{where}: field {mapping['situation']!r} not found (mapping situation=...); "
                    f"the row has {', '.join(map(str, row))}"
                ) from None
            situation = None if situation is None else str(situation)
        elif isinstance(row.get("situation"), str):
            situation = row["situation"]
        out.append(Query(text.strip(), situation, str(path), {"where": where}))
    if not out:
        raise SourceError(f"{path}: no queries (the file has no rows)")
    return out


# ----------------------------------------------------------------------------------- hub adapters

HUB_DEFAULTS: dict[str, dict[str, str | None]] = {
    "sharegpt": {"repo": "RyokoAI/ShareGPT52K", "config": None, "split": "train"},
    "wildchat": {"repo": "allenai/WildChat-1M", "config": None, "split": "train"},
    "personahub": {"repo": "proj-persona/PersonaHub", "config": "instruction", "split": "train"},
    "infinity": {"repo": "BAAI/Infinity-Instruct", "config": "0625", "split": "train"},
}
_HUMAN = {"human", "user", "prompter"}
_LANG_NAMES = {"en": "english", "zh": "chinese", "fr": "french", "de": "german", "es": "spanish"}


def _first_user_turn(turns: Any) -> str | None:
    if isinstance(turns, str):  # some dumps store the conversation as a JSON string
        try:
            turns = json.loads(turns)
        except ValueError:
            return None
    if not isinstance(turns, list):
        return None
    for t in turns:
        if not isinstance(t, Mapping):
            continue
        role = str(t.get("from") or t.get("role") or "").lower()
        if role in _HUMAN:
            text = t.get("value") if t.get("value") is not None else t.get("content", t.get("text"))
            return text if isinstance(text, str) else None
    return None


def _sharegpt(row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    turns = next((row[k] for k in ("conversations", "items", "conversation", "messages") if k in row), None)
    return _first_user_turn(turns), None


def _wildchat(row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    if row.get("toxic") is True or row.get("redacted") is True:
        return None, None
    turns = row.get("conversation") or row.get("messages")
    return _first_user_turn(turns), row.get("language") if isinstance(row.get("language"), str) else None


def _personahub(row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    for k in ("synthesized text", "synthesized_text", "prompt", "instruction", "input"):
        if isinstance(row.get(k), str):
            return row[k], None
    return None, None


def _infinity(row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    turns = row.get("conversations") or row.get("messages")
    lang = row.get("langdetect") or row.get("lang")
    return _first_user_turn(turns), lang if isinstance(lang, str) else None


ADAPTERS: dict[str, Callable[[Mapping[str, Any]], tuple[str | None, str | None]]] = {
    "sharegpt": _sharegpt,
    "wildchat": _wildchat,
    "personahub": _personahub,
    "infinity": _infinity,
}


def looks_like(text: str, lang: str) -> bool:
    """Cheap script check used when a row has no language field: share of Latin letters for
    ``en`` and other Latin-script languages, share of CJK characters for ``zh``."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    if lang == "zh":
        return sum("\u4e00" <= c <= "\u9fff" for c in letters) / len(letters) >= 0.5
    return sum(c.isascii() or "\u00c0" <= c <= "\u024f" for c in letters) / len(letters) >= 0.9


def _lang_ok(text: str, row_lang: str | None, lang: str | None) -> bool:
    if lang is None:
        return True
    if row_lang:
        rl = row_lang.strip().lower()
        return rl == lang.lower() or rl == _LANG_NAMES.get(lang.lower(), "") or rl.startswith(lang.lower() + "-")
    return looks_like(text, lang.lower())


@dataclass
class HubStats:
    seen: int = 0
    no_user_turn: int = 0
    wrong_language: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    kept: int = 0


def hub_queries(
    kind: str,
    id_or_path: str | None = None,
    *,
    limit: int | None = default(S, "limit"),
    lang: str | None = default(S, "lang"),
    min_chars: int = default(S, "min_chars"),
    max_chars: int = default(S, "max_chars"),
    seed: int = default(S, "seed"),
    config: str | None = default(S, "config"),
    split: str | None = default(S, "split"),
    buffer_size: int = 10_000,
    stats: HubStats | None = None,
) -> list[Query]:
    """Sample up to ``limit`` queries from a Hub dataset (or a local file of the same shape)."""
    if kind not in ADAPTERS:
        raise SourceError(f"unknown dataset adapter {kind!r}; known: {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[kind]
    stats = stats if stats is not None else HubStats()
    defaults = HUB_DEFAULTS[kind]
    target = id_or_path or str(defaults["repo"])
    # A file is read directly; a folder (e.g. a downloaded Hub snapshot) or a Hub id goes through datasets.
    local = Path(target).is_file() or Path(target).suffix.lower() in {".jsonl", ".json", ".parquet", ".ndjson"}
    rows: Iterable[tuple[str, Mapping[str, Any]]]
    if local:
        all_rows = list(read_rows(target))
        random.Random(seed).shuffle(all_rows)  # seeded sample of a local file
        rows = all_rows
    else:
        rows = _stream_hub(target, config or defaults["config"], split or defaults["split"] or "train", seed, buffer_size)
    out: list[Query] = []
    seen_ids: set[str] = set()
    for where, row in rows:
        stats.seen += 1
        text, row_lang = adapter(row)
        if not text or not text.strip():
            stats.no_user_turn += 1
            continue
        text = text.strip()
        if len(text) < min_chars:
            stats.too_short += 1
            continue
        if len(text) > max_chars:
            stats.too_long += 1
            continue
        if not _lang_ok(text, row_lang, lang):
            stats.wrong_language += 1
            continue
        qid = query_id(text)
        if qid in seen_ids:
            stats.duplicates += 1
            continue
        seen_ids.add(qid)
        out.append(Query(text, None, f"{kind}:{target}", {"where": where}))
        stats.kept += 1
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise SourceError(
            f"{kind} source {target}: no usable queries ({stats.seen} rows read: {stats.no_user_turn} without a "
            f"user turn, {stats.wrong_language} wrong language, {stats.too_short} too short, {stats.too_long} too long)"
        )
    return out


def _stream_hub(repo: str, config: str | None, split: str, seed: int, buffer_size: int) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core extra
        raise SourceError("Hub sources need the 'datasets' package: pip install 'personafuse[data]'") from None
    try:
        ds = datasets.load_dataset(repo, config, split=split, streaming=True)
    except Exception as e:  # offline, unknown repo, gated dataset ...
        raise SourceError(f"could not open Hub dataset {repo!r} (config {config}, split {split}): {e}") from None
    ds = ds.shuffle(seed=seed, buffer_size=buffer_size)  # seeded sample of a stream
    for i, row in enumerate(ds):
        yield f"{repo}: row {i}", row


# ------------------------------------------------------------------------------------ source specs


def parse_fields(fields: Iterable[str]) -> dict[str, str]:
    """``["query=instruction", "situation=category"]`` -> mapping."""
    out = {}
    for f in fields:
        if "=" not in f:
            raise SourceError(f"--field {f!r}: expected NAME=COLUMN, e.g. query=instruction")
        k, v = f.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_source(
    spec: str,
    *,
    fields: Mapping[str, str] | None = None,
    limit: int | None = default(S, "limit"),
    shuffle: bool = default(S, "shuffle"),
    seed: int = default(S, "seed"),
    lang: str | None = default(S, "lang"),
    min_chars: int = default(S, "min_chars"),
    max_chars: int = default(S, "max_chars"),
    config: str | None = default(S, "config"),
    split: str | None = default(S, "split"),
) -> list[Query]:
    """Resolve a ``--source`` spec: ``seeds``, ``file:PATH`` (or a bare path), ``KIND[:ID_OR_PATH]``."""
    kind, _, rest = spec.partition(":")
    if spec == "seeds":
        queries = seed_queries()
    elif kind in ADAPTERS:
        return hub_queries(kind, rest or None, limit=limit, lang=lang, min_chars=min_chars, max_chars=max_chars,
                           seed=seed, config=config, split=split)
    elif kind == "file":
        queries = file_queries(rest, fields)
    elif Path(spec).suffix:
        queries = file_queries(spec, fields)
    else:
        raise SourceError(
            f"unknown source {spec!r}; use seeds, file:PATH, or one of {', '.join(ADAPTERS)} with :HUB_ID or :PATH"
        )
    if shuffle:
        random.Random(seed).shuffle(queries)
    return queries[:limit] if limit is not None else queries
