"""Judge-scored benchmarks: MentalChat16K (seven counselling dimensions + overall, 1–10) and
Arena-Hard-Auto v0.1 (pairwise against the baseline's answers in both orders, Bradley–Terry win
rate with a bootstrap interval).

MentalChat16K official file: ``question.jsonl`` in FastChat format (``question_id``, ``category``,
``turns``: [text]). Arena-Hard-Auto v0.1: ``question.jsonl`` (``uid``, ``category``, ``cluster``,
``prompt``; older copies use ``question_id`` and ``turns``) and the baseline answers
``gpt-4-0314.jsonl`` (``uid`` and ``messages`` whose assistant ``content`` holds ``answer``; older
copies use ``question_id`` and ``choices[0].turns[0].content``).

Online sources: Arena-Hard-Auto's data repository on the Hub (``lmarena-ai/arena-hard-auto``:
``data/arena-hard-v0.1/question.jsonl`` and ``.../model_answer/gpt-4-0314.jsonl``; a local copy of
that folder works as ``--data`` too). The Hub's ``ShenLab/MentalChat16K`` holds the 16K training
conversations, not the 200 evaluation questions, so those come from the authors' repository
(``ChiaPatricia/MentalChat16K_Main``, ``data/eval_jsonl/evalq_bench/question.jsonl``, the commit our
reference copy was taken from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext, _mean
from personafuse.evaluation.data import DataError, Remote, fetch, field, read_jsonl
from personafuse.evaluation.judges import (
    MENTAL_KEYS,
    arena_judge_prompt,
    battles_from_verdict,
    bootstrap_win_rate,
    mental_judge_prompt,
    parse_arena_verdict,
    parse_mental_verdict,
)

MENTAL_REMOTE = Remote("github", "ChiaPatricia/MentalChat16K_Main", "9eb19df747fa26524f7024ad0da4084ff0f47f6a")
MENTAL_PATH = "data/eval_jsonl/evalq_bench/question.jsonl"
ARENA_REMOTE = Remote("hf", "lmarena-ai/arena-hard-auto")
ARENA_DIR = "data/arena-hard-v0.1"


def _first_turn(row: Mapping[str, Any], path: Any) -> str:
    if "prompt" in row and isinstance(row["prompt"], str):
        return row["prompt"]
    turns = field(row, "turns", path, kind=list)
    if not turns:
        raise DataError(f"{path}:{row.get('__line__')}: field 'turns' is empty")
    t = turns[0]
    return t["content"] if isinstance(t, dict) else str(t)


def _need_judge(ctx: ScoreContext, name: str) -> Any:
    if ctx.judge is None:
        raise RuntimeError(f"{name} is scored by an LLM judge: pass --judge openai:MODEL (with --judge-base-url) or --judge hf:PATH")
    return ctx.judge


class MentalChat(Benchmark):
    name = "mentalchat"
    title = "MentalChat16K"
    folder = "mentalchat16k"
    max_new_tokens = 512
    needs_judge = True

    def load_items(self, source: Path | None) -> list[Item]:
        if source is None:
            path = fetch(MENTAL_REMOTE, MENTAL_PATH, bench=self.name)
        else:
            path = source / "question.jsonl" if source.is_dir() else source
        items = []
        for row in read_jsonl(path):
            qid = str(row.get("question_id", row["__line__"]))
            items.append(Item(id=qid, prompt=_first_turn(row, path), categories={"category": str(row.get("category", ""))}))
        return items

    def score_batch(self, items: Sequence[Item], responses: Sequence[Sequence[str]], ctx: ScoreContext) -> list[dict[str, Any]]:
        judge = _need_judge(ctx, self.name)
        prompts = [mental_judge_prompt(str(it.prompt), rs[0]) for it, rs in zip(items, responses, strict=True)]
        outs = judge.generate(prompts, max_new_tokens=int(self.options.get("judge_max_tokens", 200)), do_sample=False)
        recs = []
        for g in outs:
            v = parse_mental_verdict(g.text)
            recs.append({"parsed": v, "score": None if v is None else v["overall"], "judge_raw": g.text})
        return recs

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ok = [r["parsed"] for r in records if r.get("parsed")]
        out: dict[str, Any] = {k: (_mean([v[k] for v in ok]) if ok else None) for k in MENTAL_KEYS}
        return {
            "score": out["overall"],
            **out,
            "n": len(records),
            "n_judged": len(ok),
            "n_unparseable_verdicts": len(records) - len(ok),
        }


class ArenaHard(Benchmark):
    name = "arenahard"
    title = "Arena-Hard-Auto v0.1"
    folder = "arena-hard-v0.1"
    max_new_tokens = 1024
    needs_judge = True

    @property
    def baseline_name(self) -> str:
        return str(self.options.get("baseline", "gpt-4-0314"))

    def load_items(self, source: Path | None) -> list[Item]:
        explicit = Path(self.options["baseline_file"]) if self.options.get("baseline_file") else None
        if source is None:
            qpath = fetch(ARENA_REMOTE, f"{ARENA_DIR}/question.jsonl", bench=self.name)
            bpath = explicit or fetch(ARENA_REMOTE, f"{ARENA_DIR}/model_answer/{self.baseline_name}.jsonl", bench=self.name)
        else:
            folder = source if source.is_dir() else source.parent
            qpath = source / "question.jsonl" if source.is_dir() else source
            bpath = explicit or self._local_baseline(folder, qpath)
        return self._items(qpath, bpath)

    def _local_baseline(self, folder: Path, qpath: Path) -> Path:
        # Beside question.jsonl (our benchdata) or in model_answer/ (the official data layout).
        for cand in (folder / f"{self.baseline_name}.jsonl", folder / "model_answer" / f"{self.baseline_name}.jsonl"):
            if cand.is_file():
                return cand
        cands = [p for p in folder.glob("*.jsonl") if p.name != qpath.name]
        if len(cands) != 1:
            raise DataError(f"arenahard: baseline answers {self.baseline_name}.jsonl not found in {folder} or {folder / 'model_answer'}")
        return cands[0]

    def _items(self, qpath: Path, bpath: Path) -> list[Item]:
        baseline: dict[str, str] = {}
        for row in read_jsonl(bpath):
            uid = str(row.get("uid", row.get("question_id", "")))
            if not uid:
                raise DataError(f"{bpath}:{row['__line__']}: missing field 'uid'")
            baseline[uid] = _baseline_answer(row, bpath)
        items = []
        for row in read_jsonl(qpath):
            uid = str(row.get("uid", row.get("question_id", "")))
            if not uid:
                raise DataError(f"{qpath}:{row['__line__']}: missing field 'uid'")
            if uid not in baseline:
                raise DataError(f"{qpath}:{row['__line__']}: no baseline answer for uid {uid} in {bpath}")
            items.append(Item(id=uid, prompt=_first_turn(row, qpath), reference=baseline[uid], categories={"cluster": str(row.get("cluster", ""))}))
        return items

    def score_batch(self, items: Sequence[Item], responses: Sequence[Sequence[str]], ctx: ScoreContext) -> list[dict[str, Any]]:
        judge = _need_judge(ctx, self.name)
        prompts = []
        for it, rs in zip(items, responses, strict=True):
            prompts.append(arena_judge_prompt(str(it.prompt), str(it.reference), rs[0]))  # game 1: baseline is A
            prompts.append(arena_judge_prompt(str(it.prompt), rs[0], str(it.reference)))  # game 2: model is A
        outs = judge.generate(prompts, max_new_tokens=int(self.options.get("judge_max_tokens", 1024)), do_sample=False)
        recs = []
        for i, _it in enumerate(items):
            g1, g2 = outs[2 * i].text, outs[2 * i + 1].text
            v1, v2 = parse_arena_verdict(g1), parse_arena_verdict(g2)
            # Per-item convenience score: the model's mean points over parseable games (1 win, .5 tie).
            pts = []
            for v, model_is_a in ((v1, False), (v2, True)):
                if v is None:
                    continue
                if v == "A=B":
                    pts.append(0.5)
                else:
                    pts.append(1.0 if v.startswith("A>") == model_is_a else 0.0)
            recs.append(
                {
                    "parsed": None if v1 is None and v2 is None else {"baseline_first": v1, "model_first": v2},
                    "score": _mean(pts) if pts else None,
                    "judge_raw": [g1, g2],
                }
            )
        return recs

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        battles = []
        unparsed = 0
        for r in records:
            p = r.get("parsed") or {}
            for key, model_is_a in (("baseline_first", False), ("model_first", True)):
                v = p.get(key)
                if v is None:
                    unparsed += 1
                battles += battles_from_verdict("model", "baseline", v, model_is_a=model_is_a, group=str(r.get("id")))
        bt = bootstrap_win_rate(battles, "model", "baseline", rounds=int(self.options.get("bootstrap", 100)), seed=int(self.options.get("seed", 0)))
        return {
            "score": None if bt["win_rate"] != bt["win_rate"] else round(100 * bt["win_rate"], 3),
            "ci_low": None if bt["ci_low"] != bt["ci_low"] else round(100 * bt["ci_low"], 3),
            "ci_high": None if bt["ci_high"] != bt["ci_high"] else round(100 * bt["ci_high"], 3),
            "baseline": self.baseline_name,
            "n": len(records),
            "n_games": 2 * len(records),
            "n_unparseable_verdicts": unparsed,
        }


def _baseline_answer(row: Mapping[str, Any], path: Path) -> str:
    if "messages" in row:
        for m in reversed(row["messages"]):
            if m.get("role") == "assistant":
                c = m.get("content")
                return c.get("answer", "") if isinstance(c, dict) else str(c)
    if "choices" in row:
        try:
            return str(row["choices"][0]["turns"][0]["content"])
        except (KeyError, IndexError, TypeError):
            pass
    raise DataError(f"{path}:{row.get('__line__')}: no assistant answer (expected 'messages' or 'choices')")
