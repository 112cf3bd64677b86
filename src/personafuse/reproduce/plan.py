"""The cells of the experiment grid, in the order they run, and what is cached.

queries -> data[mode] -> (relabel) -> train[variant, seed] -> eval[variant, seed] and
replies[variant] -> report. A cell's folder is ``OUT/<cell name>``; a cell is done when its
``done.json`` exists (written last), so a run killed at any point redoes at most the cell in
progress. Untrained variants (``base``, ``pcot_prompting``) have no train cell. What each variant
needs is its row in reproduce/variants.py; what each benchmark costs is its class's facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse.reproduce.config import ReproduceConfig
from personafuse.reproduce.variants import PERSONAFUSE, variant

DATA_MODES = ("persona_cot", "direct", "human_like")
# Teacher requests per query: the three Persona-CoT steps (free mode), one for the baselines.
TEACHER_CALLS_PER_QUERY = {"persona_cot": 3, "direct": 1, "human_like": 1}
QUERIES = "queries"


@dataclass(frozen=True)
class Cell:
    kind: str  # queries | data | relabel | train | eval | replies | report
    name: str  # its folder under OUT, e.g. "train/personafuse/seed0"
    needs: tuple[str, ...] = ()

    def done(self, out: Path) -> bool:
        return (out / self.name / "done.json").is_file()

    @property
    def variant(self) -> str:
        return self.name.split("/")[1]

    @property
    def seed(self) -> int:
        return int(self.name.rsplit("seed", 1)[1])


def plan(cfg: ReproduceConfig) -> list[Cell]:
    """Every cell of ``cfg``'s grid, each after the cells it needs."""
    variants = cfg.all_variants()
    rows = {v: variant(v) for v in variants}
    modes = [m for m in DATA_MODES if any(r.data == m for r in rows.values())]
    cells = [Cell("queries", QUERIES)] + [Cell("data", f"data/{m}", (QUERIES,)) for m in modes]
    source = {m: f"data/{m}" for m in modes}
    tat_source = source.get("persona_cot")
    if cfg.data.labeller in ("tat", "both") and "persona_cot" in modes:
        cells.append(Cell("relabel", "relabel/persona_cot", ("data/persona_cot",)))
        tat_source = "relabel/persona_cot"
        if cfg.data.labeller == "tat":
            source["persona_cot"] = tat_source
    evals, replies = [], []
    for seed in cfg.seeds:
        # PersonaFuse trains first: the variants that share its warm-up experts copy them
        for v in sorted((v for v in variants if rows[v].trained), key=lambda v: v != PERSONAFUSE):
            data = tat_source if rows[v].relabelled else source[rows[v].data]  # type: ignore[index]
            warm = (f"train/{PERSONAFUSE}/seed{seed}",) if rows[v].shares_warmup and PERSONAFUSE in variants else ()
            # every data cell: a variant trains on the queries all modes accepted (reproduce/fairness.py)
            others = tuple(f"data/{m}" for m in modes if f"data/{m}" != data)
            cells.append(Cell("train", f"train/{v}/seed{seed}", (data, *warm, *others)))  # type: ignore[arg-type]
        for v in variants:
            needs = (f"train/{v}/seed{seed}",) if rows[v].trained else ()
            evals.append(Cell("eval", f"eval/{v}/seed{seed}", needs))
            if seed == cfg.seeds[0]:  # one set of replies per variant for the pairwise study
                replies.append(Cell("replies", f"replies/{v}/seed{seed}", (QUERIES, *needs)))
    cells += evals + replies
    cells.append(Cell("report", "report", tuple(c.name for c in evals + replies)))
    return cells


def estimate(cfg: ReproduceConfig) -> dict[str, Any]:
    """Rough request counts before anything runs: teacher requests for the data, generations and
    judge requests for the evaluation (items per benchmark = ``eval.limit``; None: "all")."""
    modes = {c.name.split("/")[1] for c in plan(cfg) if c.kind == "data"}
    teacher = sum(TEACHER_CALLS_PER_QUERY[m] * cfg.data.limit for m in modes)
    runs = len(cfg.all_variants()) * len(cfg.seeds)
    replies = len(cfg.all_variants()) * cfg.data.heldout * situation_count(cfg)
    if cfg.eval.limit is None:
        return {"teacher_requests": teacher, "generations": "all items", "judge_requests": "all items", "eval_runs": runs,
                "reply_generations": replies}
    from personafuse.evaluation.benchmarks import BENCHMARKS, canonical_name

    benches = [BENCHMARKS[canonical_name(b)] for b in cfg.eval.benchmarks]
    gen = sum(b.generations_per_item * cfg.eval.limit for b in benches) * runs
    judge = sum(b.judge_calls_per_item * cfg.eval.limit for b in benches) * runs
    return {"teacher_requests": teacher, "generations": gen, "judge_requests": judge, "eval_runs": runs,
            "reply_generations": replies}


def situation_count(cfg: ReproduceConfig) -> int:
    """Situations in the query source (the bundled seeds: 12); 1 for sources that cannot be read
    cheaply before the run (the estimate then counts one held-out group)."""
    if "seeds" not in cfg.data.sources:
        return 1
    from personafuse.data.sources import seed_queries

    return len({q.situation for q in seed_queries()})
