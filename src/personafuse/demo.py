"""``make demo``: the whole pipeline on the embedded models, on two CPU cores, in minutes.

1. Persona-CoT data: the embedded SmolLM2 teacher writes records for a shuffled sample of the seed
   queries (cached: a rerun reuses them).
2. Training: the three stages, briefly (cached per stage).
3. Contrasting queries, each reply shown with its ten routing weights.
"""

from __future__ import annotations

import os
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


def demo_config(out: Path) -> TrainConfig:
    """Steps small enough for two CPU cores; the paper's recipe otherwise (losses, ratios of lr)."""
    tc = TrainConfig(data=str(out / "data"), out=str(out / "train"), max_length=320, save_every=20, mixed_precision="no")
    tc.warmup = StageConfig(steps=24, batch_size=1, grad_accum=1, lr=1e-3, micro_batch_size=4)
    tc.router = StageConfig(steps=60, batch_size=8, lr=1e-3, micro_batch_size=8)
    tc.joint = StageConfig(steps=8, batch_size=4, lr=2e-4, micro_batch_size=4)
    return tc


def _count_records(data: Path) -> int:
    return sum(sum(1 for line in f.open() if line.strip()) for f in data.glob("records*.jsonl")) if data.is_dir() else 0


def run_demo(out: Path = Path("runs/demo"), queries: int = 24, max_new_tokens: int = 64) -> None:
    t_start = time.perf_counter()
    data = out / "data"
    have = _count_records(data)
    console.rule("[bold]1. Persona-CoT data (embedded SmolLM2 teacher)")
    if have >= max(queries // 2, 4):
        console.print(f"reusing {have} records in {data} (delete the folder to regenerate)")
    else:
        cmd = [
            sys.executable, "-m", "personafuse.cli", "data", "generate", "--teacher", "default", "--source", "seeds",
            "--shuffle", "--seed", "0", "--limit", str(queries), "--max-new-tokens", "160", "--out", str(data),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, check=True, env=env)
        have = _count_records(data)
        console.print(f"{have} records written to {data}")
    t_data = time.perf_counter()

    console.rule("[bold]2. Three-stage training (brief, CPU)")
    from personafuse.training.stages import train

    tc = demo_config(out)
    final = train(tc, "all", resume=True)
    t_train = time.perf_counter()

    console.rule("[bold]3. Contrasting queries")
    from personafuse.display import show_reply
    from personafuse.moe.model import PersonaFuseModel

    pf = PersonaFuseModel.from_pretrained(final).eval()
    for q, gen in zip(DEMO_QUERIES, pf.generate(DEMO_QUERIES, max_new_tokens=max_new_tokens), strict=True):
        show_reply(q, gen, console)
    t_end = time.perf_counter()
    console.print(
        f"[dim]data {t_data - t_start:.0f}s · training {t_train - t_data:.0f}s · answers {t_end - t_train:.0f}s · "
        f"total {t_end - t_start:.0f}s · model in {final}[/dim]"
    )
