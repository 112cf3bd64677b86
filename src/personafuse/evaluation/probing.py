"""Persona-encoder probing (paper §8.1, Table 6): does the encoder's query embedding carry task
information? Embed each text with a frozen encoder, fit a softmax-regression (multinomial logistic
regression) probe on a fixed stratified split, report test accuracy per encoder.

Datasets: ``clinc150`` (Hub ``clinc/clinc_oos``, config ``plus``), labelled by domain as in the
paper's Table 6: the ten CLINC150 domains plus out-of-scope, 11 classes (``clinc150-intents`` keeps
the 151 intents); ``emotion`` (Hub ``dair-ai/emotion``, six labels); ``ecommerce`` (the Kaggle
"Women's E-Commerce Clothing Reviews" CSV: ``Review Text`` → ``Rating``, five classes; local file
only); or any local CSV/JSONL with ``--text-field``/``--label-field``. ``data`` gives a preset a
local copy instead of the Hub: a Hub parquet file (label names from its embedded features), a
CSV/JSONL, or the CLINC repository's ``data_oos_plus.json``.

Encoders: any spec ``personafuse.embedded.resolve`` knows — ``minilm`` (embedded all-MiniLM-L6-v2),
``default-encoder``/``smollm2`` (embedded SmolLM2-135M-Instruct, the project's default persona
encoder), ``hf:PATH`` (any Hugging Face encoder or decoder) — with ``@mean``/``@last`` pooling
(default: last token for decoder LMs, mean for encoders, as the router does); ``random:SPEC`` (the
same architecture, randomly initialised — an untrained control); ``pf:DIR`` (a PersonaFuse
checkpoint's persona encoder, ``PersonaFuseModel.persona_embeddings``: the router's input text
through its encoder, as routing reads a query).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personafuse.evaluation.data import (
    DataError,
    hub_allowed,
    hub_path,
    read_csv,
    read_json,
    read_jsonl,
    subsample,
)

# CLINC150's ten domains and their intents, from the official repository's data/domains.json
# (github.com/clinc/oos-eval, commit 828f809). Out-of-scope queries ("oos") form the 11th class.
CLINC150_DOMAINS: dict[str, tuple[str, ...]] = {
    "banking": ("freeze_account", "routing", "pin_change", "bill_due", "pay_bill", "account_blocked", "interest_rate", "min_payment", "bill_balance", "transfer", "order_checks", "balance", "spending_history", "transactions", "report_fraud"),
    "credit_cards": ("replacement_card_duration", "expiration_date", "damaged_card", "improve_credit_score", "report_lost_card", "card_declined", "credit_limit_change", "apr", "redeem_rewards", "credit_limit", "rewards_balance", "application_status", "credit_score", "new_card", "international_fees"),
    "kitchen_and_dining": ("food_last", "confirm_reservation", "how_busy", "ingredients_list", "calories", "nutrition_info", "recipe", "restaurant_reviews", "restaurant_reservation", "meal_suggestion", "restaurant_suggestion", "cancel_reservation", "ingredient_substitution", "cook_time", "accept_reservations"),
    "home": ("what_song", "play_music", "todo_list_update", "reminder", "reminder_update", "calendar_update", "order_status", "update_playlist", "shopping_list", "calendar", "next_song", "order", "todo_list", "shopping_list_update", "smart_home"),
    "auto_and_commute": ("current_location", "oil_change_when", "oil_change_how", "uber", "traffic", "tire_pressure", "schedule_maintenance", "gas", "mpg", "distance", "directions", "last_maintenance", "gas_type", "tire_change", "jump_start"),
    "travel": ("plug_type", "travel_notification", "translate", "flight_status", "international_visa", "timezone", "exchange_rate", "travel_suggestion", "travel_alert", "vaccines", "lost_luggage", "book_flight", "book_hotel", "carry_on", "car_rental"),
    "utility": ("weather", "alarm", "date", "find_phone", "share_location", "timer", "make_call", "calculator", "definition", "measurement_conversion", "flip_coin", "spelling", "time", "roll_dice", "text"),
    "work": ("pto_request_status", "next_holiday", "insurance_change", "insurance", "meeting_schedule", "payday", "taxes", "income", "rollover_401k", "pto_balance", "pto_request", "w2", "schedule_meeting", "direct_deposit", "pto_used"),
    "small_talk": ("who_made_you", "meaning_of_life", "who_do_you_work_for", "do_you_have_pets", "what_are_your_hobbies", "fun_fact", "what_is_your_name", "where_are_you_from", "goodbye", "thank_you", "greeting", "tell_joke", "are_you_a_bot", "how_old_are_you", "what_can_i_ask_you"),
    "meta": ("change_speed", "user_name", "whisper_mode", "yes", "change_volume", "no", "change_language", "repeat", "change_accent", "cancel", "sync_device", "change_user_name", "change_ai_name", "reset_settings", "maybe"),
}
CLINC150_OOS = "oos"
INTENT_DOMAIN: dict[str, str] = {i: d for d, intents in CLINC150_DOMAINS.items() for i in intents} | {CLINC150_OOS: CLINC150_OOS}

_CLINC = {"hub": ("clinc/clinc_oos", "plus"), "split": "train", "text": "text", "label": "intent"}
PRESETS: dict[str, dict[str, Any]] = {
    "clinc150": {**_CLINC, "map": INTENT_DOMAIN},
    "clinc150-intents": dict(_CLINC),
    "emotion": {"hub": ("dair-ai/emotion", None), "split": "train", "text": "text", "label": "label"},
    "ecommerce": {"hub": None, "text": "Review Text", "label": "Rating"},
}


@dataclass
class ProbeData:
    texts: list[str]
    labels: list[str]
    name: str


def _read_local(p: Path) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Rows of a local file, and the label names when the file carries them (a Hub parquet file)."""
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return read_csv(p), None
    if suffix == ".parquet":
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(p), split="train")
        return [dict(r, __line__=i + 1) for i, r in enumerate(ds)], _class_names(ds)
    if suffix == ".json":  # the CLINC repository's own layout: {"train": [[text, intent], ...], ...}
        raw = read_json(p)
        if not isinstance(raw, dict) or "train" not in raw:
            raise DataError(f"{p}: expected the CLINC150 layout {{'train': [[text, intent], ...], 'oos_train': ...}}")
        pairs = list(raw["train"]) + list(raw.get("oos_train", []))
        return [{"text": t, "intent": lab, "__line__": i + 1} for i, (t, lab) in enumerate(pairs)], None
    return read_jsonl(p), None


