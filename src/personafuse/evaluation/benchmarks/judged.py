"""Judge-scored benchmarks, as their references run them.

**Arena-Hard-Auto v0.1** — reference lmarena/arena-hard-auto: the judge's settings are read from
``config/judge_config.yaml`` of release ``7f1b7f5`` (system prompt, prompt template, label regex
``\\[\\[([AB<>=]+)\\]\\]``, temperature 0, 4096 tokens; the benchdata copy is that file), the
answers' from ``config/gen_answer_config.yaml`` (temperature 0, 4096 tokens), and the code is the v0.1
code as last released before the v2.0 rewrite (``3071ef9``; the repository's newest snapshot,
``196f6b8``, the benchdata's, runs v0.1 through the v2.0 scripts, whose README presents v2.0):

* answers: one user turn through the chat template, no system prompt (gen_answer.py adds "You are a
  helpful assistant." only for OpenAI's own models), greedy, 4096 new tokens;
* judge (gen_judgment.py:judgment): two games per question, the baseline as assistant A and then
  swapped; when a judgment holds no label the judge gets its reply back with the reference's
  "continue ..." turn and the label is read from both parts (2 attempts); get_score: one distinct
  match of the regex is the label (repeats count once), several distinct ones none, no retry;
* scoring (show_result.py:get_battles_from_row, utils_math.py): ``A>>B``/``B>>A`` are 3 battles,
  ``A>B``/``B>A``/``A=B`` one, any other label or none no battle; Bradley–Terry fitted on all battles
  (a tie half a win) and reported as the win rate (%) against gpt-4-0314, rounded to 2 decimals as
  get_win_rate_column does; the 95 % interval from 100 resamples of the battle rows
  (``get_bootstrap_result``), percentiles 2.5/97.5 of the ratings. ``stderr``: the resampled win
  rates' standard deviation.

**MentalChat16K** — reference ChiaPatricia/MentalChat16K_Main@9eb19df. It holds the judge's records
(``data/eval_jsonl/newCombined_bench/model_judgment/gpt-4_single.jsonl``, judge ``["gpt-4",
"single-mental-v1"]``), from whose ``user_prompt`` the judge instruction is read, but no judge code:
the records are FastChat llm_judge output, so the harness is lm-sys/FastChat@v0.2.32
(``fastchat/llm_judge/common.py:run_judge_single``, ``show_result.py:display_result_single``):

* answers: as the authors generate them (``examples/qlora_models_generate.py`` at that commit,
  lines 84-93 ``prompt`` and ``instruction``, 146-156 the loop, 29-58 ``generate``): their
  counselling instruction and the question's first turn as the input of an Alpaca prompt, sent as a
  raw completion (``tokenizer(prompt.format(...))``, no chat template; ``-o
  mentalchat.chat_template=true`` sends the same text as one user turn), 512 new tokens (line 25),
  the reply cut at a further "### Response: " (their ``text.split('### Response: ')[1]``); greedy
  where they sample (top_p 0.5, temperature 0.7: a listed deviation). A PersonaFuse router reads
  the question alone; the judge sees the question, not the Alpaca wrapper (FastChat's ``turns[0]``);
* judge: system "You are a helpful assistant." (FastChat's single-answer judge; the records do not
  store one), the instruction + ``[Question]`` + answer layout of FastChat's single-v1, temperature 0,
  2048 tokens;
* ``score`` (= ``overall``, the key kept for old runs): the reference's rating, the first ``[[n]]``
  of the judgment, else the first ``[n]``; none is -1 in the reference and left out of the mean
  (``score != -1``), as here. It is the paper's number but not an overall rating: the judge writes
  its metrics in the prompt's order, so the first ``[[n]]`` is in practice Active Listening (the
  paper's Overall column equals its Active Listening column in all six rows); the protocol says so.
  The seven metrics (``Metric: [[n]]``, which the reference's code does not read) are each the mean
  of the judgments that rate them; ``overall_labelled`` is the mean of the ``Rating: [[n]]`` values.

Official files: MentalChat16K ``question.jsonl`` in FastChat format (``question_id``, ``category``,
``turns``: [text]). Arena-Hard-Auto v0.1: ``question.jsonl`` (``uid``, ``category``, ``cluster``,
``prompt``; older copies use ``question_id`` and ``turns``) and the baseline answers
``gpt-4-0314.jsonl`` (``uid`` and ``messages`` whose assistant ``content`` holds ``answer``; older
copies use ``question_id`` and ``choices[0].turns[0].content``).

Online sources: Arena-Hard-Auto's data repository on the Hub (``lmarena-ai/arena-hard-auto``:
``data/arena-hard-v0.1/question.jsonl`` and ``.../model_answer/gpt-4-0314.jsonl``; a local copy of
that folder works as ``--data`` too) and its judge config from GitHub (``lmarena/arena-hard-auto@7f1b7f5``).
The Hub's ``ShenLab/MentalChat16K`` holds the 16K training conversations, not the 200 evaluation
questions, so those and the judge records come from the authors' repository at the pinned commit.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from personafuse.evaluation.benchmarks.base import (
    Benchmark,
    Item,
    Reference,
    ScoreContext,
    mean,
    stderr,
    with_router_query,
)
from personafuse.evaluation.data import DataError, Remote, fetch, field, read_jsonl
from personafuse.evaluation.judges import (
    FASTCHAT_JUDGE_MAX_TOKENS,
    MENTAL_KEYS,
    MENTAL_PROMPT_NAME,
    STRONG_WEIGHT,
    VERDICTS,
    ArenaJudgeConfig,
    MentalJudgePrompt,
    arena_get_score,
    battles_from_verdict,
    bootstrap_win_rate,
    continue_messages,
    parse_mental_verdict,
)

MENTAL_COMMIT = "9eb19df747fa26524f7024ad0da4084ff0f47f6a"
MENTAL_REMOTE = Remote("github", "ChiaPatricia/MentalChat16K_Main", MENTAL_COMMIT)
MENTAL_PATH = "data/eval_jsonl/evalq_bench/question.jsonl"
MENTAL_JUDGMENT_PATH = "data/eval_jsonl/newCombined_bench/model_judgment/gpt-4_single.jsonl"
FASTCHAT = "lm-sys/FastChat@v0.2.32 (dd84d166d7694f0cc0c766e5a811d995f5801c77)"
MENTAL_GENERATE_PATH = "examples/qlora_models_generate.py"
# examples/qlora_models_generate.py@9eb19df lines 84-88 (prompt) and 90-93 (instruction), verbatim.
MENTAL_ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
MENTAL_INSTRUCTION = (
    "You are a helpful mental health counselling assistant, please answer the mental health questions based on the patient's description. "
    "The assistant gives helpful, comprehensive, and appropriate answers to the user's questions."
)
MENTAL_RESPONSE_MARK = "### Response: "  # line 56: the reply is text.split('### Response: ')[1]
ARENA_REMOTE = Remote("hf", "lmarena-ai/arena-hard-auto")
ARENA_DIR = "data/arena-hard-v0.1"
ARENA_RELEASE = "7f1b7f5dd6ce53e1f8530220ceb452b7019a8056"  # release: config/*.yaml
ARENA_CODE = "3071ef95d913bb5cd632641db336a3b6c7fe4bdd"  # last v0.1 code: gen_judgment.py, show_result.py, utils_math.py
ARENA_CONFIG_REMOTE = Remote("github", "lmarena/arena-hard-auto", ARENA_RELEASE)
ARENA_CONFIG_PATH = "config/judge_config.yaml"


def _first_turn(row: Mapping[str, Any], path: Any) -> str:
    if "prompt" in row and isinstance(row["prompt"], str):
        return row["prompt"]
    turns = field(row, "turns", path, kind=list)
    if not turns:
        raise DataError(f"{path}:{row.get('__line__')}: field 'turns' is empty")
    t = turns[0]
    return t["content"] if isinstance(t, dict) else str(t)


def mental_answer(reply: str) -> str:
    """The answer the authors keep: generation up to a further "### Response: " (line 56)."""
    return reply.split(MENTAL_RESPONSE_MARK)[0]


def _need_judge(ctx: ScoreContext, name: str) -> Any:
    if ctx.judge is None:
        raise RuntimeError(f"{name} is scored by an LLM judge: pass --judge openai:MODEL (with --judge-base-url) or --judge hf:PATH")
    return ctx.judge


def _folder(source: Path | None) -> Path | None:
    return None if source is None else (source if source.is_dir() else source.parent)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _mean_or_none(xs: Sequence[float]) -> float | None:
    return mean(xs) if xs else None


class MentalChat(Benchmark):
    # The authors prompt a raw completion (an Alpaca prompt, no chat template).
    chat_template = False
    name = "mentalchat"
    title = "MentalChat16K"
    aliases = ("mentalchat16k",)
    subscores = ("score", "active_listening", "empathy", "safety", "open_mindedness", "clarity", "boundaries", "holistic")
    score_variants = ("overall_labelled", "n_unparseable_verdicts")
    group = "Applications"
    order = 90
    judge_calls_per_item = 1
    folder = "mentalchat16k"
    max_new_tokens = 512  # examples/qlora_models_generate.py: max_new_tokens = 512
    needs_judge = True
    reference = Reference(
        repo="ChiaPatricia/MentalChat16K_Main",
        commit=MENTAL_COMMIT,
        files=(MENTAL_PATH, MENTAL_JUDGMENT_PATH, MENTAL_GENERATE_PATH),
        note=f"judge harness {FASTCHAT}: fastchat/llm_judge/common.py:run_judge_single, show_result.py:display_result_single",
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._source: Path | None = None
        self._prompt: MentalJudgePrompt | None = None

    def load_items(self, source: Path | None) -> list[Item]:
        self._source = source
        if source is None:
            path = fetch(MENTAL_REMOTE, MENTAL_PATH, bench=self.name)
        else:
            path = source / "question.jsonl" if source.is_dir() else source
        items = []
        for row in read_jsonl(path):
            qid = str(row.get("question_id", row["__line__"]))
            question = _first_turn(row, path)
            prompt = with_router_query(MENTAL_ALPACA.format(instruction=MENTAL_INSTRUCTION, input=question), question)
            items.append(Item(id=qid, prompt=prompt, categories={"category": str(row.get("category", ""))}, meta={"question": question}))
        return items

    def judge_prompt(self) -> MentalJudgePrompt:
        """The single-mental-v1 prompt: ``-o mentalchat.judge_prompt_file=PATH``, else
        ``model_judgment/gpt-4_single.jsonl`` beside the questions, else the authors' repository."""
        if self._prompt is None:
            explicit = self.options.get("judge_prompt_file")
            folder = _folder(self._source)
            local = folder / "model_judgment" / "gpt-4_single.jsonl" if folder is not None else None
            if explicit:
                path = Path(str(explicit))
            elif local is not None and local.is_file():
                path = local
            else:
                path = fetch(MENTAL_REMOTE, MENTAL_JUDGMENT_PATH, bench=self.name)
            self._prompt = MentalJudgePrompt.from_judgment_file(path)
        return self._prompt

    @property
    def judge_max_tokens(self) -> int:
        return int(self.options.get("judge_max_tokens", FASTCHAT_JUDGE_MAX_TOKENS))

    def score_batch(self, items: Sequence[Item], responses: Sequence[Sequence[str]], ctx: ScoreContext) -> list[dict[str, Any]]:
        judge = _need_judge(ctx, self.name)
        jp = self.judge_prompt()
        prompts = [jp.messages(str(it.meta.get("question", it.prompt)), mental_answer(rs[0])) for it, rs in zip(items, responses, strict=True)]
        outs = judge.generate(prompts, max_new_tokens=self.judge_max_tokens, do_sample=False)
        recs = []
        for g in outs:
            v = parse_mental_verdict(g.text, jp.metrics)
            found = any(x is not None for x in v.values())
            recs.append({"parsed": v if found else None, "score": v["overall"], "judge_raw": g.text})
        return recs

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        # display_result_single: judgments without a rating (-1) are left out of the mean.
        parsed = [r.get("parsed") or {} for r in records]
        out: dict[str, Any] = {}
        for key in (*MENTAL_KEYS, "rating_labelled"):
            xs = [float(p[key]) for p in parsed if p.get(key) is not None]
            name = "overall_labelled" if key == "rating_labelled" else key
            out[name] = _mean_or_none(xs)
            out[f"{name}_stderr"] = stderr(xs) if xs else None
            out[f"{name}_n"] = len(xs)
        judged = out["overall_n"]
        return {
            "score": out["overall"],
            "stderr": out["overall_stderr"],
            **out,
            "n": len(records),
            "n_judged": judged,
            "n_unparseable_verdicts": len(records) - judged,
        }

    def protocol_extra(self) -> dict[str, Any]:
        jp = self._prompt
        return {
            "prompt": f"{MENTAL_REMOTE.repo}@{MENTAL_COMMIT[:7]} {MENTAL_GENERATE_PATH}:84-93: counselling instruction + "
            "the question's first turn in an Alpaca prompt" + (", as one user turn" if self.chat_template else ", raw completion"),
            "system_prompt": None,
            "temperature": 0.0,
            "reference_sampling": "do_sample, top_p 0.5, temperature 0.7 (greedy here)",
            "router_query": "the question's first turn alone",
            "judge_prompt": MENTAL_PROMPT_NAME,
            "judge_prompt_source": jp.source if jp else f"{MENTAL_REMOTE.describe()}:{MENTAL_JUDGMENT_PATH}",
            "judge_prompt_sha": _digest(jp.instruction) if jp else None,
            "judge_system_prompt": jp.system_prompt if jp else None,
            "judge_temperature": 0.0,
            "judge_max_tokens": self.judge_max_tokens,
            "score_rule": "first [[n]] else first [n] of the judgment (FastChat run_judge_single); none: left out of the mean",
            "score_is": "the first rating the judge writes (Active Listening in practice, the first metric of the prompt), "
            "which the paper reports as Overall; overall_labelled is the judge's own 'Rating: [[n]]'",
        }


