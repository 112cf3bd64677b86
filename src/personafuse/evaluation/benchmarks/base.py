"""What every benchmark provides: a loader, prompts, a parser/scorer per item and an aggregate.

The runner only talks to this interface, so a new benchmark is one module with one subclass.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from personafuse.chat import RawPrompt
from personafuse.evaluation.data import DataError, find_benchdata, hub_allowed

# A prompt is either a plain user message or a full chat (list of {"role", "content"}).
Prompt = str | list[dict[str, str]]


class _QueryText(str):
    router_query: str


class _QueryChat(list):  # type: ignore[type-arg]
    router_query: str


def with_router_query(prompt: Any, query: str) -> Any:
    """``prompt`` (text, RawPrompt or chat) carrying the text a PersonaFuse subject's router reads
    instead of the whole prompt (GSM8K: the question, not its five shots). It still is a plain
    str/list for everything else (JSON records, prompt hashes, other subjects)."""
    if isinstance(prompt, RawPrompt):
        out: Any = RawPrompt(prompt)  # str subclasses take attributes
    elif isinstance(prompt, str):
        out = _QueryText(prompt)
    else:
        out = _QueryChat(prompt)
    out.router_query = query
    return out


def subject_model(options: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(the ``--model`` spec, whether it runs locally) from the ``subject`` the runner passes in a
    benchmark's options; (None, False) when the benchmark is built outside a run."""
    subj = options.get("subject") or {}
    model = subj.get("model") if isinstance(subj, Mapping) else None
    if not model:
        return None, False
    from personafuse.backends import model_backend

    return str(model), model_backend(str(model)).capabilities.placement


def router_query(prompt: Any) -> str | None:
    """The router text a benchmark attached with :func:`with_router_query`, else None."""
    return getattr(prompt, "router_query", None)


@dataclass(frozen=True)
class Reference:
    """The implementation a benchmark's default protocol reproduces: a repository at a pinned commit
    (the authors' own, or lm-evaluation-harness for the tasks where it is the standard) and the files
    read to write ours. ``task`` names an lm-eval task and its version (``gsm8k@3``)."""

    repo: str
    commit: str
    files: tuple[str, ...] = ()
    task: str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "commit": self.commit, "files": list(self.files), "task": self.task, "note": self.note}


