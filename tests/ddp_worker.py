"""Run under torchrun by test_ddp_two_processes_equal_one and test_fsdp_two_processes_equal_one: the
warm-up and joint stages on the tiny model; rank 0 saves the trained tensors so the test can compare
them with a one-process run. Then the joint stage with AdamW twice in the same two-process world,
once stopped after two steps and resumed, once straight through (AdamW magnifies the rounding
differences between one and two processes, so its resume is compared within one world). The engine
comes from the environment (ACCELERATE_USE_FSDP for FSDP2, else DDP)."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_training import build_tiny, make_tc  # noqa: E402

from personafuse.training import loop  # noqa: E402
from personafuse.training.config import StageConfig  # noqa: E402
from personafuse.training.records import load_records  # noqa: E402
from personafuse.training.stages import run_joint, run_warmup  # noqa: E402

STAGE = StageConfig(steps=3, batch_size=2, grad_accum=2, lr=0.5, micro_batch_size=3, max_grad_norm=0.05,
                    warmup_ratio=0.0, scheduler="linear", optimizer="sgd")
# AdamW: its moments must survive the checkpoint (gathered whole under FSDP) for the resume to match.
ADAMW = StageConfig(steps=4, batch_size=2, grad_accum=2, lr=1e-2, micro_batch_size=3, max_grad_norm=0.5,
                    warmup_ratio=0.0, scheduler="linear", optimizer="adamw")


MAIN = int(os.environ.get("RANK", "0")) == 0  # the process that writes the results


def _tiny():
    pf = build_tiny()
    for m in pf.modules():  # the tiny BERT encoder's dropout draws differ between 1 and 2 processes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return pf


def _trained(pf) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pf.named_parameters() if ".lora_" in n or n.startswith("router.")}


def train(tmp: Path) -> dict[str, torch.Tensor]:
    records = load_records(tmp / "data")
    tc = make_tc(tmp, warmup=STAGE, joint=STAGE)
    # L_trait pairs queries within a micro-batch, and which queries share one depends on how rows
    # are split over processes; every other term is a per-row sum and must match exactly.
    tc.beta = 0.0
    pf = _tiny()
    run_warmup(pf, records, tc)
    run_joint(pf, records, tc)
    return _trained(pf)


def adamw_resume_gap(tmp: Path) -> float:
    """Largest difference between the joint stage with AdamW resumed after two steps and run
    straight through, in the same world."""
    records = load_records(tmp / "data")
    runs = []
    for name in ("straight", "resumed"):
        tc = make_tc(tmp / name, joint=ADAMW)
        tc.data = str(tmp / "data")
        pf = _tiny()
        if name == "resumed":
            run_joint(pf, records, tc, stop_after=2)
            pf = _tiny()  # as a fresh process would
            run_joint(pf, records, tc, resume=True)
        else:
            run_joint(pf, records, tc)
        runs.append(_trained(pf))
    logs = (tmp / "resumed" / "out" / "joint" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logs] == [1, 2, 3, 4]  # resumed without duplicate lines
    return max((runs[0][k] - runs[1][k]).abs().max().item() for k in runs[0])


def train_bf16(tmp: Path) -> None:
    """Mixed precision as on a GPU: a bf16 model, bf16 compute, float32 master weights."""
    records = load_records(tmp / "data")
    tc = make_tc(tmp, warmup=STAGE, joint=ADAMW, sft=STAGE)
    tc.mixed_precision = "bf16"
    pf = build_tiny().to(torch.bfloat16)
    layer = pf.mixture_layers["model.layers.0.self_attn.q_proj"]
    before = layer.lora_B.detach().float().clone()
    losses = [e["loss_lm"] for e in run_warmup(pf, records, tc).losses + run_joint(pf, records, tc).losses]
    # a single-LoRA baseline (peft) through the same engine
    from peft import LoraConfig, get_peft_model

    from conftest import make_tokenizer, tiny_causal_lm
    from personafuse.training.stages import run_sft

    lora = get_peft_model(tiny_causal_lm("qwen2").to(torch.bfloat16),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    b0 = {n: p.detach().float().clone() for n, p in lora.named_parameters() if "lora_B" in n}
    sft = run_sft(lora, make_tokenizer(), records, tc, tmp / "sft")
    sft_moved = max((p.detach().float() - b0[n]).abs().max().item() for n, p in lora.named_parameters() if n in b0)
    if MAIN:
        torch.save({
            "losses": losses,
            "dtype": str(layer.lora_B.dtype),
            "moved": (layer.lora_B.float() - before).abs().max().item(),
            "sft_losses": [e["loss_lm"] for e in sft.losses],
            "sft_moved": sft_moved,
        }, tmp / "bf16.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if sys.argv[2:] == ["bf16"]:  # accelerate fixes the precision once per process: its own run
        train_bf16(out)
        sys.exit(0)
    if sys.argv[2:] == ["refused"]:  # an engine that must stop before training: save its message
        try:
            run_warmup(_tiny(), load_records(out / "data"), make_tc(out, warmup=STAGE))
        except NotImplementedError as e:
            if MAIN:
                (out / "refused.txt").write_text(str(e))
        sys.exit(0)
    sharded_clips = []
    original = loop._clip_per_expert_sharded
    loop._clip_per_expert_sharded = lambda *a: sharded_clips.append(1) or original(*a)
    from personafuse.training import engine

    copies = []
    shard_copy = engine.shard_copy
    engine.shard_copy = lambda *a: copies.append(shard_copy(*a)) or copies[-1]
    params = train(out)
    gap = adamw_resume_gap(out)
    from torch.distributed.fsdp import FSDPModule

    units = sorted({type(m).__mro__[2].__name__ for c, _ in copies for m in c.modules() if isinstance(m, FSDPModule)})
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from torch.distributed.tensor import DTensor

    state = PartialState()
    if MAIN:
        torch.save({
            "params": params,
            "processes": state.num_processes,
            "backend": state.backend,
            "engine": AcceleratorState().distributed_type.value,
            "sharded_clips": len(sharded_clips),
            "fsdp_units": units,
            "adamw_resume_gap": gap,
            "plain_after": not any(isinstance(p, DTensor) for p in params.values()),
        }, out / "params.pt")
