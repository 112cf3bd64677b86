"""Why do trained routers stay flat? One router-stage experiment per call, scored on the shipped
held-out file (hit rate, contrast) and by situation probing on the 312 seed queries.

    python benchmarks/router_flatness.py --name base-recipe --steps 30 --lr 1e-3 --encoder-lr 1e-5
    python benchmarks/router_flatness.py --reference untrained|random|tat|tat-ideal
    python benchmarks/router_flatness.py --name joint --model runs/demo/train/joint/model --score-only

Each call appends one JSON line to ``--log`` (default runs/router_flatness.jsonl); the table in
docs/training.md is read from those lines. The router stage reads only queries and their ``p``, so
experiments start from an untrained model (no warm-up) with the seed queries as records (responses
are never read by this stage).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from personafuse.data.schema import Record
from personafuse.data.sources import seed_queries
from personafuse.evaluation.routing_analysis import routing_agreement


def tat_labels(queries: list[str]) -> list[tuple[int, ...]]:
    from personafuse.data.tat_labeller import TATLabeller

    return [tuple(lab.p) for lab in TATLabeller().label(queries)]


def teacher_records(path: str) -> list[Record]:
    """The teacher's own vectors of a relabelled folder (``raw.teacher_p``), or of a generated one."""
    out = []
    for f in sorted(Path(path).glob("records*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                p = (r.get("raw") or {}).get("teacher_p") or r["p"]
                out.append(Record(r["id"], r["query"], r["response"], tuple(p), f"{f}"))
    return out


def probe(pf) -> float:
    from personafuse.evaluation.probing import probe_accuracy

    qs = seed_queries()
    with torch.no_grad():
        x = np.concatenate([pf.persona_embeddings([q.text for q in qs[i : i + 64]]).float().numpy() for i in range(0, len(qs), 64)])
    return probe_accuracy(x, [q.situation for q in qs])["accuracy"]


def reference(kind: str) -> dict:
    if kind == "random":  # weights from random cosines in [-1, 1]: a router that ignores the query
        rng = random.Random(0)
        return routing_agreement(lambda qs: [torch.softmax(torch.tensor([rng.uniform(-1, 1) for _ in range(10)]), 0).tolist() for _ in qs])
    if kind == "tat":  # the labeller's poles at equal weight, nothing elsewhere
        return routing_agreement(lambda qs: [[v / sum(p) for v in p] for p in tat_labels(qs)])
    if kind == "tat-ideal":  # a router that fits the TAT labels exactly under eq. (3) with m = 0, tau = 1
        return routing_agreement(lambda qs: [torch.softmax(torch.tensor(p, dtype=torch.float), 0).tolist() for p in tat_labels(qs)])
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="")
    ap.add_argument("--reference", choices=["untrained", "random", "tat", "tat-ideal"])
    ap.add_argument("--model", help="score this saved model (with --score-only) or start from it")
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--labels", default="tat", help="tat (seed queries) or a records folder (teacher's p)")
    ap.add_argument("--limit", type=int, default=0, help="first N of the shuffled seed queries (0: all 312)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--encoder-lr", type=float, default=1e-5)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--out", default="/tmp/router_flatness")
    ap.add_argument("--log", default="runs/router_flatness.jsonl")
    a = ap.parse_args()
    t0 = time.perf_counter()
    from personafuse.moe.model import PersonaFuseModel

    row: dict = {"name": a.name or a.reference, "argv": " ".join(__import__("sys").argv[1:])}
    if a.reference and a.reference != "untrained":
        res, acc = reference(a.reference), None
    else:
        pf = PersonaFuseModel.from_pretrained(a.model) if a.model else PersonaFuseModel.from_config(__import__("personafuse.moe.config", fromlist=["x"]).PersonaFuseConfig())
        if not (a.score_only or a.reference):
            train_router(pf, a, row)
        pf.eval()
        res = routing_agreement(lambda qs: pf.route(qs))
        acc = probe(pf)
    row.update(hit_rate=res["hit_rate"], hit_rate_ci=res["hit_rate_ci"], contrast=res["contrast"], probing=acc,
               by_situation={s: (round(v["hit_rate"], 3), round(v["contrast"], 3)) for s, v in res["by_situation"].items()},
               seconds=round(time.perf_counter() - t0))
    print(json.dumps(row))
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    with open(a.log, "a") as f:
        f.write(json.dumps(row) + "\n")


def train_router(pf, a, row: dict) -> None:
    from personafuse.training.config import StageConfig, TrainConfig
    from personafuse.training.stages import run_router

    if a.labels == "tat":
        qs = [q.text for q in seed_queries()]
        random.Random(0).shuffle(qs)
        qs = qs[: a.limit] if a.limit else qs
        records = [Record(str(i), q, ".", p, "seeds") for i, (q, p) in enumerate(zip(qs, tat_labels(qs), strict=True))]
    else:
        records = teacher_records(a.labels)
        if a.limit:
            records = records[: a.limit]
    tc = TrainConfig(data="-", out=f"{a.out}/{a.name}", mixed_precision="no", save_every=10**6, margin=a.margin, beta=a.beta)
    tc.router = StageConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, encoder_lr=a.encoder_lr, micro_batch_size=a.batch)
    res = run_router(pf, records, tc)
    row.update(records=len(records), loss_first=res.losses[0]["loss_router"], loss_last=res.losses[-1]["loss_router"])
    if not math.isfinite(row["loss_last"]):
        raise SystemExit("router loss is not finite")


if __name__ == "__main__":
    main()
