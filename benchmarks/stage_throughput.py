"""Training throughput and peak memory of each stage, with randomly initialised models of real shapes.

    python benchmarks/stage_throughput.py --shape llama-3.1-8b --encoder-shape qwen2.5-0.5b \
        --device cuda --dtype bfloat16 --batch 32 --seq 512 --json out.json

Runs the stages' own objectives (personafuse.training.objectives.WarmupObjective / RouterObjective /
JointObjective) on random token ids: stage 1 with one expert per row, stage 2 on the router
alone, stage 3 with the router's weights live in the mixture. Reports tokens/s (LM tokens per second
of optimiser steps) and the peak GPU memory of each stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mixture_throughput import SHAPES  # noqa: E402
from personafuse.moe.config import PersonaFuseConfig  # noqa: E402
from personafuse.moe.model import PersonaFuseModel  # noqa: E402
from personafuse.training.objectives import JointObjective, RouterObjective, WarmupObjective  # noqa: E402
from personafuse.training.stages import set_activation_checkpointing  # noqa: E402

ENCODERS = {
    # Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B), randomly initialised.
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"],
    ),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, architectures=["Qwen2ForCausalLM"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--encoder-shape", default="tiny", choices=sorted(ENCODERS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--query-len", type=int, default=128)
    ap.add_argument("--router-batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=0, help="micro-batch rows (0 = whole batch at once)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per stage (after one untimed)")
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument("--stages", default="warmup,router,joint")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, Qwen2Config

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        base = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[args.shape]), dtype=dtype)
        enc = AutoModel.from_config(Qwen2Config(**ENCODERS[args.encoder_shape]), dtype=dtype)
    dummy = SimpleNamespace(pad_token="<pad>", eos_token="<pad>", truncation_side="left")
    cfg = PersonaFuseConfig(base_model="random", encoder_model="random", dtype=args.dtype)
    pf = PersonaFuseModel.from_config(cfg, base_model=base, tokenizer=dummy, encoder_backbone=enc, encoder_tokenizer=dummy, init_experts=False)
    pf.to(device)
    if not args.no_grad_ckpt:
        set_activation_checkpointing(pf.base_model, True)
    print(f"built {args.shape} + {args.encoder_shape} encoder in {time.perf_counter() - t0:.1f}s", flush=True)

    B, T, Q = args.batch, args.seq, args.query_len
    g = torch.Generator().manual_seed(1)
    vocab, evocab = base.config.vocab_size, enc.config.vocab_size
    ids = torch.randint(10, vocab, (B, T), generator=g).to(device)
    labels = ids.clone()
    labels[:, : T // 2] = -100  # the prompt half is masked, as in training
    mask = torch.ones_like(ids)
    q_ids = torch.randint(10, evocab, (max(B, args.router_batch), Q), generator=g).to(device)
    q_mask = torch.ones_like(q_ids)
    p = torch.zeros(max(B, args.router_batch), 10, device=device)
    p[:, 6] = 1
    p[:, 9] = 1  # same vector for every row: L_trait sees all pairs
    experts = torch.arange(B, device=device) % 10  # stage 1: one expert per row
    micro = args.micro or B

    def params_for(stage):
        for n, prm in pf.named_parameters():
            prm.requires_grad_((stage in ("warmup", "joint") and ".lora_" in n) or (stage in ("router", "joint") and n.startswith("router.")))
        return [prm for prm in pf.parameters() if prm.requires_grad]

    results = {}
    for stage in args.stages.split(","):
        params = params_for(stage)
        opt = torch.optim.AdamW(params, lr=1e-5)
        if stage == "warmup":
            obj = WarmupObjective(pf)
        elif stage == "router":
            obj = RouterObjective(pf, 1.0, 0.0)
        else:
            obj = JointObjective(pf, 1.0, 0.0, 0.2)
        obj.train()

        def step(stage=stage, obj=obj, opt=opt):
            if stage == "router":
                rb = args.router_batch
                loss, _ = obj(q_ids[:rb], q_mask[:rb], p[:rb], row_share=1.0)
                loss.backward()
            else:
                for s in range(0, B, micro):
                    sl = slice(s, s + micro)
                    tokens = B * (T // 2)  # the step's response tokens
                    if stage == "warmup":
                        rows = len(experts[sl])
                        loss = obj(ids[sl], mask[sl], labels[sl], experts[sl], expert_tokens=[tokens] * rows, processes=1)
                    else:
                        loss, _, _ = obj(
                            ids[sl], mask[sl], labels[sl], q_ids[sl], q_mask[sl], p[sl],
                            step_tokens=tokens, row_share=len(ids[sl]) / B, processes=1,
                        )
                    loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step()  # untimed (allocator warm-up)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError as e:
            results[stage] = {"oom": True, "error": str(e)[:300]}
            print(f"{stage:<7} out of memory", flush=True)
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        dt = (time.perf_counter() - t) / args.steps
        tokens = (args.router_batch * Q) if stage == "router" else B * T
        results[stage] = {
            "seconds_per_step": dt,
            "tokens_per_s": tokens / dt,
            "rows_per_step": args.router_batch if stage == "router" else B,
            "tokens_per_row": Q if stage == "router" else T,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "trainable_params_m": sum(x.numel() for x in params) / 1e6,
        }
        print(f"{stage:<7} {dt:7.3f} s/step  {tokens / dt:10.0f} tok/s  peak {results[stage]['peak_gpu_mem_gb'] or 0:6.1f} GiB  "
              f"trainable {results[stage]['trainable_params_m']:.1f}M", flush=True)

    out = {"stages": results, "setup": {
        "base": args.shape, "encoder": args.encoder_shape, "dtype": args.dtype, "batch": B, "seq": T, "query_len": Q,
        "router_batch": args.router_batch, "micro": micro, "gradient_checkpointing": not args.no_grad_ckpt,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
