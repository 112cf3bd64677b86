"""Routing analysis: which experts a PersonaFuse model calls on, per benchmark and per situation.

Two sources: the ``weights`` every run records per item (mean per pole for each benchmark of each
run), and a user's held-out situations — a JSONL with ``query`` and ``situation`` (other fields are
kept in the per-query output) routed through ``model.route``. Output: ``routing.md``/``routing.csv``
tables, ``situations_routed.jsonl`` and Big Five radar charts (ten poles, grouped by trait).

Routing agreement (``routing --expect``, :func:`routing_agreement`): a JSONL whose lines name, for
each query, the poles the paper's Table 1 (Trait Activation Theory) expects (``positive``) and the
poles it opposes (``negative``). A query is a *hit* when its expected poles get more weight on average
than its opposed poles; its *contrast* is the ratio of those two mean weights. The package ships one
held-out file (:data:`HELDOUT_FILE`): 65 queries in the five Table 1 situations, written for this
measure and kept apart from every training source (tests/evaluation/test_routing_agreement.py).
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personafuse.evaluation.data import DataError, read_jsonl, where
from personafuse.evaluation.data import field as get_field
from personafuse.evaluation.runner import load_results, read_records
from personafuse.traits import POLE_INDEX, TRAIT_POLES, TraitError, pole_name, weights_from_any

Router = Callable[[list[str]], Sequence[Any]]  # queries -> ten weights each (list or {pole: w})


@dataclass
class RoutingReport:
    rows: list[dict[str, Any]]
    markdown: str
    csv: str
    files: list[Path] = field(default_factory=list)


def mean_weights(ws: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {p: statistics.fmean(float(w.get(p, 0.0)) for w in ws) for p in TRAIT_POLES}


def weights_by_benchmark(run_dir: str) -> dict[str, tuple[dict[str, float], int]]:
    """``{benchmark: (mean weights, n items with weights)}`` for one run directory."""
    res = load_results(run_dir)
    out = {}
    for bench in res.get("benchmarks", {}):
        recs = read_records(Path(run_dir) / f"{bench}.jsonl").values()
        ws = [r["weights"] for r in recs if r.get("weights")]
        if ws:
            out[bench] = (mean_weights(ws), len(ws))
    return out


def route_situations(path: str, router: Callable[[list[str]], list[dict[str, float]]], batch_size: int = 32) -> tuple[list[dict[str, Any]], dict[str, tuple[dict[str, float], int]]]:
    """Route every ``query``; returns the routed rows (input fields kept, ``weights`` added) and the
    mean weights per ``situation``."""
    rows = read_jsonl(path)
    for r in rows:
        get_field(r, "query", path, kind=str)
        get_field(r, "situation", path)
    routed: list[dict[str, Any]] = []
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size]
        ws = router([r["query"] for r in batch])
        if len(ws) != len(batch):
            raise DataError(f"router returned {len(ws)} weight rows for {len(batch)} queries")
        for r, w in zip(batch, ws, strict=True):
            out = {k: v for k, v in r.items() if k != "__line__"}
            out["weights"] = {p: float(w[p]) for p in TRAIT_POLES}
            routed.append(out)
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in routed:
        groups[str(r["situation"])].append(r["weights"])
    return routed, {k: (mean_weights(v), len(v)) for k, v in groups.items()}


HELDOUT_FILE = "situations/routing_heldout.jsonl"  # package data of personafuse.evaluation
WILSON_Z = 1.959964  # two-sided 95 %


def heldout_path() -> Path:
    """The shipped held-out file (Table 1's five situations, 13 queries each)."""
    return Path(str(importlib.resources.files("personafuse.evaluation") / HELDOUT_FILE))


def read_expectations(path: str | Path) -> list[dict[str, Any]]:
    """The lines of an expectations file: ``query``, ``situation``, ``positive`` and ``negative``
    (non-empty lists of poles, any spelling :func:`~personafuse.traits.pole_name` accepts; stored
    canonical). A missing field, an unknown pole or a pole on both sides raises naming file:line."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no queries")
    out = []
    for r in rows:
        q = get_field(r, "query", path, kind=str)
        sit = get_field(r, "situation", path, kind=str)
        sides = {}
        for side in ("positive", "negative"):
            poles = get_field(r, side, path, kind=list)
            if not poles:
                raise DataError(f"{where(path, r)}: field {side!r} is empty; name at least one pole")
            try:
                sides[side] = [pole_name(x) for x in poles]
            except TraitError as e:
                raise DataError(f"{where(path, r)}: field {side!r}: {e}") from None
        if both := set(sides["positive"]) & set(sides["negative"]):
            raise DataError(f"{where(path, r)}: {', '.join(sorted(both))} is both positive and negative")
        out.append({"query": q, "situation": sit, **sides, "__line__": r["__line__"]})
    return out


def wilson_interval(hits: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927); (0, 1) for n = 0."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _summary(per_query: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(per_query)
    hits = sum(1 for q in per_query if q["hit"])
    lo, hi = wilson_interval(hits, n)
    return {
        "hit_rate": hits / n if n else float("nan"),
        "hit_rate_ci": [lo, hi],
        "contrast": statistics.median(q["contrast"] for q in per_query) if n else float("nan"),
        "n": n,
    }


def routing_agreement(
    router: Router, expect: str | Path | None = None, *, batch_size: int = 32, per_query: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Route every query of ``expect`` (default: the shipped held-out file) and score the weights:
    ``{"hit_rate", "hit_rate_ci" (Wilson 95 %), "contrast" (median over queries), "n",
    "by_situation": {situation: {the same four}}}``. ``per_query``, when given, receives each
    query's weights, hit and contrast."""
    path = expect if expect is not None else heldout_path()
    rows = read_expectations(path)
    scored = []
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size]
        ws = list(router([r["query"] for r in batch]))
        if len(ws) != len(batch):
            raise DataError(f"router returned {len(ws)} weight rows for {len(batch)} queries")
        for r, w in zip(batch, ws, strict=True):
            vec = weights_from_any(w.tolist() if hasattr(w, "tolist") else w, what=f"weights for {where(path, r)}")
            pos = statistics.fmean(vec[POLE_INDEX[p]] for p in r["positive"])
            neg = statistics.fmean(vec[POLE_INDEX[p]] for p in r["negative"])
            contrast = pos / neg if neg > 0 else (math.inf if pos > 0 else 1.0)
            row = {k: v for k, v in r.items() if k != "__line__"}
            scored.append({**row, "weights": dict(zip(TRAIT_POLES, vec, strict=True)), "hit": pos > neg, "contrast": contrast})
    if per_query is not None:
        per_query.extend(scored)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for q in scored:
        groups[q["situation"]].append(q)
    return {**_summary(scored), "by_situation": {s: _summary(g) for s, g in groups.items()}}


