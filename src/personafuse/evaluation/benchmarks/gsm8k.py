"""GSM8K (Cobbe et al. 2021): grade-school maths, exact match of the final number.

Reference: lm-evaluation-harness v0.4.13, task ``gsm8k`` (``lm_eval/tasks/gsm8k/gsm8k.yaml``,
metadata.version 3.0) as ``lm_eval --tasks gsm8k`` runs it: ``num_fewshot: 5`` shots from the
``train`` split, drawn by ``lm_eval/api/samplers.py:ContextSampler.sample`` with the evaluator's
``fewshot_random_seed`` 1234 (``lm_eval/defaults.py:DEFAULT_OTHER_SEED``, set by
``evaluator.py:347 task_obj.set_fewshot_seed``). The prompt template, shot count, stop strings,
both filters' regexes and exact_match's settings are READ from that yaml in the installed lm-eval
at run time (the task's own published file), and applied by our transcription of lm-eval's code:

* shots: one ``random.Random(1234)`` serves every document in test-file order
  (``api/task.py:build_all_requests`` -> ``fewshot_context`` -> ``sampler.sample(n=5,
  eval_doc=None)``: the fewshot split is not the test split), so document *i* gets the *i*-th
  draw of ``rnd.sample(train, 5)`` whatever ``--limit`` or item choice we use (:func:`fewshot_draws`);
* raw prompt (base models, lm-eval's default): ``api/task.py:build_qa_turn`` + ``Message.to_text``,
  each shot ``"Question: q\\nAnswer:" + " " + answer + "\\n\\n"``, then ``"Question: q\\nAnswer:"``;
* chat prompt (``-o gsm8k.chat_template=true``): ``--apply_chat_template --fewshot_as_multiturn``,
  i.e. ``Message.to_dict`` (no delimiters): a user turn per shot question, an assistant turn per
  shot answer, then the question's user turn (no system message: lm-eval sends none by default);
* the router of a PersonaFuse subject reads the item's question alone, not the shots;
* the reply is cut at the first stop string (``until``), as lm-eval's ``generate_until`` does;
* ``score`` = strict-match: ``RegexFilter`` (``lm_eval/filters/extraction.py``, first match of
  ``#### (\\-?[0-9\\.\\,]+)``, else ``[invalid]``) then ``exact_match_hf_evaluate``
  (``lm_eval/api/metrics.py``: ``regexes_to_ignore`` on prediction and target, then lower case), so
  ``#### 18.00`` is wrong for 18 and ``#### 18.`` right;
* ``score_flexible`` = flexible-extract: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, same metric;
* ``score_official`` = the official grader (openai/grade-school-math@3101c7d,
  ``grade_school_math/dataset.py:is_correct``: first ``#### N``, commas removed, string equality).

``-o gsm8k.num_fewshot=0`` runs zero-shot (no train split needed); such a run also reports its
headline as ``score_zero_shot``. Unparsed replies count as wrong in all three scores; items
aggregate by mean with lm-eval's mean_stderr.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from personafuse.evaluation.benchmarks.base import (
    Benchmark,
    Item,
    Reference,
    ScoreContext,
    mean,
    stderr,
    with_router_query,
)
from personafuse.evaluation.data import DataError, field, hub_path, read_jsonl

HUB_ID = "openai/gsm8k"
LM_EVAL_VERSION = "0.4.13"  # the pin these transcriptions were checked against (tests/evaluation/test_eval_parity_*)
TASK_YAML = "gsm8k/gsm8k.yaml"
TASK_VERSION = 3.0
INVALID = "[invalid]"  # lm-eval's RegexFilter fallback
# openai/grade-school-math@3101c7d grade_school_math/dataset.py ANS_RE (the official grader).
OFFICIAL_ANS_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
# lm_eval/defaults.py DEFAULT_OTHER_SEED: simple_evaluate's (and the CLI's) fewshot_random_seed.
FEWSHOT_SEED = 1234


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task yamls, whose ``!function module.name`` tags we only need to record."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


@cache
def read_lm_eval_task(rel: str) -> dict[str, Any]:
    """An lm-eval task yaml (``rel`` under ``lm_eval/tasks/``) from the installed lm-eval, merged
    with the file its ``include:`` names, as lm-eval merges them (the task's keys win)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("lm-eval is not installed: the gsm8k/gpqa protocols read its task files (pip install 'personafuse[eval]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / rel
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506 - SafeLoader subclass
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read lm-eval's task file: {e}") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: not a task config (expected a mapping)")
    if "include" in cfg:
        base = read_lm_eval_task(str(Path(rel).parent / cfg["include"]))
        cfg = {**base, **{k: v for k, v in cfg.items() if k != "include"}}
    cfg["__path__"] = str(path)
    return cfg


def check_task_version(cfg: Mapping[str, Any], want: float) -> None:
    got = (cfg.get("metadata") or {}).get("version")
    if got is None or float(got) != want:
        raise DataError(
            f"{cfg['__path__']}: task version {got!r}, but this protocol reproduces version {want} "
            f"(lm-eval {LM_EVAL_VERSION}; installed: {installed_lm_eval()})"
        )


def installed_lm_eval() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def render(template: str, doc: Mapping[str, Any], where: str) -> str:
    """The task's ``doc_to_text`` Jinja template; these tasks use only ``{{field}}`` substitutions."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in doc:
            raise DataError(f"{where}: the task template needs field {name!r}")
        return str(doc[name])

    out = re.sub(r"\{\{\s*(\w+)\s*\}\}", sub, template)
    if "{{" in out or "{%" in out:
        raise DataError(f"{where}: template {template!r} uses Jinja beyond {{{{field}}}}")
    return out


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """lm-eval's generate_until: the continuation ends before the first occurrence of each stop."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def regex_filter(resp: str, pattern: str, group_select: int = 0, fallback: str = INVALID) -> str:
    """lm_eval/filters/extraction.py ``RegexFilter.apply`` for one reply (v0.4.13)."""
    found = re.findall(pattern, resp if isinstance(resp, str) else "")
    if not found:
        return fallback
    match = found[group_select]
    if isinstance(match, tuple):  # several groups: the first non-empty one
        nonempty = [m for m in match if m]
        match = nonempty[0] if nonempty else fallback
    return match.strip()


def exact_match(pred: str, ref: str, *, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False, ignore_punctuation: bool = False) -> float:
    """lm_eval/api/metrics.py ``exact_match_hf_evaluate`` for one pair (v0.4.13)."""
    import string

    for s in regexes_to_ignore:
        pred, ref = re.sub(s, "", pred), re.sub(s, "", ref)
    if ignore_case:
        pred, ref = pred.lower(), ref.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        pred, ref = pred.translate(table), ref.translate(table)
    return float(pred == ref)


def official_extract(completion: str) -> str:
    """openai/grade-school-math@3101c7d grade_school_math/dataset.py ``extract_answer``."""
    m = OFFICIAL_ANS_RE.search(completion)
    return m.group(1).strip().replace(",", "") if m else INVALID


def gold_number(answer: str) -> str:
    if "####" not in answer:
        raise ValueError("answer has no '#### N' line")
    return answer.split("####")[-1].strip()


def _filters(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{filter name: RegexFilter kwargs}`` from the task's ``filter_list`` (regex then take_first)."""
    out = {}
    for f in cfg.get("filter_list") or []:
        steps = f.get("filter") or []
        if not steps or steps[0].get("function") not in ("regex", "multi_choice_regex"):
            raise DataError(f"{cfg['__path__']}: filter {f.get('name')!r} does not start with a regex step")
        out[f["name"]] = {k: v for k, v in steps[0].items() if k != "function"}
    return out


def _metric(cfg: Mapping[str, Any]) -> dict[str, Any]:
    m = next((m for m in cfg.get("metric_list") or [] if m.get("metric") == "exact_match"), None)
    if m is None:
        raise DataError(f"{cfg['__path__']}: no exact_match metric")
    return {k: m[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation") if k in m}


def fewshot_draws(pool_size: int, n_docs: int, k: int, seed: int = FEWSHOT_SEED) -> list[list[int]]:
    """Indices into the fewshot split of the shots of test documents ``0 .. n_docs-1``, as lm-eval
    0.4.13 draws them in a full run: ``ContextSampler`` holds one ``Random(seed)``
    (``api/samplers.py:ContextSampler.set_rnd``) and ``sample(n, eval_doc=None)`` calls
    ``self.rnd.sample(self.fewshot_docs(), n)`` once per document, in test order
    (``api/task.py:build_all_requests`` -> ``fewshot_context``). ``Random.sample`` consumes the
    generator by the pool's length only, so sampling indices draws the same documents."""
    rnd = random.Random(seed)
    return [rnd.sample(range(pool_size), k) for _ in range(n_docs)]


def fewshot_messages(cfg: Mapping[str, Any], shots: Sequence[Mapping[str, Any]], doc: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """``--apply_chat_template --fewshot_as_multiturn``: ``api/task.py:fewshot_context`` builds
    ``build_qa_turn`` messages and hands ``Message.to_dict`` (content only, no delimiters) of each to
    the chat template: user/assistant per shot, then the question."""
    msgs: list[dict[str, str]] = []
    for shot in shots:
        msgs.append({"role": "user", "content": render(cfg["doc_to_text"], shot, where)})
        msgs.append({"role": "assistant", "content": render(cfg["doc_to_target"], shot, where)})
    msgs.append({"role": "user", "content": render(cfg["doc_to_text"], doc, where)})
    return msgs


def fewshot_text(cfg: Mapping[str, Any], shots: Sequence[Mapping[str, Any]], doc: Mapping[str, Any], where: str) -> str:
    """The raw context: ``Message.to_text`` of the same turns, i.e. each shot question followed by
    ``target_delimiter`` (" "), each shot answer by ``fewshot_delimiter`` ("\\n\\n"), the
    question by nothing (lm-eval's defaults; the gsm8k yaml sets neither)."""
    msgs = fewshot_messages(cfg, shots, doc, where)
    delims = [" " if m["role"] == "user" else "\n\n" for m in msgs[:-1]] + [""]
    return "".join(m["content"] + d for m, d in zip(msgs, delims, strict=True))


class GSM8K(Benchmark):
    # The reference prompts a raw completion (no chat template); -o gsm8k.chat_template=true for a chat model.
    chat_template = False
    name = "gsm8k"
    title = "GSM8K"
    score_variants = ("score_flexible", "score_official")
    group = "General intelligence and safety"
    order = 60
    folder = "gsm8k"
    max_new_tokens = 256  # lm-eval's generate_until default max_gen_toks (the yaml sets none)
    reference = Reference(
        repo="EleutherAI/lm-evaluation-harness",
        commit=f"v{LM_EVAL_VERSION}",
        files=("lm_eval/tasks/gsm8k/gsm8k.yaml", "lm_eval/filters/extraction.py", "lm_eval/api/metrics.py"),
        task="gsm8k@3.0",
        note="num_fewshot=5 from train, fewshot_random_seed=1234; score=strict-match, score_flexible=flexible-extract, score_official="
        "openai/grade-school-math@3101c7d grade_school_math/dataset.py:is_correct",
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.cfg = read_lm_eval_task(TASK_YAML)
        check_task_version(self.cfg, TASK_VERSION)
        self.filters = _filters(self.cfg)
        self.metric = _metric(self.cfg)
        self.until = list((self.cfg.get("generation_kwargs") or {}).get("until") or [])
        self.num_fewshot = int(self.options.get("num_fewshot", self.cfg.get("num_fewshot") or 0))
        if self.num_fewshot < 0:
            raise ValueError(f"-o gsm8k.num_fewshot: expected 0 or more, got {self.num_fewshot}")

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "lm_eval_task_file": self.cfg["__path__"],
            "lm_eval_installed": installed_lm_eval(),
            "task_version": self.cfg["metadata"]["version"],
            "num_fewshot": self.num_fewshot,
            "fewshot_split": self.cfg.get("fewshot_split") if self.num_fewshot else None,
            "fewshot_random_seed": FEWSHOT_SEED if self.num_fewshot else None,
            "fewshot_as_multiturn": bool(self.num_fewshot and self.chat_template),
            "router_query": "the item's question field alone (no shots, no template)",
            "prompt_template": self.cfg["doc_to_text"],
            "until": self.until,
            "filters": self.filters,
            "metric": self.metric,
            "system_prompt": None,
            "temperature": 0.0,
        }

    def _rows(self, source: Path | None, split: str) -> tuple[list[dict[str, Any]], Any]:
        """One split's rows (``__line__`` numbered) and where they came from: ``split.jsonl`` in
        the folder (or beside the given test file), else the Hub."""
        if source is None:
            from datasets import load_dataset

            ds = load_dataset(hub_path(HUB_ID), "main", split=split)
            return [dict(r, __line__=i + 1) for i, r in enumerate(ds)], f"{HUB_ID}:{split}"
        if source.is_dir():
            path = source / f"{split}.jsonl"
        else:
            path = source if split == "test" else source.with_name(f"{split}.jsonl")
        if split != "test" and not path.is_file():
            raise DataError(
                f"gsm8k: {path} not found: {self.num_fewshot}-shot GSM8K (lm-eval's protocol) draws its "
                f"shots from the train split; put train.jsonl beside test.jsonl or run -o gsm8k.num_fewshot=0"
            )
        return read_jsonl(path), path

    def _checked(self, rows: Sequence[dict[str, Any]], path: Any) -> None:
        for row in rows:
            field(row, "question", path, kind=str)  # checked here: the template reads it
            a = field(row, "answer", path, kind=str)
            try:
                gold_number(a)
            except ValueError:
                raise DataError(f"{path}:{row['__line__']}: field 'answer' has no '#### N' final line") from None

    def load_items(self, source: Path | None) -> list[Item]:
        rows, path = self._rows(source, "test")
        self._checked(rows, path)
        train: list[dict[str, Any]] = []
        draws: list[list[int]] = [[] for _ in rows]
        if self.num_fewshot:
            train, train_path = self._rows(source, str(self.cfg.get("fewshot_split") or "train"))
            self._checked(train, train_path)
            if len(train) < self.num_fewshot:
                raise DataError(f"gsm8k: {train_path} has {len(train)} examples, fewer than {self.num_fewshot} shots")
            draws = fewshot_draws(len(train), len(rows), self.num_fewshot)
        items = []
        for i, row in enumerate(rows):
            where = f"{path}:{row['__line__']}"
            shots = [train[j] for j in draws[i]]
            prompt: Any = fewshot_messages(self.cfg, shots, row, where) if self.chat_template else fewshot_text(self.cfg, shots, row, where)
            meta = {"answer": row["answer"], "doc_index": i, "shots": [train[j]["__line__"] for j in draws[i]]}
            items.append(Item(id=str(row.get("id", row["__line__"])), prompt=with_router_query(prompt, row["question"]), reference=gold_number(row["answer"]), meta=meta))
        return items

    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        reply = cut_at_stops(responses[0], self.until)
        # lm-eval's target is the whole answer text (doc_to_target); "(?s).*#### " strips the working.
        target = item.meta.get("answer", f"#### {item.reference}")
        out: dict[str, Any] = {"gold": item.reference}
        for key, name in (("score", "strict-match"), ("score_flexible", "flexible-extract")):
            f = self.filters[name]
            pred = regex_filter(reply, f["regex_pattern"], int(f.get("group_select", 0)))
            out[key] = exact_match(pred, target, **self.metric)
            out["parsed" if key == "score" else "parsed_flexible"] = None if pred == INVALID else pred
        got = official_extract(reply)
        out["parsed_official"] = None if got == INVALID else got
        out["score_official"] = float(got == official_extract(target))
        return out

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out = super().aggregate(records)
        for key in ("score_flexible", "score_official"):
            xs = [float(r.get(key) or 0.0) for r in records]
            out[key], out[key.replace("score", "stderr")] = mean(xs), stderr(xs)
        out["n_unparsed_flexible"] = sum(1 for r in records if r.get("parsed_flexible") is None)
        out["score_variant"] = f"strict-match, {self.num_fewshot}-shot"
        if self.num_fewshot == 0:
            out["score_zero_shot"], out["stderr_zero_shot"] = out["score"], out["stderr"]
        return out
