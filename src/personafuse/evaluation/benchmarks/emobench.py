"""EmoBench (Sabour et al. 2024): emotional understanding (EU) and emotional application (EA).

Reference: Sahandfer/EmoBench@3b4f84312541f8469e909965e1fff3691ef85c62, the ``src/`` harness (its
README's usage, ``python src/main.py``, is the current protocol; the older top-level ``evaluate.py``
is gone from that commit): ``src/model.py`` (``LLM.init_prompt``, ``LLM.gen_response``),
``src/utils.py`` (``get_response_format``, ``parse_json_response``), ``src/data.py``
(``DataLoader.rank_choices``, ``generate_responses``, ``evaluate_results``) and
``src/configs/prompts.yaml`` / ``response.yaml``. The default protocol is theirs:

* Prompt: system = ``prompts.yaml`` ``sys[lang]`` + the JSON answer format built from
  ``response.yaml`` (``base`` statement, the task's keys ``answer`` or ``answer_q1``/``answer_q2``);
  user = ``prompts.yaml`` ``EU``/``EA`` template with the choices as ``A) text`` lines. Both files are
  read at run time (``configs/`` beside the data, else the repository's ``src/configs/``). Zero-shot,
  chat template, 50 new tokens (2048 with ``-o emobench.cot=true``, which uses their ``cot``
  statement and ``reasoning`` key). ``/no_think`` heads the system prompt when the ``--model``
  name's last part contains "qwen" and CoT is off, as ``src/model.py:40-41`` does.
* Extraction (``parse_json_response``): the reply, or the body of its first ```` ```json ```` block,
  must be JSON; the answer is the value under ``answer`` (EA) or ``answer_q1`` / ``answer_q2`` (EU)
  and is right only when it equals the gold letter exactly (``"A"``, not ``"a"`` or ``"A) text"``).
  A reply that is not JSON counts as the empty answer, i.e. wrong (their ``gen_response`` fallback).
* Aggregation: EU is right when the emotion **and** the cause are right; accuracy per category
  (EU ``coarse_category``, EA ``category``) and "Overall" per task and language. The paper (Table 13)
  reports EU, EA and their mean, which is ``score``.

Beside it, ``*_freetext`` keys score the same replies with our free-text parser.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from personafuse.evaluation.benchmarks.base import (
    Benchmark,
    Item,
    Reference,
    ScoreContext,
    mean,
    subject_model,
)
from personafuse.evaluation.benchmarks.choice import LETTERS, json_letter, parse_choice, weighted_stderr
from personafuse.evaluation.data import DataError, Remote, fetch, field, read_jsonl

COMMIT = "3b4f84312541f8469e909965e1fff3691ef85c62"
HUB_ID = "SahandSab/EmoBench"  # the dataset repo holds the same EU.jsonl / EA.jsonl files
REMOTE = Remote("hf", HUB_ID)
CONFIG_REMOTE = Remote("github", "Sahandfer/EmoBench", COMMIT)  # the configs live in the code repo
CONFIG_FILES = ("prompts.yaml", "response.yaml")
# utils.py:get_response_format's wrapper around the statement and the JSON keys (format only).
RESPONSE_FORMAT = "\n{statement}\n```json\n    {{\n    {conditions}\n    }}\n``` \n    "
ANSWER_KEYS = {"EA": ("answer",), "EU": ("answer_q1", "answer_q2")}


def rank_choices(choices: Sequence[str]) -> str:
    """data.py:DataLoader.rank_choices: ``A) text`` lines."""
    return "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))


def parse_json_response(res: str | None) -> Any:
    """utils.py:parse_json_response: the reply (or its first ```json block) as JSON, else None."""
    if res is None:
        return None
    if "```json" in res:
        m = re.search(r"```json\s*([\s\S]*?)```", res, re.DOTALL)
        if m is None:  # theirs fails on .group of None and returns None
            return None
        res = m.group(0).replace("```json", "").replace("```", "")
    try:
        return json.loads(res)
    except (ValueError, RecursionError):
        return None


def official_answers(text: str, task: str) -> dict[str, Any]:
    """The answer dict as model.py:gen_response returns it: the parsed JSON, or empty answers
    when the reply is not JSON. A JSON value that is not an object (theirs then fails in
    ``response.get``) also counts as empty answers."""
    parsed = parse_json_response(text)
    if isinstance(parsed, dict):
        return parsed
    return dict.fromkeys(ANSWER_KEYS[task], "")


def _label_letter(row: Mapping[str, Any], choices_key: str, label_key: str, path: Path) -> int:
    """data.py: ``letters[choices.index(label)]`` — the label is one of the choices, exactly."""
    choices = field(row, choices_key, path, kind=list)
    label = field(row, label_key, path, kind=str)
    if label not in choices:
        raise DataError(f"{path}:{row.get('__line__')}: {label_key} {label!r} is not one of {choices_key}")
    return choices.index(label)


class EmoBench(Benchmark):
    name = "emobench"
    title = "EmoBench"
    subscores = ("score", "EA", "EU")
    score_variants = ("score_freetext",)
    group = "Social-emotional intelligence"
    order = 10
    grid_default = True
    folder = "emobench"
    max_new_tokens = 50  # model.py:gen_response, max_new_tokens=2048 if use_cot else 50
    reference = Reference(
        repo="Sahandfer/EmoBench",
        commit=COMMIT,
        files=("src/model.py", "src/utils.py", "src/data.py", "src/configs/prompts.yaml", "src/configs/response.yaml"),
        note="the src/ harness (README usage); JSON answers, exact letter match",
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.language = str(self.options.get("language", "en"))
        if self.language not in ("en", "zh"):
            raise DataError(f"emobench: language must be 'en' or 'zh', got {self.language!r}")
        self.cot = str(self.options.get("cot", "false")).lower() in ("1", "true", "yes")
        if self.cot and "max_new_tokens" not in self.options:
            self.max_new_tokens = 2048
        self.configs_source = ""
        self.no_think = self._no_think()

    # ---- data -------------------------------------------------------------------------
    def load_items(self, source: Path | None) -> list[Item]:
        tasks = self.options.get("tasks", ("EU", "EA"))
        rows: list[tuple[str, Path | None, dict[str, Any]]] = []
        if source is None:
            for task in tasks:
                p = fetch(REMOTE, f"{task}.jsonl", bench=self.name)
                rows += [(task, p, r) for r in read_jsonl(p)]
        elif source.is_file():
            task = "EU" if source.stem.upper().startswith("EU") else "EA"
            rows += [(task, source, r) for r in read_jsonl(source)]
        else:
            for task in tasks:
                p = source / f"{task}.jsonl"
                if not p.is_file():
                    raise DataError(f"emobench: {p} not found")
                rows += [(task, p, r) for r in read_jsonl(p)]
        prompts, response = self._configs(source)
        systems = {t: self._system(prompts, response, t) for t in ("EU", "EA")}
        items: list[Item] = []
        for task, path, row in rows:
            if field(row, "language", path) != self.language:
                continue
            items.append(self._item(task, path, row, prompts, systems[task]))
        return items

    def _configs(self, source: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
        folder = self._configs_dir(source)
        out = []
        for name in CONFIG_FILES:
            p = folder / name if folder else fetch(CONFIG_REMOTE, f"src/configs/{name}", bench=self.name)
            try:
                data = yaml.safe_load(p.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                raise DataError(f"{p}: not valid YAML ({e})") from None
            if not isinstance(data, dict):
                raise DataError(f"{p}: expected a mapping of prompt sections")
            out.append((p, data))
        self.configs_source = ", ".join(str(p) for p, _ in out)
        (pp, prompts), (rp, response) = out
        need = [(pp, prompts, ("sys", "EU", "EA")), (rp, response, ("base", "cot", "reasoning", "EU", "EA"))]
        for path, data, keys in need:
            for k in keys:
                if not isinstance(data.get(k), dict) or self.language not in data[k]:
                    raise DataError(f"{path}: missing section {k}.{self.language}")
        return prompts, response

    def _configs_dir(self, source: Path | None) -> Path | None:
        if self.options.get("configs"):
            d = Path(str(self.options["configs"]))
            if not all((d / n).is_file() for n in CONFIG_FILES):
                raise DataError(f"emobench: {d} lacks {' and '.join(CONFIG_FILES)} (given as -o emobench.configs)")
            return d
        if source is None:
            return None
        folder = source if source.is_dir() else source.parent
        # A benchdata folder keeps them in configs/; the repository in src/configs/ beside data/.
        for d in (folder / "configs", folder / "src" / "configs", folder.parent / "src" / "configs"):
            if all((d / n).is_file() for n in CONFIG_FILES):
                return d
        raise DataError(
            f"emobench: no configs/prompts.yaml and configs/response.yaml beside {source} (the official prompt "
            f"files of Sahandfer/EmoBench src/configs/); pass -o emobench.configs=DIR"
        )

    def _system(self, prompts: Mapping[str, Any], response: Mapping[str, Any], task: str) -> str:
        """model.py:init_prompt: ``sys[lang]`` + utils.py:get_response_format(task, lang, use_cot)."""
        lang = self.language
        statement = response["cot" if self.cot else "base"][lang]
        conditions = response[task][lang]
        if self.cot:
            conditions = response["reasoning"][lang] + ",\n" + conditions
        system = prompts["sys"][lang] + RESPONSE_FORMAT.format(statement=statement, conditions=conditions)
        if self.no_think:
            system = "/no_think\n\n" + system
        return system

    def _no_think(self) -> bool:
        """src/model.py:40-41 (3b4f843) ``init_prompt``: ``/no_think`` before the system prompt when
        ``"qwen" in get_model_name(model_path).lower()`` (utils.py:11, the path's last part) and CoT
        is off. ``-o emobench.no_think=true|false`` overrides the name rule."""
        opt = str(self.options.get("no_think", "auto")).lower()
        if opt != "auto":
            return opt in ("1", "true", "yes")
        model, _ = subject_model(self.options)
        name = (model or "").split(":", 1)[-1].rstrip("/").split("/")[-1]
        return "qwen" in name.lower() and not self.cot

    def _item(self, task: str, path: Path | None, row: Mapping[str, Any], prompts: Mapping[str, Any], system: str) -> Item:
        qid = str(field(row, "qid", path))
        for k in ("scenario", "subject"):
            field(row, k, path, kind=str)
        template = prompts[task][self.language]
        if task == "EU":
            emo = _label_letter(row, "emotion_choices", "emotion_label", path)
            cause = _label_letter(row, "cause_choices", "cause_label", path)
            user = template.format(
                scenario=row["scenario"], subject=row["subject"],
                emo_choices=rank_choices(row["emotion_choices"]), cause_choices=rank_choices(row["cause_choices"]),
            )
            return Item(
                id=f"EU-{qid}",
                prompt=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                reference={"emotion": emo, "cause": cause},
                categories={"task": "EU", "category": str(row.get("coarse_category", ""))},
                meta={"emotion_choices": row["emotion_choices"], "cause_choices": row["cause_choices"]},
            )
        ans = _label_letter(row, "choices", "label", path)
        q_type = field(row, "question type", path, kind=str)
        user = template.format(scenario=row["scenario"], subject=row["subject"], choices=rank_choices(row["choices"]), q_type=q_type)
        return Item(
            id=f"EA-{qid}",
            prompt=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            reference={"answer": ans},
            categories={"task": "EA", "category": str(row.get("category", ""))},
            meta={"choices": row["choices"]},
        )

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "prompt_source": self.configs_source,
            "chat_template": True,
            "shots": 0,
            "cot": self.cot,
            "no_think": self.no_think,
            "language": self.language,
            "answer_format": "JSON: answer (EA), answer_q1 + answer_q2 (EU)",
            "answer_extraction": "utils.py:parse_json_response; exact match of the letter",
            "unparsed": "empty answer, counted wrong (model.py:gen_response)",
            "aggregation": "EU needs emotion and cause; score = mean(EU, EA) as paper Table 13",
        }

    # ---- scoring ----------------------------------------------------------------------
    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        text = responses[0]
        task = str(item.categories["task"])
        answers = official_answers(text, task)
        if task == "EU":
            gold = {"emotion": LETTERS[item.reference["emotion"]], "cause": LETTERS[item.reference["cause"]]}
            e, c = answers.get("answer_q1", ""), answers.get("answer_q2", "")
            free = score_eu(text, item.reference, item.meta["emotion_choices"], item.meta["cause_choices"])
            return {
                "parsed": None if e in ("", None) and c in ("", None) else {"emotion": e, "cause": c},
                "gold": gold,
                "emotion_correct": e == gold["emotion"],
                "cause_correct": c == gold["cause"],
                "score": float(e == gold["emotion"] and c == gold["cause"]),
                "parsed_freetext": free["parsed"],
                "score_freetext": free["score"],
            }
        gold_letter = LETTERS[item.reference["answer"]]
        a = answers.get("answer", "")
        k = parse_choice(text, len(item.meta["choices"]), item.meta["choices"])
        return {
            "parsed": None if a in ("", None) else a,
            "gold": gold_letter,
            "score": float(a == gold_letter),
            "parsed_freetext": None if k is None else LETTERS[k],
            "score_freetext": float(k == item.reference["answer"]),
        }

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for r in records:
            by_task[str((r.get("categories") or {}).get("task"))].append(r)
        tasks = [t for t in ("EU", "EA") if by_task.get(t)]
        out: dict[str, Any] = {}
        for suffix, key in (("", "score"), ("_freetext", "score_freetext")):
            xs = [float(r.get(key) or 0.0) for r in records]
            w = [1.0 / (len(tasks) * len(by_task[str((r.get("categories") or {}).get("task"))])) if tasks else 0.0 for r in records]
            for t in tasks:
                ts = [float(r.get(key) or 0.0) for r in by_task[t]]
                out[t + suffix] = mean(ts)
                out[f"{t}{suffix}_stderr"] = weighted_stderr(ts, [1.0 / len(ts)] * len(ts))
            out["score" + suffix] = mean([out[t + suffix] for t in tasks])  # paper: mean of EU and EA
            out["stderr" + suffix] = weighted_stderr(xs, w)
        if "EU" in tasks:
            out["EU_emotion"] = mean([float(bool(r.get("emotion_correct"))) for r in by_task["EU"]])
            out["EU_cause"] = mean([float(bool(r.get("cause_correct"))) for r in by_task["EU"]])
        for t in tasks:  # data.py:evaluate_results: per category, then "Overall"
            cats: dict[str, list[float]] = defaultdict(list)
            for r in by_task[t]:
                cats[str((r.get("categories") or {}).get("category", ""))].append(float(r.get("score") or 0.0))
            out[f"{t}_by_category"] = {**{c: mean(v) for c, v in sorted(cats.items())}, "Overall": out[t]}
        out["n"] = len(records)
        out["n_unparsed"] = sum(1 for r in records if r.get("parsed") is None)
        out.update(self.breakdowns(records))
        return out


def score_eu(text: str, reference: Mapping[str, int], emotion_choices: Sequence[str], cause_choices: Sequence[str]) -> dict[str, Any]:
    """Free-text EU scoring: the emotion and the cause letters read as a person would (JSON keys
    ``answer_q1``/``answer_q2``, ``Emotion:``/``Cause:`` labels, or two letters such as "A\\nB");
    correct only when both match."""
    emo_part, cause_part = _split_eu(text)
    e = parse_choice(emo_part, len(emotion_choices), emotion_choices, label="emotion") if emo_part else None
    c = parse_choice(cause_part, len(cause_choices), cause_choices, label="cause") if cause_part else None
    e_ok = e == reference["emotion"]
    c_ok = c == reference["cause"]
    parsed = None if e is None and c is None else {
        "emotion": None if e is None else LETTERS[e],
        "cause": None if c is None else LETTERS[c],
    }
    return {
        "parsed": parsed,
        "gold": {"emotion": LETTERS[reference["emotion"]], "cause": LETTERS[reference["cause"]]},
        "emotion_correct": e_ok,
        "cause_correct": c_ok,
        "score": float(e_ok and c_ok),
    }


def _split_eu(text: str) -> tuple[str, str]:
    """The emotion part and the cause part of an EU answer: JSON keys, then explicit labels,
    then exactly two lone capital letters in order (one per line, "A\\nB", or "A, B")."""
    t = text.replace("*", "")
    q1, q2 = json_letter(t, ("answer_q1",)), json_letter(t, ("answer_q2",))
    if q1 or q2:
        return (f"[[{q1}]]" if q1 else ""), (f"[[{q2}]]" if q2 else "")
    m_e = re.search(r"(?i)(emotion|question\s*1|情绪|问题\s*1|问题一)\s*[:：]", t)
    m_c = re.search(r"(?i)(cause|reason|question\s*2|原因|问题\s*2|问题二)\s*[:：]", t)
    if m_e and m_c:
        if m_e.start() < m_c.start():
            return "Emotion: " + t[m_e.end() : m_c.start()], "Cause: " + t[m_c.end() :]
        return "Emotion: " + t[m_e.end() :], "Cause: " + t[m_c.end() : m_e.start()]
    # Lone capitals only: an "A" opening a phrase ("A friend...") is an article, not an answer.
    letters = [
        m.group(1)
        for m in re.finditer(r"(?<![A-Za-z0-9'’])([A-F])(?![A-Za-z0-9'’])", t)
        if not (m.group(1) == "A" and re.match(r"\s+[a-z]", t[m.end() :]))
    ]
    if len(letters) == 2:
        return f"[[{letters[0]}]]", f"[[{letters[1]}]]"
    if len(letters) > 2:  # a listing of the options ("A) ...\nB) ...\nC) ..."), not an answer
        return "", ""
    return (t, "") if m_e or not m_c else ("", t)