def _class_names(ds: Any) -> list[str] | None:
    names: dict[str, list[str]] = {k: f.names for k, f in ds.features.items() if hasattr(f, "names")}
    return next(iter(names.values())) if len(names) == 1 else None


def load_probe_data(
    dataset: str,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    data: str | None = None,
) -> ProbeData:
    """Texts and labels of a preset (from ``data`` or the Hub) or of a local CSV/JSONL file."""
    preset = PRESETS.get(dataset.lower())
    tf = text_field or (preset or {}).get("text", "text")
    lf = label_field or (preset or {}).get("label", "label")
    p = Path(data) if data else Path(dataset)
    names: list[str] | None = None
    if data and not p.is_file():
        raise DataError(f"probe: {data}: no such file")
    if p.is_file():
        rows, names = _read_local(p)
        src: Any = p
    elif preset and preset.get("hub"):
        hub_id, cfg = preset["hub"]
        if not hub_allowed():
            raise DataError(f"probe: {dataset} comes from the Hub ({hub_id}) but HF_HUB_OFFLINE is set; pass --data with a local file")
        from datasets import load_dataset

        try:
            ds = load_dataset(hub_path(hub_id), cfg, split=preset["split"]) if cfg else load_dataset(hub_path(hub_id), split=preset["split"])
        except Exception as e:  # say which source failed, whatever datasets raised
            raise DataError(f"probe: could not load {dataset} from {hub_path(hub_id)}: {e}") from e
        rows = [dict(r, __line__=i + 1) for i, r in enumerate(ds)]
        names = _class_names(ds)
        src = hub_id
    else:
        raise DataError(f"probe: {dataset!r} is neither a local file nor one of {', '.join(PRESETS)} (e-commerce needs the local CSV)")
    label_map: Mapping[str, str] | None = (preset or {}).get("map") if preset else None
    texts, labels = [], []
    for r in rows:
        if tf not in r or lf not in r:
            missing = tf if tf not in r else lf
            raise DataError(f"{src}:{r.get('__line__')}: missing field {missing!r}")
        t, lab = r[tf], r[lf]
        if t is None or (isinstance(t, str) and not t.strip()) or lab in (None, ""):
            continue  # e-commerce reviews without text are skipped, as in the usual setup
        if names is not None and isinstance(lab, int):
            lab = names[lab]  # a class id from a Hub file → its name
        if label_map is not None:
            if str(lab) not in label_map:
                raise DataError(f"{src}:{r.get('__line__')}: intent {lab!r} is not a CLINC150 intent (ids need the Hub file's label names)")
            lab = label_map[str(lab)]
        texts.append(str(t))
        labels.append(str(lab))
    idx = subsample(list(range(len(texts))), limit, seed)
    name = dataset if preset else p.stem
    return ProbeData([texts[i] for i in idx], [labels[i] for i in idx], name)


