"""The router stage on cached encoder states: many recipes in minutes on two CPU cores.

The router stage's expensive part is the SmolLM2 encoder body, which the recipe trains at 1e-5 and
so barely moves in a few hundred steps. This script pools the body's states once (312 seed queries,
the 65 held-out queries, the ten pole descriptions; cached in ``--cache``), then trains only the
projection and the expert embeddings with the stage's own loss (``losses.router_loss``), batches
(``plans.same_p_plan``), optimiser, schedule and clipping, and scores each recipe on the held-out
file (hit rate, contrast) and by situation probing of the projected seed states. Recipes are Python
dicts on the command line::

    python benchmarks/router_sweep_cached.py "dict(steps=30, lr=1e-3)" "dict(steps=120, lr=3e-3, center=True)"

keys: steps, batch, lr, margin, beta, limit (first N shuffled seed queries; ``subset`` seeds the
shuffle: 0 gives the 24 queries ``make demo`` generates records for), seed (the batch order),
center (True or "descriptions": subtract the mean pooled state of the pole descriptions, as
PersonaEncoder does; "train": the mean of the training queries). Each result also gives the
``demo`` queries' Table 1 ratio and top pole ("!" when the top pole is not an expected one). benchmarks/router_flatness.py
runs the real stage (body included) for the rows that need it.
"""

from __future__ import annotations

import ast
import math
import random
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def build_cache(path: Path) -> dict:
    from personafuse.data.sources import seed_queries
    from personafuse.data.tat_labeller import TATLabeller
    from personafuse.demo import DEMO_QUERIES
    from personafuse.evaluation.routing_analysis import heldout_path, read_expectations
    from personafuse.moe.config import PersonaFuseConfig
    from personafuse.moe.model import PersonaFuseModel
    from personafuse.traits import POLE_DESCRIPTIONS, TRAIT_POLES

    pf = PersonaFuseModel.from_config(PersonaFuseConfig()).eval()

    def pooled(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 32):
            enc = pf.encode_queries(texts[i : i + 32])
            out.append(pf.router.encoder.pooled(enc["input_ids"], enc["attention_mask"]).float())
        return torch.cat(out)

    seeds = seed_queries()
    rows = read_expectations(heldout_path())
    desc = [f"{p.replace('_', ' ')}: {POLE_DESCRIPTIONS[p]}" for p in TRAIT_POLES]
    data = {
        "seed_x": pooled([q.text for q in seeds]), "seed_sit": [q.situation for q in seeds], "seed_q": [q.text for q in seeds],
        "seed_p": torch.tensor([lab.p for lab in TATLabeller().label([q.text for q in seeds])]).float(),
        "held_x": pooled([r["query"] for r in rows]), "held": rows, "desc_x": pooled(desc), "demo_x": pooled(DEMO_QUERIES),
        "proj": pf.router.encoder.proj.weight.detach().clone().float(),
    }
    torch.save(data, path)
    return data


def agreement(proj: torch.Tensor, e: torch.Tensor, x: torch.Tensor, rows: list[dict]) -> tuple[float, float, dict]:
    from personafuse.traits import POLE_INDEX

    w = torch.softmax(F.normalize(x @ proj.T, dim=-1) @ F.normalize(e, dim=-1).T, -1).tolist()
    per = []
    for r, wr in zip(rows, w, strict=True):
        pos = statistics.fmean(wr[POLE_INDEX[p]] for p in r["positive"])
        neg = statistics.fmean(wr[POLE_INDEX[p]] for p in r["negative"])
        per.append((r["situation"], pos > neg, pos / neg))
    by = {s: round(statistics.fmean(h for t, h, _ in per if t == s), 2) for s in dict.fromkeys(t for t, _, _ in per)}
    return round(statistics.fmean(h for _, h, _ in per), 3), round(statistics.median(c for _, _, c in per), 3), by


