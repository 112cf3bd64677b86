"""Stage-1 warm-up: ten experts in one batched job vs ten sequential single-LoRA peft runs.

Both sides see the same records, steps, per-expert batch size, optimiser, schedule and initial
adapter weights (each peft LoRA starts from the matching expert's A, B = 0), so their losses
should agree. Both run on the same device (CUDA when present, else CPU), in float32, after one
untimed load and forward that brings up imports and the device for both. The batched job loads the
base once and runs the experts' rows through the frozen base together. The JSON gives three
ratios: wall-clock with model loading ("speedup"), without it ("train_speedup": the batched side
still pays its engine setup, checkpoint, logs and plot) and the optimiser steps alone
("step_speedup"). On two CPU cores batching buys little once a batch of two rows already keeps
both cores busy; on a GPU a small model's step is bound by kernel launches, which batching shares.

    python benchmarks/warmup_batched.py --records runs/demo/data --steps 8 --batch 2 --json out.json

Without --records it builds a small synthetic record set (queries from the bundled seed set,
short template responses, activation vectors from the TAT prior of their situation).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from personafuse import embedded  # noqa: E402
from personafuse.moe.config import PersonaFuseConfig  # noqa: E402
from personafuse.moe.model import PersonaFuseModel  # noqa: E402
from personafuse.training.batching import Featurizer  # noqa: E402
from personafuse.training.config import StageConfig, TrainConfig  # noqa: E402
from personafuse.training.losses import lm_loss_sums  # noqa: E402
from personafuse.training.plans import warmup_plan  # noqa: E402
from personafuse.training.records import Record, load_records  # noqa: E402
from personafuse.training.stages import run_warmup  # noqa: E402
from personafuse.traits import TRAIT_POLES, vector_from_poles  # noqa: E402

SITUATION_POLES = {
    "emotional_support": ["high_A", "low_N"], "counselling": ["high_C", "high_A", "low_N", "low_E"],
    "customer_service": ["high_C", "high_A", "low_N"], "maths": ["high_C", "high_E", "low_N"],
    "coding": ["high_C", "low_N"], "factual": ["high_C", "low_E"], "creative_writing": ["high_O", "low_C"],
    "brainstorming": ["high_O", "high_E", "low_C"], "debate": ["low_A", "high_E"], "advice": ["high_A", "high_C"],
    "social": ["high_A", "high_E"], "workplace": ["high_C", "high_A"],
}


def synthetic_records(n: int) -> list[Record]:
    from personafuse.data.sources import seed_queries

    out = []
    for i, q in enumerate(seed_queries()[::3][:n]):
        poles = SITUATION_POLES.get(q.situation or "", ["high_A"])
        resp = f"Thanks for asking. Here is a short answer in a {' and '.join(poles)} style about: {q.text[:60]}"
        out.append(Record(f"s{i}", q.text, resp, tuple(vector_from_poles(poles)), "synthetic"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", help="records dir/file (default: synthetic from the seed set)")
    ap.add_argument("--n-records", type=int, default=60)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2, help="rows per expert per step")
    ap.add_argument("--micro-batch", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--model", default="default", help="base model spec (default: the embedded SmolLM2)")
    ap.add_argument("--random-init", action="store_true",
                    help="random weights from the model's config (seeded, identical on both sides): for a GPU "
                    "machine where only config and tokenizer travel; timing does not depend on the weights")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    records = load_records(args.records) if args.records else synthetic_records(args.n_records)
    sc = StageConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, micro_batch_size=args.micro_batch, warmup_ratio=0.0, scheduler="constant")
    tc = TrainConfig(out="/tmp/pf-warmup-bench", warmup=sc, max_length=args.max_length, save_every=10**9, mixed_precision="no")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    experts_with_data = [i for i in range(10) if any(r.p and r.p[i] for r in records)]
    print(f"{len(records)} records; experts with data: {[TRAIT_POLES[i] for i in experts_with_data]}", flush=True)

    # --- batched: one job, all experts --------------------------------------------------------
    src = embedded.resolve(args.model)

    def load_base():
        if args.random_init:
            from transformers import AutoConfig, AutoModelForCausalLM

            conv = embedded.converted(src)
            torch.manual_seed(1234)
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(conv.path, **conv.kwargs()))
        return embedded.load_causal_lm(src)

    # Untimed: imports, the device context and its GEMM libraries come up once, for both sides.
    warm = load_base().to(dev)
    with torch.no_grad():
        warm(input_ids=torch.ones(2, 8, dtype=torch.long, device=dev))
    del warm

    t0 = now()
    base0, tok0 = load_base(), embedded.load_tokenizer(src)
    # The persona encoder starts as a copy of the base body (the default); stage 1 never runs it.
    pf = PersonaFuseModel.from_config(
        PersonaFuseConfig(base_model=args.model, encoder_model=args.model),
        base_model=base0, tokenizer=tok0, encoder_backbone=copy.deepcopy(base0.get_decoder()),
        encoder_tokenizer=copy.deepcopy(tok0),
    )
    init = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in pf.mixture_layers.items()}
    t_load = now() - t0
    result = run_warmup(pf, records, tc, out_dir=Path(tc.out) / "batched")
    t_batched = now() - t0
    # per-expert loss at the last step, recomputed on that step's rows for a like-for-like number
    print(f"batched: {t_batched:.1f}s (load {t_load:.1f}s)", flush=True)

    # --- sequential: one peft LoRA run per expert ----------------------------------------------
    from peft import LoraConfig, get_peft_model

    r = pf.config.r
    feats_tok = None
    seq_final: dict[int, float] = {}
    t1 = now()
    seq_load = 0.0
    seq_steps = 0.0
    for i in experts_with_data:
        tl = now()
        base = load_base().to(dev)
        tok = feats_tok or embedded.load_tokenizer(src)
        feats_tok = tok
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=pf.config.alpha, target_modules=list(pf.config.target_modules), lora_dropout=0.0))
        with torch.no_grad():
            for name, module in model.named_modules():
                key = name.removeprefix("base_model.model.")
                if key in init and hasattr(module, "lora_A"):
                    module.lora_A["default"].weight.copy_(init[key][0][i * r : (i + 1) * r])
                    module.lora_B["default"].weight.zero_()
        seq_load += now() - tl
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = torch.optim.AdamW(params, lr=args.lr)
        feats = Featurizer(records, tok, tok, args.max_length, args.max_length)
        plan = warmup_plan(records, args.batch, tc.seed, experts=[i])
        model.train()
        last = float("nan")
        for step in range(args.steps):
            ts = time.perf_counter()  # as train_loop times a step
            rows = [k for k, _ in plan(step)]
            norm = sum(feats.response_tokens(k) for k in rows)
            total = 0.0
            for c in range(0, len(rows), args.micro_batch):
                b = feats.lm_batch(rows[c : c + args.micro_batch], dev)
                sums, _ = lm_loss_sums(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
                loss = sums.sum() / max(norm, 1)
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, sc.max_grad_norm)
            opt.step()
            opt.zero_grad()
            seq_steps += time.perf_counter() - ts
            last = total
        seq_final[i] = last
        print(f"  peft run for {TRAIT_POLES[i]}: final loss {last:.4f}", flush=True)
    t_seq = now() - t1

    # Both sides log the same quantity for the last step: the mean over experts of each expert's
    # token-mean LM loss on that step's rows (computed before the step's update).
    bat_logged = result.losses[-1]["loss_lm"]
    seq_logged = statistics.mean(seq_final.values())
    rel = abs(bat_logged - seq_logged) / seq_logged
    speedup = t_seq / t_batched
    train_speedup = (t_seq - seq_load) / (t_batched - t_load)
    bat_steps = sum(e["seconds"] for e in result.losses)
    step_speedup = seq_steps / bat_steps
    print(f"\nrecords {len(records)}, steps {args.steps}, per-expert batch {args.batch}, experts {len(experts_with_data)}")
    print(f"batched job: {t_batched:.1f}s   ten sequential peft runs: {t_seq:.1f}s   speedup {speedup:.2f}x")
    print(f"  model loading: batched {t_load:.1f}s  sequential {seq_load:.1f}s;  training alone: "
          f"batched {t_batched - t_load:.1f}s  sequential {t_seq - seq_load:.1f}s  speedup {train_speedup:.2f}x")
    print(f"  optimiser steps alone: batched {bat_steps:.2f}s  sequential {seq_steps:.2f}s  speedup {step_speedup:.2f}x")
    print(f"final-step loss (mean over experts): batched {bat_logged:.4f}  sequential {seq_logged:.4f}  rel diff {rel:.2%}")
    out = {
        "speedup": speedup,
        "final_loss_rel_diff": rel,
        "train_speedup": train_speedup,
        "step_speedup": step_speedup,
        "batched_step_seconds": bat_steps,
        "sequential_step_seconds": seq_steps,
        "batched_seconds": t_batched,
        "batched_load_seconds": t_load,
        "sequential_load_seconds": seq_load,
        "sequential_seconds": t_seq,
        "batched_final_loss": bat_logged,
        "sequential_final_loss": seq_logged,
        "per_expert_sequential_final": {TRAIT_POLES[i]: v for i, v in seq_final.items()},
        "setup": {"model": args.model, "random_init": args.random_init, "records": len(records), "steps": args.steps, "batch_per_expert": args.batch, "micro_batch": args.micro_batch,
                  "max_length": args.max_length, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"},
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