def agreement_markdown(result: Mapping[str, Any]) -> str:
    """The agreement as a table: one row per situation, then all."""
    lines = ["| situation | n | hit rate | 95 % CI | contrast |", "|---|---|---|---|---|"]
    rows = [*result["by_situation"].items(), ("all", result)]
    for name, r in rows:
        lo, hi = r["hit_rate_ci"]
        lines.append(f"| {name} | {r['n']} | {r['hit_rate']:.2f} | {lo:.2f}–{hi:.2f} | {r['contrast']:.2f} |")
    return "\n".join(lines) + "\n"


def load_router(model: str, *, device: str | None = None, dtype: str = "auto") -> Router:
    """``model.route`` of a PersonaFuse checkpoint (``pf:DIR``) on ``device`` in ``dtype`` as a :data:`Router`."""
    from personafuse.devices import resolve_device
    from personafuse.evaluation.subjects import SubjectOptions, load_subject

    subj = load_subject(model, SubjectOptions(device=resolve_device(device or "auto"), dtype=dtype))
    if not hasattr(subj, "route"):
        raise ValueError(f"{model} has no router (routing analysis needs a PersonaFuse checkpoint)")
    return subj.route


def analyse(
    runs: Sequence[str],
    *,
    situations: str | None = None,
    model: str | None = None,
    router: Callable[[list[str]], list[dict[str, float]]] | None = None,
    out: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> RoutingReport:
    rows: list[dict[str, Any]] = []
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        per = weights_by_benchmark(run)
        name = Path(run).name
        for bench, (w, n) in per.items():
            rows.append({"source": name, "group": bench, "n": n, **w})
        if per:
            groups[f"benchmarks ({name})"] = {b: w for b, (w, _) in per.items()}
    routed: list[dict[str, Any]] = []
    if situations:
        if router is None:
            if not model:
                raise ValueError("routing --situations needs --model pf:DIR (a PersonaFuse checkpoint)")
            router = load_router(model, device=device, dtype=dtype)
        routed, per_sit = route_situations(situations, router)
        for sit, (w, n) in per_sit.items():
            rows.append({"source": "situations", "group": sit, "n": n, **w})
        groups["situations"] = {s: w for s, (w, _) in per_sit.items()}
    if not rows:
        raise ValueError("no routing weights found: the runs carry none (not PersonaFuse?) and no --situations given")
    md = _markdown(rows)
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=["source", "group", "n", *TRAIT_POLES])
    wr.writeheader()
    for r in rows:
        wr.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    rep = RoutingReport(rows=rows, markdown=md, csv=buf.getvalue())
    if out:
        od = Path(out)
        od.mkdir(parents=True, exist_ok=True)
        (od / "routing.md").write_text(md, encoding="utf-8")
        (od / "routing.csv").write_text(rep.csv, encoding="utf-8")
        rep.files += [od / "routing.md", od / "routing.csv"]
        if routed:
            p = od / "situations_routed.jsonl"
            p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in routed), encoding="utf-8")
            rep.files.append(p)
        for title, series in groups.items():
            slug = "".join(c if c.isalnum() else "_" for c in title).strip("_")
            rep.files.append(radar_chart(series, od / f"radar_{slug}.png", title=f"Mean routing weight: {title}"))
    return rep


def _markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ["source", "group", "n", *TRAIT_POLES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([str(r["source"]), str(r["group"]), str(r["n"])] + [f"{r[p]:.3f}" for p in TRAIT_POLES]) + " |")
    return "\n".join(lines) + "\n"


def radar_chart(series: Mapping[str, Mapping[str, float]], path: Path, *, title: str = "") -> Path:
    """A radar chart over the ten poles (traits side by side), one polygon per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(TRAIT_POLES)
    angles = [2 * math.pi * i / n for i in range(n)] + [0.0]
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(111, polar=True)
    top = 0.0
    for i, (name, w) in enumerate(series.items()):
        vals = [float(w.get(p, 0.0)) for p in TRAIT_POLES]
        top = max(top, *vals)
        ax.plot(angles, vals + vals[:1], color=f"C{i % 10}", linewidth=1.5, label=name)
        ax.fill(angles, vals + vals[:1], color=f"C{i % 10}", alpha=0.12)
    ax.set_xticks(angles[:-1])
    ax.set_xticklabels([p.replace("_", " ") for p in TRAIT_POLES], fontsize=8)
    ax.set_ylim(0, max(top * 1.1, 0.15))
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=7)
    if title:
        ax.set_title(title, fontsize=10, pad=18)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
