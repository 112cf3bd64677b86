"""Resumable evaluation runs.

A run directory holds ``results.json`` (config, subject, per-benchmark scores, timings) and one
``NAME.jsonl`` per benchmark with a line per item (``id``, ``response``, ``parsed``, ``score``,
``weights``, ...). Items already in ``NAME.jsonl`` are never regenerated, so an interrupted run picks
up where it stopped and a later run with a larger ``--limit`` only does the new items (the seeded
subsample of a larger limit contains the smaller one). The model is loaded only if some item is
left to generate.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from personafuse.chat import Generation
from personafuse.evaluation.benchmarks import Benchmark, Item, ScoreContext, get_benchmark
from personafuse.evaluation.benchmarks.base import prompt_hash
from personafuse.evaluation.config import EvalConfig as EvalConfig  # re-exported: its old home
from personafuse.evaluation.data import subsample
from personafuse.fileio import atomic_write, end_torn_tail, read_jsonl

RESULTS = "results.json"


def _cot_field(gens: Sequence[Generation]) -> dict[str, Any]:
    """``{"persona_cot": full reply(s)}`` for Persona-CoT prompting (``response`` holds only the
    answer section that was scored); nothing for other subjects."""
    full = [g.extra.get("persona_cot") for g in gens]
    if full[0] is None:
        return {}
    return {"persona_cot": full[0] if len(full) == 1 else full}


class RunMismatch(RuntimeError):
    pass


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records by id from a run's JSONL (:func:`personafuse.fileio.read_jsonl`: a torn last line, a
    crash mid-write, is dropped; a corrupt one elsewhere names its line)."""
    if not path.is_file():
        return {}
    return {str(rec["id"]): rec for _, rec in read_jsonl(path, hint="; delete the line to redo that item")}


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default))


def _unset_dropped(d: Mapping[str, Any]) -> dict[str, Any]:
    """Identity without unset (None/empty) entries, so adding a new option keeps old runs resumable."""
    return {k: v for k, v in d.items() if v not in (None, {}, [])}


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, set | tuple):
        return list(o)
    return str(o)


def _mean_weights(ws: Sequence[Mapping[str, float] | None]) -> dict[str, float] | None:
    ws = [w for w in ws if w]
    if not ws:
        return None
    return {k: statistics.fmean(float(w.get(k, 0.0)) for w in ws) for k in ws[0]}


