"""The cells of the experiment grid, in the order they run, and what is cached.

data[mode] -> (relabel) -> train[variant, seed] -> eval[variant, seed] -> report. A cell's
folder is ``OUT/<cell name>``; a cell is done when its ``done.json`` exists (written last), so a
run killed at any point redoes at most the cell in progress. Untrained variants (``base``,
``pcot_prompting``) have no train cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse.reproduce.config import TRAINING_DATA, ReproduceConfig

DATA_MODES = ("persona_cot", "direct", "human_like")
# Generations per evaluated item (ToMBench asks each item five times, options shuffled).
ASKS_PER_ITEM = {"tombench": 5}
# Judge requests per item (Arena-Hard judges both orders; MentalChat16K once).
JUDGE_CALLS_PER_ITEM = {"arenahard": 2, "mentalchat": 1}
# Teacher requests per query: the three Persona-CoT steps (free mode), one for the baselines.
TEACHER_CALLS_PER_QUERY = {"persona_cot": 3, "direct": 1, "human_like": 1}


@dataclass(frozen=True)
class Cell:
    kind: str  # data | relabel | train | eval | report
    name: str  # its folder under OUT, e.g. "train/personafuse/seed0"
    needs: tuple[str, ...] = ()

    def done(self, out: Path) -> bool:
        return (out / self.name / "done.json").is_file()


def plan(cfg: ReproduceConfig) -> list[Cell]:
    """Every cell of ``cfg``'s grid, each after the cells it needs."""
    modes = [m for m in DATA_MODES if any(TRAINING_DATA.get(v) == m for v in cfg.variants)]
    cells = [Cell("data", f"data/{m}") for m in modes]
    source = {m: f"data/{m}" for m in modes}
    if cfg.data.labeller == "tat" and "persona_cot" in modes:
        cells.append(Cell("relabel", "relabel/persona_cot", ("data/persona_cot",)))
        source["persona_cot"] = "relabel/persona_cot"
    evals = []
    for seed in cfg.seeds:
        for v in cfg.variants:
            needs: tuple[str, ...] = ()
            if v in TRAINING_DATA:
                train = Cell("train", f"train/{v}/seed{seed}", (source[TRAINING_DATA[v]],))
                cells.append(train)
                needs = (train.name,)
            evals.append(Cell("eval", f"eval/{v}/seed{seed}", needs))
    cells += evals
    cells.append(Cell("report", "report", tuple(c.name for c in evals)))
    return cells


def estimate(cfg: ReproduceConfig) -> dict[str, Any]:
    """Rough request counts before anything runs: teacher requests for the data, generations and
    judge requests for the evaluation (items per benchmark = ``eval.limit``; None: "all")."""
    modes = {c.name.split("/")[1] for c in plan(cfg) if c.kind == "data"}
    teacher = sum(TEACHER_CALLS_PER_QUERY[m] * cfg.data.limit for m in modes)
    runs = len(cfg.variants) * len(cfg.seeds)
    if cfg.eval.limit is None:
        return {"teacher_requests": teacher, "generations": "all items", "judge_requests": "all items", "eval_runs": runs}
    gen = sum(ASKS_PER_ITEM.get(b, 1) * cfg.eval.limit for b in cfg.eval.benchmarks) * runs
    judge = sum(JUDGE_CALLS_PER_ITEM.get(b, 0) * cfg.eval.limit for b in cfg.eval.benchmarks) * runs
    return {"teacher_requests": teacher, "generations": gen, "judge_requests": judge, "eval_runs": runs}