@dataclass
class Item:
    """One benchmark question. ``reference`` is whatever the scorer needs; ``categories`` maps a
    breakdown name (``category``, ``task``, ``ability`` ...) to this item's value for it."""

    id: str
    prompt: Prompt
    reference: Any = None
    categories: dict[str, str | list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreContext:
    """Shared scoring resources, created lazily by the runner: an LLM judge and a sentence embedder."""

    judge: Any = None  # a Subject used as judge (see judges.py)
    embedder: Any = None  # personafuse.evaluation.embedding.SentenceEmbedder
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


class Benchmark:
    """Base class. Subclasses set ``name``, ``max_new_tokens`` and implement ``load_items`` and
    ``score_item``; override ``prompts`` for several generations per item (ToMBench) and
    ``aggregate`` for a non-mean score."""

    name: str = ""
    title: str = ""  # how tables, figures and summaries name it
    aliases: tuple[str, ...] = ()  # other spellings --benchmarks accepts (lower case)
    max_new_tokens: int = 256
    needs_judge: bool = False
    needs_embedder: bool = False
    # EQ-Bench's retry rule: regenerate an unparseable answer with a rising temperature, attempt k
    # (k >= 2) sampling at retry_temperature[0] + retry_temperature[1] * (k - 1).
    max_attempts: int = 1
    retry_temperature: tuple[float, float] = (0.01, 0.15)
    # What the report, the grid's plan and the CLI read (evaluation/report.py, reproduce/plan.py):
    # the reported fields of the result block, headline first (the report's columns) ...
    subscores: tuple[str, ...] = ("score",)
    # ... the other variants of the score on the same replies (``personafuse eval``'s summary) ...
    score_variants: tuple[str, ...] = ()
    # ... the figure it is drawn in (paper Figures 5-7) and its place in tables and figures ...
    group: str = "Other benchmarks"
    order: int = 1000
    # ... the requests one item costs: generations (ToMBench: five shuffles) and judge calls ...
    generations_per_item: int = 1
    judge_calls_per_item: int = 0
    # ... the options the grid's paired bootstrap adds when it re-aggregates item records ...
    resample_options: Mapping[str, Any] = MappingProxyType({})
    # ... whether the grid evaluates it when eval.benchmarks is not set ...
    grid_default: bool = False
    # ... and its own rule that marks a whole run failed (``failed: true`` in its block), as the
    # report explains it; "" when it has none.
    fail_rule: str = ""
    # Multiply mean item scores by this for the headline (e.g. SafetyBench reports percent).
    score_scale: float = 1.0
    # Folder name inside a benchdata-like directory.
    folder: str = ""
    # The implementation the default protocol reproduces (recorded in every results.json).
    reference: Reference | None = None
    # Whether prompts go through the subject's chat template (True) or are sent as raw completion
    # text (False, personafuse.chat.RawPrompt), as the reference sends them; -o NAME.chat_template=.
    chat_template: bool = True
    # A Hub dataset that asks for access (its terms accepted on its page, then HF_TOKEN) before its
    # files download; None: public. Read by the reproduce grid's preflight check.
    gated: str | None = None

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        if "max_new_tokens" in self.options:  # e.g. -o gsm8k.max_new_tokens=128
            self.max_new_tokens = int(self.options["max_new_tokens"])
        if "chat_template" in self.options:  # e.g. -o gsm8k.chat_template=true for a chat model
            self.chat_template = _flag(self.options["chat_template"], f"{self.name}.chat_template")

    # ---- data -------------------------------------------------------------------------
    def resolve_source(self, data: str | Path | None) -> Path | None:
        """A file or folder for this benchmark: ``data`` may be a benchdata-like root (we take its
        ``self.folder``), the benchmark's own folder, or one file. ``None`` means "use the Hub"."""
        if data is not None:
            p = Path(data)
            if not p.exists():
                raise DataError(f"{p}: no such file or folder (given as data for {self.name})")
            if p.is_dir() and self.folder and (p / self.folder).is_dir():
                return p / self.folder
            return p
        root = find_benchdata()
        if root is not None and self.folder and (root / self.folder).is_dir():
            return root / self.folder
        return None

    def load_items(self, source: Path | None) -> list[Item]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, data: str | Path | None = None) -> list[Item]:
        src = self.resolve_source(data)
        if src is None and not hub_allowed():
            raise DataError(
                f"{self.name}: no local data found and the Hub is off (HF_HUB_OFFLINE=1); pass --data "
                f"pointing at a folder with '{self.folder}/' or at the benchmark's file"
            )
        items = self.load_items(src)
        if not items:
            raise DataError(f"{self.name}: {src or 'the Hub'} gave no items")
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{self.name}: duplicate item id {dup!r} in {src}")
        return items

    # ---- generation -------------------------------------------------------------------
    def prompts(self, item: Item) -> list[Prompt]:
        return [item.prompt]

    def send(self, prompt: Prompt) -> Prompt:
        """The prompt as the subject receives it: raw completion text where the protocol says so."""
        if not self.chat_template:
            if not isinstance(prompt, str):
                raise ValueError(f"{self.name}: a raw-completion protocol needs text prompts, got a chat")
            q = router_query(prompt)
            return RawPrompt(prompt) if q is None else with_router_query(RawPrompt(prompt), q)
        return prompt

    # ---- protocol ---------------------------------------------------------------------
    def protocol_extra(self) -> dict[str, Any]:
        """Benchmark-specific protocol facts (system prompt source, shots, answer format...)."""
        return {}

    def protocol(self) -> dict[str, Any]:
        """What produced a run's replies and scores: recorded in results.json so a reader can tell
        whether two runs are comparable and ``--rescore`` can refuse replies to other prompts."""
        return {
            "reference": self.reference.to_dict() if self.reference else None,
            "max_new_tokens": self.max_new_tokens,
            "max_attempts": self.max_attempts,
            "chat_template": self.chat_template,
            **self.protocol_extra(),
        }

    # ---- scoring ----------------------------------------------------------------------
    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        """Return at least ``parsed`` and ``score`` (``None`` when unscorable). Extra keys are kept
        in the per-item JSONL record."""
        raise NotImplementedError  # pragma: no cover

    def score_batch(self, items: Sequence[Item], responses: Sequence[Sequence[str]], ctx: ScoreContext) -> list[dict[str, Any]]:
        return [self.score_item(it, rs, ctx) for it, rs in zip(items, responses, strict=True)]

    def needs_retry(self, record: Mapping[str, Any]) -> bool:
        return False

    def retry_temperature_of(self, attempt: int) -> float:
        """The sampling temperature of retry ``attempt`` (2, 3, ...)."""
        start, step = self.retry_temperature
        return start + step * (attempt - 1)

    def partial(self, record: Mapping[str, Any]) -> bool:
        """A failed attempt that still holds a partial result, kept if no later attempt succeeds
        (EQ-Bench with revision: the reference stores the first such result)."""
        return False

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Mean item score (unscorable items count as 0 unless the benchmark says otherwise) plus a
        breakdown per category key."""
        xs = [_num(r.get("score")) for r in records]
        out: dict[str, Any] = {"score": mean(xs) * self.score_scale, "stderr": stderr(xs) * self.score_scale}
        out["n"] = len(records)
        out["n_unparsed"] = sum(1 for r in records if r.get("parsed") is None)
        out.update(self.breakdowns(records))
        return out

    def breakdowns(self, records: Sequence[Mapping[str, Any]], key: str = "score") -> dict[str, Any]:
        groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            for cat, val in (r.get("categories") or {}).items():
                for v in val if isinstance(val, list) else [val]:
                    groups[cat][str(v)].append(_num(r.get(key)))
        return {
            f"by_{cat}": {v: round(mean(xs) * self.score_scale, 6) for v, xs in sorted(vals.items())}
            for cat, vals in groups.items()
        }


def _flag(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"-o {what}: expected true or false, got {v!r}")


def _num(v: Any) -> float:
    if v is None:
        return 0.0
    if isinstance(v, bool):
        return float(v)
    return float(v)


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for no items (an empty breakdown scores nothing, it does not fail)."""
    return statistics.fmean(xs) if xs else 0.0


def stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean as lm-eval reports it (lm_eval/api/metrics.py ``mean_stderr``:
    sample standard deviation with n - 1, over sqrt(n)); 0.0 below two items."""
    if len(xs) < 2:
        return 0.0
    return statistics.stdev(xs) / math.sqrt(len(xs))


def prompt_hash(prompts: Sequence[Any]) -> str:
    """A short, order-sensitive digest of the prompts a run sent (recorded in its protocol)."""
    blob = json.dumps(list(prompts), ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


_mean = mean  # old private name, kept until every benchmark module imports ``mean``