class Runner:
    """Runs benchmarks for one subject into one directory."""

    def __init__(
        self,
        cfg: EvalConfig,
        subject_factory: Callable[[], Any],
        *,
        judge_factory: Callable[[], Any] | None = None,
        embedder_factory: Callable[[], Any] | None = None,
        progress: bool = True,
        overwrite: bool = False,
        rescore: bool = False,
    ) -> None:
        self.cfg = cfg
        self.rescore = rescore  # re-parse and re-score stored responses (after a scorer fix)
        self.out = Path(cfg.out)
        self._subject_factory = subject_factory
        self._judge_factory = judge_factory
        self._embedder_factory = embedder_factory
        self._subject: Any = None
        self.progress = progress
        self.ctx = ScoreContext(seed=cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = self._open(overwrite)

    # ---- state -----------------------------------------------------------------------
    def _open(self, overwrite: bool) -> dict[str, Any]:
        p = self.out / RESULTS
        if p.is_file() and not overwrite:
            old = json.loads(p.read_text(encoding="utf-8"))
            old_id = old.get("config", {}).get("identity")
            new_id = json.loads(json.dumps(self.cfg.identity(), default=_json_default))
            if old_id is not None and _unset_dropped(old_id) != _unset_dropped(new_id):
                raise RunMismatch(
                    f"{p} was written by a different configuration ({old_id}); use another --out or --overwrite"
                )
            old["config"] = self._config_block()
            return old
        if overwrite:
            for f in self.out.glob("*.jsonl"):
                f.unlink()
        return {"config": self._config_block(), "subject": None, "benchmarks": {}, "timings": {}}

    def _config_block(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "identity": json.loads(json.dumps(self.cfg.identity(), default=_json_default))}

    @property
    def subject(self) -> Any:
        if self._subject is None:
            t = time.perf_counter()
            self._subject = self._subject_factory()
            self.results["timings"]["load_model_s"] = round(time.perf_counter() - t, 3)
            self.results["subject"] = self._subject.describe()
        return self._subject

    def _ensure_ctx(self, bench: Benchmark) -> None:
        if bench.needs_judge and self.ctx.judge is None:
            if self._judge_factory is None:
                raise RuntimeError(f"{bench.name} needs an LLM judge: pass --judge")
            self.ctx.judge = self._judge_factory()
        if bench.needs_embedder and self.ctx.embedder is None:
            if self._embedder_factory is None:
                from personafuse.evaluation.embedding import SentenceEmbedder

                self._embedder_factory = SentenceEmbedder.from_pretrained
            self.ctx.embedder = self._embedder_factory()

    # ---- main loop -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        for name in self.cfg.benchmarks:
            self.run_benchmark(name)
        return self.results

    def run_benchmark(self, name: str) -> dict[str, Any]:
        # "subject": what a reference's default may depend on (EQ-Bench's system message for local
        # models, EmoBench's /no_think for Qwen names); the protocol records what it chose.
        subject = {"model": self.cfg.model, "system_prompt": self.cfg.system_prompt}
        opts = {"seed": self.cfg.seed, "subject": subject, **self.cfg.options.get(name, {})}
        bench = get_benchmark(name, opts)
        if self.cfg.max_new_tokens:  # --max-new-tokens: the limit used is the one results.json records
            bench.max_new_tokens = self.cfg.max_new_tokens
        items = subsample(bench.load(self.cfg.data), self.cfg.limit, self.cfg.item_seed)
        path = self.out / f"{bench.name}.jsonl"
        done = read_records(path)
        rescored = self._rescore(bench, items, done, path) if self.rescore else None
        todo = [it for it in items if it.id not in done]
        t0 = time.perf_counter()
        gen_s = 0.0
        if todo:
            self._ensure_ctx(bench)
            bar = _progress(total=len(items), initial=len(items) - len(todo), desc=bench.name, enabled=self.progress)
            end_torn_tail(path)  # a killed run's cut line: appending after it would corrupt the next record
            with path.open("a", encoding="utf-8") as f:
                for s in range(0, len(todo), self.cfg.chunk_size):
                    chunk = todo[s : s + self.cfg.chunk_size]
                    recs, g = self._do_chunk(bench, chunk)
                    gen_s += g
                    for r in recs:
                        f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")
                        done[r["id"]] = r
                    f.flush()
                    bar.update(len(chunk))
            bar.close()
        selected = [done[it.id] for it in items]
        agg = bench.aggregate(selected)
        agg["n_items"] = len(items)
        if cot := [r["persona_cot"] for r in selected if isinstance(r.get("persona_cot"), dict)]:
            # Persona-CoT prompting: items whose cues or traits step failed (scored as unparsed)
            fails = [c["failed_step"] for c in cot if c.get("failed_step")]
            agg["persona_cot_failed"] = {step: fails.count(step) for step in sorted(set(fails))}
        agg["protocol"] = {**bench.protocol(), "prompt_hash": prompt_hash([_stored_prompt(bench.prompts(it)) for it in items])}
        if rescored is not None:
            old = self.results["benchmarks"].get(bench.name, {}).get("score")
            agg["rescore"] = {**rescored, "old_score": old, "new_score": agg.get("score")}
        weights = _mean_weights([r.get("weights") for r in selected])
        if weights:
            agg["mean_weights"] = weights
        self.results["benchmarks"][bench.name] = agg
        tm = self.results["timings"].setdefault(bench.name, {})
        tm["last_session_s"] = round(time.perf_counter() - t0, 3)
        tm["last_session_generate_s"] = round(gen_s, 3)
        tm["last_session_items"] = len(todo)
        tm["total_generate_s"] = round(sum(float(r.get("time_s", 0)) for r in selected), 3)
        _write_json_atomic(self.out / RESULTS, self.results)
        return agg

    def _rescore(self, bench: Benchmark, items: Sequence[Item], done: dict[str, dict[str, Any]], path: Path) -> dict[str, Any]:
        """Re-parse and re-score stored replies under today's scorer. A reply is only re-scored if it
        answered the prompt today's protocol sends: otherwise its score would not mean what the
        protocol says, so the run is refused (regenerate into a new directory)."""
        sel = [it for it in items if it.id in done]
        if not sel:
            return {"items": 0, "items_changed": 0}
        for it in sel:
            stored = json.loads(json.dumps(done[it.id].get("prompt"), default=_json_default))
            today = json.loads(json.dumps(_stored_prompt(bench.prompts(it)), default=_json_default))
            if stored != today:
                ref = bench.reference.repo + "@" + bench.reference.commit if bench.reference else "its protocol"
                raise RunMismatch(
                    f"{path}: item {it.id!r} was answered with a different prompt than {bench.name} sends today "
                    f"({ref}); --rescore re-scores replies to the same prompt only: regenerate them with another --out"
                )
        self._ensure_ctx(bench)
        responses = [[r] if isinstance(r := done[it.id]["response"], str) else list(r) for it in sel]
        changed = 0
        for it, sc in zip(sel, bench.score_batch(sel, responses, self.ctx), strict=True):
            before = {k: done[it.id].get(k) for k in sc}
            changed += before != json.loads(json.dumps(sc, default=_json_default))
            done[it.id].update(sc)
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in done.values()))
        return {"items": len(sel), "items_changed": changed}

    def _do_chunk(self, bench: Benchmark, chunk: Sequence[Item]) -> tuple[list[dict[str, Any]], float]:
        prompts = [bench.prompts(it) for it in chunk]
        flat = [bench.send(p) for ps in prompts for p in ps]
        max_new = bench.max_new_tokens
        t = time.perf_counter()
        gens = self.subject.generate(flat, max_new_tokens=max_new, do_sample=False)
        gen_s = time.perf_counter() - t
        per_item_s = gen_s / max(len(chunk), 1)
        grouped, k = [], 0
        for ps in prompts:
            grouped.append(gens[k : k + len(ps)])
            k += len(ps)
        scored = bench.score_batch(chunk, [[g.text for g in gs] for gs in grouped], self.ctx)
        recs = []
        for it, ps, gs, sc in zip(chunk, prompts, grouped, scored, strict=True):
            rec: dict[str, Any] = {
                "id": it.id,
                "prompt": _stored_prompt(ps),
                "response": gs[0].text if len(gs) == 1 else [g.text for g in gs],
                "weights": gs[0].weights if len(gs) == 1 else _mean_weights([g.weights for g in gs]),
                "categories": it.categories,
                "attempts": 1,
                "time_s": round(per_item_s, 4),
                **sc,
            }
            rec.update(_cot_field(gs))
            recs.append(rec)
        # Benchmarks with a retry rule (EQ-Bench): resample unparseable answers, temperature rising.
        first_partial: dict[int, dict[str, Any]] = {}
        for attempt in range(2, bench.max_attempts + 1):
            pend = [i for i, r in enumerate(recs) if bench.needs_retry(r)]
            if not pend:
                break
            for i in pend:
                if i not in first_partial and bench.partial(recs[i]):
                    first_partial[i] = dict(recs[i])
            temp = bench.retry_temperature_of(attempt)
            t = time.perf_counter()
            regen = self.subject.generate([bench.send(prompts[i][0]) for i in pend], max_new_tokens=max_new, do_sample=True, temperature=temp, seed=self.cfg.seed + attempt)
            dt = time.perf_counter() - t
            gen_s += dt
            for i in pend:  # retries count towards the item's generation time
                recs[i]["time_s"] = round(recs[i]["time_s"] + dt / len(pend), 4)
            rescored = bench.score_batch([chunk[i] for i in pend], [[g.text] for g in regen], self.ctx)
            for i, g, sc in zip(pend, regen, rescored, strict=True):
                recs[i].update({"response": g.text, "weights": g.weights, "attempts": attempt, "temperature": round(temp, 3), **sc, **_cot_field([g])})
        # Out of attempts without a success: the first partial result stands (not the last reply).
        for i, kept in first_partial.items():
            if bench.needs_retry(recs[i]):
                recs[i] = {**kept, "attempts": recs[i]["attempts"], "time_s": recs[i]["time_s"]}
        return recs, gen_s


def _stored_prompt(prompts: Sequence[Any]) -> Any:
    """A record's ``prompt`` field: the one prompt, or the list when an item has several."""
    return prompts[0] if len(prompts) == 1 else list(prompts)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="item", dynamic_ncols=True)


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(run_dir)
    p = p / RESULTS if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no results.json (is this a run directory?)")
    return json.loads(p.read_text(encoding="utf-8"))
