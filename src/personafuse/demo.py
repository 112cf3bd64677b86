"""``make demo``: the whole pipeline on the embedded models, on two CPU cores, in minutes.

1. Persona-CoT data: the embedded SmolLM2 teacher writes records for a shuffled sample of the seed
   queries (cached: a rerun reuses them); the TAT labeller (paper Table 1) relabels their trait
   vectors.
2. Training: the three stages, briefly (cached per stage).
3. Contrasting queries, each reply shown with its ten routing weights and how far the router favours
   the poles Table 1 expects; then the router's agreement on the shipped held-out file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from personafuse.training.config import StageConfig, TrainConfig

console = Console()

DEMO_QUERIES = [
    "I've been feeling really anxious lately and I can't sleep before my exams. What should I do?",
    "Solve for x: 3x + 7 = 22. Show the steps.",
    "Let's brainstorm wild names for a coffee shop run by robots!",
]
# The Table 1 situation each demo query belongs to (its expected and opposed poles: routing_analysis).
DEMO_SITUATIONS = ["therapist", "math", "creativity"]
# Replies must end on the model's end-of-sequence token: at 384 the anxious student's five-point
# answer was cut off mid-sentence (SmolLM2-135M-Instruct writes long lists; no repetition loop).
DEMO_MAX_NEW_TOKENS = 768


def demo_config(out: Path) -> TrainConfig:
    """Steps small enough for two CPU cores; the paper's losses, tau 1 and stage order. Every stage
    reads the 24 TAT-labelled records: the router stage's 120 steps of 8 see each of them 40 times,
    while all 312 labelled seed queries (``router_data``) would each be seen three times, too few to
    separate creativity (docs/training.md, router experiments)."""
    tc = TrainConfig(
        data=str(out / "data_tat"), out=str(out / "train"), max_length=320, save_every=20, mixed_precision="no",
    )
    tc.warmup = StageConfig(steps=24, batch_size=1, grad_accum=1, lr=1e-3, micro_batch_size=4)
    # The encoder's pretrained body at 1e-5: at 1e-3 it forgets the situations (probing 82.5 % ->
    # 60.3 %) and the router ends worse than untrained (issue 34's measurements).
    tc.router = StageConfig(steps=120, batch_size=8, lr=3e-3, encoder_lr=1e-5, micro_batch_size=8)
    tc.joint = StageConfig(steps=8, batch_size=4, lr=2e-4, encoder_lr=1e-5, micro_batch_size=4)
    return tc


def _count_records(data: Path) -> int:
    return sum(sum(1 for line in f.open() if line.strip()) for f in data.glob("records*.jsonl")) if data.is_dir() else 0


def _generate(data: Path, queries: int) -> None:
    cmd = [
        sys.executable, "-m", "personafuse.cli", "data", "generate", "--teacher", "default", "--source", "seeds",
        "--shuffle", "--seed", "0", "--limit", str(queries), "--max-new-tokens", "160", "--out", str(data),
    ]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _tat_label(out: Path) -> None:
    """``data_tat``: the generated records with TAT vectors."""
    from personafuse.data.tat_labeller import TATLabeller, relabel_records

    if not _count_records(out / "data_tat"):
        shutil.rmtree(out / "data_tat", ignore_errors=True)
        relabel_records(out / "data", out / "data_tat", TATLabeller())


def _fresh_recipe(tc: TrainConfig) -> None:
    """Stages cached under an earlier recipe (other steps, teacher labels) are dropped, not reused."""
    train_dir = Path(tc.out)
    stamp = train_dir / "demo_recipe.json"
    recipe = json.dumps(tc.to_dict(), sort_keys=True)
    if train_dir.exists() and (not stamp.is_file() or stamp.read_text() != recipe):
        console.print(f"{train_dir} was trained with another recipe: training again")
        shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(recipe)


def run_demo(out: Path = Path("runs/demo"), queries: int = 24, max_new_tokens: int = DEMO_MAX_NEW_TOKENS) -> None:
    t_start = time.perf_counter()
    data = out / "data"
    have = _count_records(data)
    console.rule("[bold]1. Persona-CoT data (embedded SmolLM2 teacher) and TAT labels")
    if have >= max(queries // 2, 4):
        console.print(f"reusing {have} records in {data} (delete the folder to regenerate)")
    else:
        _generate(data, queries)
        console.print(f"{_count_records(data)} records written to {data}")
    console.print(
        "Trait vectors come from the TAT labeller (paper Table 1, matched with MiniLM), not the teacher: "
        "the 135M teacher's trait labels are noise (it tags an equation with low Agreeableness). "
        "A capable teacher's labels are used as they are."
    )
    _tat_label(out)
    t_data = time.perf_counter()

    console.rule("[bold]2. Three-stage training (brief, CPU)")
    from personafuse.training.stages import train

    tc = demo_config(out)
    _fresh_recipe(tc)
    final = train(tc, "all", resume=True)
    t_train = time.perf_counter()

    console.rule("[bold]3. Contrasting queries")
    from personafuse.moe.model import PersonaFuseModel

    pf = PersonaFuseModel.from_pretrained(final).eval()
    _show_contrasts(pf, max_new_tokens)
    _show_agreement(pf)
    t_end = time.perf_counter()
    console.print(
        f"[dim]data {t_data - t_start:.0f}s · training {t_train - t_data:.0f}s · answers {t_end - t_train:.0f}s · "
        f"total {t_end - t_start:.0f}s · model in {final}[/dim]"
    )


def _show_contrasts(pf, max_new_tokens: int) -> None:
    from personafuse.display import show_reply
    from personafuse.traits import TAT_PRIOR, TRAIT_POLES

    sides = _table1_sides()
    for q, sit, gen in zip(DEMO_QUERIES, DEMO_SITUATIONS, pf.generate(DEMO_QUERIES, max_new_tokens=max_new_tokens), strict=True):
        show_reply(q, gen, console)
        w = gen.weights if isinstance(gen.weights, dict) else dict(zip(TRAIT_POLES, gen.weights, strict=True))
        pos, neg = sides[sit]
        mp, mn = sum(w[p] for p in pos) / len(pos), sum(w[p] for p in neg) / len(neg)
        top = max(w, key=w.get)
        ok = mp >= 1.5 * mn and top in TAT_PRIOR[sit]
        console.print(
            f"Table 1 ({sit}): expected {', '.join(pos)} {mp:.3f} vs opposed {', '.join(neg)} {mn:.3f} = {mp / mn:.2f}x; "
            f"top pole {top} {'(expected)' if top in TAT_PRIOR[sit] else '(NOT expected)'} {'✓' if ok else '✗'}\n"
        )


def _table1_sides() -> dict[str, tuple[list[str], list[str]]]:
    from personafuse.evaluation.routing_analysis import heldout_path, read_expectations

    return {r["situation"]: (r["positive"], r["negative"]) for r in read_expectations(heldout_path())}


def _show_agreement(pf) -> None:
    from personafuse.evaluation.routing_analysis import agreement_markdown, routing_agreement

    res = routing_agreement(lambda qs: pf.route(qs))
    console.print("Router agreement with Table 1 on the held-out file (65 queries no training source holds):")
    console.print(agreement_markdown(res), markup=False)
