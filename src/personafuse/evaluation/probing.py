"""Persona-encoder probing (paper §8.1, Table 6): does the encoder's query embedding carry task
information? Embed each text with a frozen encoder, fit a softmax-regression (multinomial logistic
regression) probe on a fixed stratified split, report test accuracy per encoder.

Datasets: ``clinc150`` (Hub ``clinc_oos``, config ``plus``; labels are the intents — for the
paper's 11-way domain variant pass a local file with a domain column), ``emotion`` (Hub
``dair-ai/emotion``, six labels) and ``ecommerce`` (the Kaggle "Women's E-Commerce Clothing
Reviews" CSV: ``Review Text`` → ``Rating``, five classes; local file only), or any local CSV/JSONL
with ``--text-field``/``--label-field``.

Encoders: ``minilm`` (embedded all-MiniLM-L6-v2, mean pooling); ``hf:PATH[@mean|@last]`` (any
Hugging Face encoder or decoder); ``random:SPEC`` (the same architecture, randomly initialised — an
untrained control); ``pf:DIR`` (a PersonaFuse checkpoint's persona encoder, through
``model.persona_embeddings(texts)`` or ``model.router.encode(texts)``, duck-typed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personafuse.evaluation.data import DataError, hub_allowed, read_csv, read_jsonl, subsample

PRESETS: dict[str, dict[str, Any]] = {
    "clinc150": {"hub": ("clinc_oos", "plus"), "split": "train", "text": "text", "label": "intent"},
    "emotion": {"hub": ("dair-ai/emotion", None), "split": "train", "text": "text", "label": "label"},
    "ecommerce": {"hub": None, "text": "Review Text", "label": "Rating"},
}


@dataclass
class ProbeData:
    texts: list[str]
    labels: list[str]
    name: str


def load_probe_data(dataset: str, *, text_field: str | None = None, label_field: str | None = None, limit: int | None = None, seed: int = 0) -> ProbeData:
    preset = PRESETS.get(dataset.lower())
    tf = text_field or (preset or {}).get("text", "text")
    lf = label_field or (preset or {}).get("label", "label")
    p = Path(dataset)
    if p.is_file():
        rows = read_csv(p) if p.suffix.lower() == ".csv" else read_jsonl(p)
        src: Any = p
    elif preset and preset.get("hub"):
        if not hub_allowed():
            raise DataError(f"probe: {dataset} comes from the Hub but HF_HUB_OFFLINE is set; pass a local file")
        from datasets import load_dataset

        hub_id, cfg = preset["hub"]
        ds = load_dataset(hub_id, cfg, split=preset["split"]) if cfg else load_dataset(hub_id, split=preset["split"])
        rows = [dict(r, __line__=i + 1) for i, r in enumerate(ds)]
        src = hub_id
    else:
        raise DataError(f"probe: {dataset!r} is neither a local file nor one of {', '.join(PRESETS)} (e-commerce needs the local CSV)")
    texts, labels = [], []
    for r in rows:
        if tf not in r or lf not in r:
            missing = tf if tf not in r else lf
            raise DataError(f"{src}:{r.get('__line__')}: missing field {missing!r}")
        t, lab = r[tf], r[lf]
        if t is None or (isinstance(t, str) and not t.strip()) or lab in (None, ""):
            continue  # e-commerce reviews without text are skipped, as in the usual setup
        texts.append(str(t))
        labels.append(str(lab))
    idx = subsample(list(range(len(texts))), limit, seed)
    return ProbeData([texts[i] for i in idx], [labels[i] for i in idx], Path(dataset).stem if p.is_file() else dataset)


def make_encoder(spec: str) -> Callable[[Sequence[str]], np.ndarray]:
    """An ``encode(texts) -> [N, d]`` function from an encoder spec (see the module docstring)."""
    from personafuse.evaluation.embedding import SentenceEmbedder

    s = spec.strip()
    if s.startswith("random:"):
        inner = s[len("random:") :]
        path, pooling = _path_pooling(inner)
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        torch.manual_seed(0)
        cfg = AutoConfig.from_pretrained(path)
        emb = SentenceEmbedder(AutoModel.from_config(cfg).eval(), AutoTokenizer.from_pretrained(path), pooling=pooling)
        return lambda texts: emb.encode(list(texts)).numpy()
    if s.startswith("pf:"):
        from personafuse import PersonaFuseModel

        pf = PersonaFuseModel.from_pretrained(s[3:])
        fn = getattr(pf, "persona_embeddings", None) or getattr(getattr(pf, "router", None), "encode", None)
        if fn is None:
            raise ValueError(f"{s}: the model exposes neither persona_embeddings() nor router.encode()")
        def encode_pf(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
            import torch

            out = []
            with torch.no_grad():  # batches keep memory flat on CLINC150-sized inputs
                for i in range(0, len(texts), batch_size):
                    out.append(fn(list(texts[i : i + batch_size])).detach().float().cpu().numpy())
            return np.concatenate(out)

        return encode_pf
    path, pooling = _path_pooling(s)
    emb = SentenceEmbedder.from_pretrained(path, pooling=pooling)
    return lambda texts: emb.encode(list(texts)).numpy()


def _path_pooling(s: str) -> tuple[str | None, str]:
    from personafuse.embedded import resolve

    body, _, pooling = s.partition("@")
    if body in ("minilm", "default-encoder"):
        return resolve("minilm").path, pooling or "mean"
    if body.startswith("hf:"):
        return body[3:], pooling or "mean"
    raise ValueError(f"unknown encoder {s!r}; use minilm, hf:PATH[@mean|@last], random:SPEC or pf:DIR")


def probe_accuracy(x: np.ndarray, y: Sequence[str], *, seed: int = 0, test_size: float = 0.2) -> dict[str, float]:
    """Fit multinomial logistic regression on a fixed stratified split; test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    y_arr = np.asarray(y)
    counts = {c: int((y_arr == c).sum()) for c in set(y_arr.tolist())}
    strat = y_arr if min(counts.values()) >= 2 else None
    xtr, xte, ytr, yte = train_test_split(x, y_arr, test_size=test_size, random_state=seed, stratify=strat)
    clf = LogisticRegression(max_iter=2000)
    clf.fit(xtr, ytr)
    return {"accuracy": float((clf.predict(xte) == yte).mean()), "n_train": len(ytr), "n_test": len(yte), "n_classes": len(counts)}


