"""One variant's replies to the held-out situation queries: the pairwise study's input
(``personafuse annotate serve`` reads one such file per system) and what the docs quote.

Run by ``personafuse reproduce`` as its own process (``python -m personafuse.reproduce.replies``),
like every cell that loads a model, so a crash or a kill takes no other cell's memory with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from personafuse.evaluation.config import REASONING_TOKENS
from personafuse.fileio import atomic_write, read_jsonl


def write_replies(model: str, queries: Path, out: Path, *, system: str, routing: str | None = None, seed: int = 0,
                  batch_size: int = 8, max_new_tokens: int = 256, persona_cot: int | None = None,
                  device: str | None = None, dtype: str = "auto") -> int:
    """Greedy replies of ``model`` to every ``query`` in ``queries`` (JSONL with ``id``, ``query``,
    ``situation``), written whole to ``out`` as annotation rows (``id``, ``prompt``, ``response``,
    ``system``, ``task``, ``weights``). Returns the number of rows."""
    from personafuse.evaluation.cot_prompting import with_persona_cot
    from personafuse.evaluation.subjects import SubjectOptions, load_subject

    rows = []
    for n, row in read_jsonl(queries, strict=True):  # before the model loads: a bad file fails at once
        missing = [k for k in ("id", "query") if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise ValueError(f"{queries}:{n}: no {' or '.join(missing)} (each line needs id and query)")
        rows.append(row)
    from personafuse.devices import placement_line

    loaded = load_subject(model, SubjectOptions(routing=routing, seed=seed, batch_size=batch_size, device=device, dtype=dtype))
    print(placement_line(loaded.model, model), flush=True)  # type: ignore[attr-defined]
    subject = with_persona_cot(loaded, persona_cot)
    gens = subject.generate([[{"role": "user", "content": r["query"]}] for r in rows], max_new_tokens=max_new_tokens, do_sample=False)
    lines = [
        json.dumps({"id": r["id"], "prompt": r["query"], "response": g.text, "system": system, "task": r.get("situation") or "all",
                    "weights": g.weights}, ensure_ascii=False) + "\n"
        for r, g in zip(rows, gens, strict=True)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "".join(lines))
    return len(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m personafuse.reproduce.replies", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a --model spec (base, hf:, lora:, pf:)")
    ap.add_argument("--queries", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--system", required=True, help="the variant's name in the pairs file")
    ap.add_argument("--routing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--persona-cot-prompting", action="store_true", help="the Persona-CoT prompting baseline")
    ap.add_argument("--reasoning-tokens", type=int, default=REASONING_TOKENS)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ap.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    from personafuse.devices import DeviceError, check_dtype, resolve_device

    try:  # a device this machine lacks: exit 2 naming the flag, before anything loads
        device, dtype = resolve_device(a.device), check_dtype(a.dtype)
    except DeviceError as e:
        ap.error(f"{e.option}: {e}")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    n = write_replies(a.model, a.queries, a.out, system=a.system, routing=a.routing, seed=a.seed, batch_size=a.batch_size,
                      max_new_tokens=a.max_new_tokens, persona_cot=a.reasoning_tokens if a.persona_cot_prompting else None,
                      device=device, dtype=dtype)
    print(f"wrote {n} replies to {a.out}")


if __name__ == "__main__":
    main()