def make_encoder(spec: str, device: str | None = None, dtype: str = "auto") -> Callable[[Sequence[str]], np.ndarray]:
    """An ``encode(texts) -> [N, d]`` function from an encoder spec (see the module docstring), its
    model on ``device`` in ``dtype`` (:mod:`personafuse.devices`; None: the CPU). The function's
    ``placement`` attribute says where the encoder computes, read from its parameters."""
    from personafuse import devices
    from personafuse.evaluation.embedding import SentenceEmbedder

    s = spec.strip()
    if s.startswith("pf:"):
        from personafuse.specs import load_personafuse

        pf = load_personafuse(s, device=device, dtype=dtype)  # the --model grammar: a checkpoint folder or Hub id
        fn = pf.persona_embeddings  # the router's encoder on the router's own input text

        def encode_pf(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
            import torch

            out = []
            with torch.no_grad():  # batches keep memory flat on CLINC150-sized inputs
                for i in range(0, len(texts), batch_size):
                    out.append(fn(list(texts[i : i + batch_size])).detach().float().cpu().numpy())
            return np.concatenate(out)

        encode_pf.placement = devices.placement_line(pf.router.encoder, spec)  # type: ignore[attr-defined]
        return encode_pf
    from personafuse.embedded import load_backbone, load_tokenizer
    from personafuse.moe.router import is_decoder_backbone

    random_init = s.startswith("random:")
    source, pooling = encoder_source(s[len("random:") :] if random_init else s)
    tok = load_tokenizer(source)
    dev = devices.resolve_device(device) if device else "cpu"
    dt = devices.resolve_dtype(dtype, dev, None if random_init else devices.source_dtype(source.path, source.gguf_file))
    if random_init:
        import torch
        from transformers import AutoConfig, AutoModel

        torch.manual_seed(0)
        model = AutoModel.from_config(AutoConfig.from_pretrained(source.path, **source.kwargs())).to(getattr(torch, dt))
    else:
        model = load_backbone(source, dt)
    if pooling == "auto":
        pooling = "last" if is_decoder_backbone(model) else "mean"
    emb = SentenceEmbedder(model.to(dev).eval(), tok, pooling=pooling)

    def encode(texts: Sequence[str]) -> np.ndarray:
        return emb.encode(list(texts)).numpy()

    encode.placement = devices.placement_line(model, spec)  # type: ignore[attr-defined]
    return encode


def encoder_source(spec: str) -> tuple[Any, str]:
    """(``personafuse.embedded.ModelSource``, pooling) for ``minilm``, ``default-encoder``,
    ``smollm2``, ``hf:PATH`` … with an optional ``@mean``/``@last``; pooling ``auto`` when not given.
    Names go through ``embedded.resolve`` so that probing means what training means by them."""
    from personafuse.embedded import BASE_ALIASES, ENCODER_ALIASES, resolve

    body, _, pooling = spec.partition("@")
    if pooling and pooling not in ("mean", "last"):
        raise ValueError(f"unknown pooling {pooling!r} in {spec!r}; use @mean or @last")
    if body.startswith("hf:"):
        return resolve(body[3:]), pooling or "auto"
    if body.lower() in BASE_ALIASES | ENCODER_ALIASES:
        return resolve(body), pooling or "auto"
    raise ValueError(f"unknown encoder {spec!r}; use minilm, default-encoder, smollm2, hf:PATH[@mean|@last], random:SPEC or pf:DIR")


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


def run_probe(dataset: str, encoders: Sequence[str], *, text_field: str | None = None, label_field: str | None = None, limit: int | None = None, seed: int = 0, out: str | None = None, data_file: str | None = None,
              device: str | None = None, dtype: str = "auto", on_load: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Probe each encoder (on ``device`` in ``dtype``); ``on_load`` gets each loaded encoder's
    placement line (device and dtype read from its parameters)."""
    data = load_probe_data(dataset, text_field=text_field, label_field=label_field, limit=limit, seed=seed, data=data_file)
    if len(set(data.labels)) < 2:
        raise DataError(f"probe: {dataset} has fewer than two labels")
    results = {}
    for spec in encoders:
        encode = make_encoder(spec, device, dtype)
        if on_load is not None:
            on_load(encode.placement)  # type: ignore[attr-defined]
        x = encode(data.texts)
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