class ArenaHard(Benchmark):
    name = "arenahard"
    title = "Arena-Hard"  # release v0.1 (reference below)
    aliases = ("arena-hard",)
    score_variants = ("ci_low", "ci_high", "n_unparseable_verdicts")
    group = "General intelligence and safety"
    order = 50
    judge_calls_per_item = 2  # both orders of the pair
    resample_options = MappingProxyType({"bootstrap": 0})  # its inner bootstrap sets the interval, not the score
    folder = "arena-hard-v0.1"
    max_new_tokens = 4096  # config/gen_answer_config.yaml: max_tokens 4096, temperature 0.0
    needs_judge = True
    reference = Reference(
        repo="lmarena/arena-hard-auto",
        commit=ARENA_CODE,
        files=("gen_judgment.py", "show_result.py", "utils_math.py", "gen_answer.py"),
        note=f"config/judge_config.yaml and config/gen_answer_config.yaml of release {ARENA_RELEASE}; data as at 196f6b8",
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._source: Path | None = None
        self._config: ArenaJudgeConfig | None = None

    @property
    def baseline_name(self) -> str:
        return str(self.options.get("baseline", "gpt-4-0314"))

    def load_items(self, source: Path | None) -> list[Item]:
        self._source = source
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

    def judge_config(self) -> ArenaJudgeConfig:
        """``-o arenahard.judge_config=PATH``, else ``judge_config.yaml`` beside the questions (our
        benchdata) or in ``config/`` of a repository checkout, else the release's file on GitHub."""
        if self._config is None:
            explicit = self.options.get("judge_config")
            folder = _folder(self._source)
            cands = [] if folder is None else [folder / "judge_config.yaml", folder / "config" / "judge_config.yaml", folder.parent.parent / "config" / "judge_config.yaml"]
            if explicit:
                path = Path(str(explicit))
            else:
                path = next((c for c in cands if c.is_file()), None) or fetch(ARENA_CONFIG_REMOTE, ARENA_CONFIG_PATH, bench=self.name)
            self._config = ArenaJudgeConfig.from_yaml(path)
        return self._config

    @property
    def judge_max_tokens(self) -> int:
        return int(self.options.get("judge_max_tokens") or self.judge_config().max_tokens)

    def judge_games(self, judge: Any, convs: Sequence[list[dict[str, str]]]) -> list[tuple[str, str | None, int]]:
        """gen_judgment.py:judgment's attempt loop for every game at once: ``(judgment, label,
        attempts)``; the judgment is the replies joined as the reference joins them ("\\n" + each)."""
        cfg = self.judge_config()
        texts, labels, tries = [""] * len(convs), [None] * len(convs), [0] * len(convs)
        cur = [list(c) for c in convs]
        pending = list(range(len(convs)))
        for _ in range(cfg.attempts):
            if not pending:
                break
            sample = cfg.temperature > 0
            outs = judge.generate([cur[i] for i in pending], max_new_tokens=self.judge_max_tokens, do_sample=sample, temperature=cfg.temperature if sample else None)
            again = []
            for i, g in zip(pending, outs, strict=True):
                texts[i] += "\n" + g.text
                labels[i], retry = arena_get_score(texts[i], cfg.regex_pattern)
                tries[i] += 1
                if retry:
                    cur[i] = continue_messages(cur[i], g.text)
                    again.append(i)
            pending = again
        return list(zip(texts, labels, tries, strict=True))

    def score_batch(self, items: Sequence[Item], responses: Sequence[Sequence[str]], ctx: ScoreContext) -> list[dict[str, Any]]:
        judge = _need_judge(ctx, self.name)
        cfg = self.judge_config()
        convs = []
        for it, rs in zip(items, responses, strict=True):
            convs.append(cfg.messages(str(it.prompt), str(it.reference), rs[0]))  # game 1: baseline is A
            convs.append(cfg.messages(str(it.prompt), rs[0], str(it.reference)))  # game 2: swapped
        games = self.judge_games(judge, convs)
        recs = []
        for i in range(len(items)):
            (j1, v1, n1), (j2, v2, n2) = games[2 * i], games[2 * i + 1]
            # Per-item convenience score: the model's mean points over its battle-making games.
            pts = [_points(v, model_is_a) for v, model_is_a in ((v1, False), (v2, True)) if v in VERDICTS]
            recs.append(
                {
                    "parsed": None if v1 is None and v2 is None else {"baseline_first": v1, "model_first": v2},
                    "score": mean(pts) if pts else None,
                    "judge_raw": [j1, j2],
                    "judge_attempts": [n1, n2],
                }
            )
        return recs

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        weight = int(self.options.get("weight", STRONG_WEIGHT))
        battles, labels = [], Counter()
        for r in records:
            p = r.get("parsed") or {}
            for key, model_is_a in (("baseline_first", False), ("model_first", True)):
                v = p.get(key)
                labels[str(v)] += 1
                battles += battles_from_verdict("model", "baseline", v, model_is_a=model_is_a, group=str(r.get("id")), weight=weight)
        rounds = int(self.options.get("bootstrap", 100))
        bt = bootstrap_win_rate(battles, "model", "baseline", rounds=rounds, seed=int(self.options.get("bootstrap_seed", 42)))
        return {
            "score": _pct(bt["win_rate"]),
            "stderr": _pct(bt["boot_std"]),
            "ci_low": _pct(bt["ci_low"]),
            "ci_high": _pct(bt["ci_high"]),
            "ci": 95,
            "bootstrap_rounds": bt["rounds"],
            "baseline": self.baseline_name,
            "n": len(records),
            "n_games": 2 * len(records),
            "n_battles": len(battles),
            "n_unparseable_verdicts": sum(n for v, n in labels.items() if v not in VERDICTS),
            "verdicts": dict(sorted(labels.items())),
        }

    def protocol_extra(self) -> dict[str, Any]:
        cfg = self._config
        return {
            "prompt": "the question, one user turn, chat template",
            "system_prompt": None,
            "temperature": 0.0,
            "judge_config": cfg.source if cfg else f"{ARENA_CONFIG_REMOTE.describe()}:{ARENA_CONFIG_PATH}",
            "judge_prompt_sha": _digest(cfg.system_prompt + "\0" + "\0".join(cfg.prompt_template)) if cfg else None,
            "judge_regex": cfg.regex_pattern if cfg else None,
            "judge_temperature": cfg.temperature if cfg else None,
            "judge_max_tokens": self.judge_max_tokens if cfg else None,
            "judge_attempts": cfg.attempts if cfg else None,
            "reference_judge": cfg.judge_model if cfg else None,
            "baseline": self.baseline_name,
            "strong_weight": int(self.options.get("weight", STRONG_WEIGHT)),
            "bootstrap": {"rounds": int(self.options.get("bootstrap", 100)), "seed": int(self.options.get("bootstrap_seed", 42)), "resample": "battle rows"},
        }


def _points(verdict: str | None, model_is_a: bool) -> float:
    if verdict == "A=B":
        return 0.5
    return 1.0 if str(verdict).startswith("A>") == model_is_a else 0.0


def _pct(x: float) -> float | None:
    # utils_math.py:get_win_rate_column: round(x * 100, 2)
    return None if x != x else round(100 * x, 2)


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