def run(data: dict, steps: int = 30, batch: int = 8, lr: float = 1e-3, margin: float = 0.0, beta: float = 1.0,
        limit: int = 0, center: bool | str = False, seed: int = 0, subset: int = 0) -> dict:
    from transformers import get_scheduler

    from personafuse.data.schema import Record
    from personafuse.evaluation.probing import probe_accuracy
    from personafuse.training.losses import router_loss
    from personafuse.training.plans import same_p_plan

    idx = list(range(len(data["seed_q"])))
    random.Random(subset).shuffle(idx)
    idx = idx[:limit] if limit else idx
    if center == "train":
        c = data["seed_x"][idx].mean(0)
    else:
        c = data["desc_x"].mean(0) if center else torch.zeros(data["desc_x"].shape[1])
    seed_x, held_x = data["seed_x"] - c, data["held_x"] - c
    proj0 = data["proj"]
    e0 = (data["desc_x"] - c) @ proj0.T  # expert_init "descriptions"
    recs = [Record(str(i), data["seed_q"][i], ".", tuple(int(v) for v in data["seed_p"][i].tolist()), "") for i in idx]
    x = seed_x[idx]
    proj, e = proj0.clone().requires_grad_(), e0.clone().requires_grad_()
    opt = torch.optim.AdamW([proj, e], lr=lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=math.ceil(0.03 * steps), num_training_steps=steps)
    plan = same_p_plan(recs, batch, steps, seed)
    loss = float("nan")
    for s in range(steps):
        ks = [k for k, _ in plan(s)]
        p = torch.tensor([recs[k].p for k in ks], dtype=torch.float32)
        out, parts = router_loss(x[ks] @ proj.T, e, p, beta, margin)
        opt.zero_grad()
        out.backward()
        torch.nn.utils.clip_grad_norm_([proj, e], 1.0)
        opt.step()
        sched.step()
        loss = parts["router"]
    proj, e = proj.detach(), e.detach()
    hit, contrast, by = agreement(proj, e, held_x, data["held"])
    probing = probe_accuracy((seed_x @ proj.T).numpy(), data["seed_sit"])["accuracy"]
    hn = F.normalize(held_x @ proj.T, dim=-1)
    return {"hit_rate": hit, "contrast": contrast, "probing": round(probing, 3), "loss": round(loss, 3),
            "mean_pairwise_cos": round(float((hn @ hn.T).mean()), 3), "by_situation": by,
            "demo": demo_ratios(proj, e, data["demo_x"] - c, data["held"])}


def demo_ratios(proj: torch.Tensor, e: torch.Tensor, x: torch.Tensor, rows: list[dict]) -> list[str]:
    """``make demo``'s three queries: expected over opposed poles' mean weight, and the top pole."""
    from personafuse.demo import DEMO_SITUATIONS
    from personafuse.traits import POLE_INDEX, TAT_PRIOR, TRAIT_POLES

    sides = {r["situation"]: (r["positive"], r["negative"]) for r in rows}
    w = torch.softmax(F.normalize(x @ proj.T, dim=-1) @ F.normalize(e, dim=-1).T, -1).tolist()
    out = []
    for wr, sit in zip(w, DEMO_SITUATIONS, strict=True):
        pos, neg = sides[sit]
        ratio = statistics.fmean(wr[POLE_INDEX[p]] for p in pos) / statistics.fmean(wr[POLE_INDEX[p]] for p in neg)
        top = TRAIT_POLES[max(range(len(wr)), key=wr.__getitem__)]
        out.append(f"{ratio:.2f} {top}{'' if top in TAT_PRIOR[sit] else '!'}")
    return out


def add_demo_states(data: dict, cache: Path) -> dict:
    """Pool ``make demo``'s three queries into a cache built before they were part of it."""
    from personafuse.demo import DEMO_QUERIES
    from personafuse.moe.config import PersonaFuseConfig
    from personafuse.moe.model import PersonaFuseModel

    pf = PersonaFuseModel.from_config(PersonaFuseConfig()).eval()
    enc = pf.encode_queries(DEMO_QUERIES)
    data["demo_x"] = pf.router.encoder.pooled(enc["input_ids"], enc["attention_mask"]).float()
    torch.save(data, cache)
    return data


def main() -> None:
    cache = Path("runs/router_sweep_cache.pt")
    data = torch.load(cache, weights_only=False) if cache.is_file() else build_cache(cache)
    if "demo_x" not in data:
        data = add_demo_states(data, cache)
    for arg in sys.argv[1:] or ["dict(steps=0)", "dict(steps=0, center=True)"]:
        kw = ast.literal_eval(arg) if not arg.startswith("dict(") else eval(arg, {"dict": dict})  # noqa: S307 (trusted CLI input)
        print(arg, run(data, **kw), flush=True)


if __name__ == "__main__":
    main()