def run_probe(dataset: str, encoders: Sequence[str], *, text_field: str | None = None, label_field: str | None = None, limit: int | None = None, seed: int = 0, out: str | None = None) -> dict[str, Any]:
    data = load_probe_data(dataset, text_field=text_field, label_field=label_field, limit=limit, seed=seed)
    if len(set(data.labels)) < 2:
        raise DataError(f"probe: {dataset} has fewer than two labels")
    results = {}
    for spec in encoders:
        x = make_encoder(spec)(data.texts)
        results[spec] = probe_accuracy(x, data.labels, seed=seed)
    lines = [f"| encoder | {data.name} accuracy (%) | train | test | classes |", "|---|---|---|---|---|"]
    for spec, r in results.items():
        lines.append(f"| {spec} | {100 * r['accuracy']:.2f} | {r['n_train']} | {r['n_test']} | {r['n_classes']} |")
    md = "\n".join(lines) + "\n"
    rep = {"dataset": data.name, "n": len(data.texts), "seed": seed, "results": results, "markdown": md}
    if out:
        od = Path(out)
        od.mkdir(parents=True, exist_ok=True)
        (od / f"probe_{data.name}.json").write_text(json.dumps({k: v for k, v in rep.items() if k != "markdown"}, indent=2))
        (od / f"probe_{data.name}.md").write_text(md)
    return rep
