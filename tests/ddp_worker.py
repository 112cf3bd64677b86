"""Run by test_ddp_two_processes_equal_one under torchrun: the warm-up and joint stages on the tiny
model; rank 0 saves the trained tensors so the test can compare them with a one-process run."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from personafuse.records import load_records  # noqa: E402
from personafuse.stages import run_joint, run_warmup  # noqa: E402
from personafuse.train_config import StageConfig  # noqa: E402
from test_training import build_tiny, make_tc  # noqa: E402

STAGE = StageConfig(steps=3, batch_size=2, grad_accum=2, lr=0.5, micro_batch_size=3, max_grad_norm=0.05,
                    warmup_ratio=0.0, scheduler="linear", optimizer="sgd")


def train(tmp: Path) -> dict[str, torch.Tensor]:
    records = load_records(tmp / "data")
    tc = make_tc(tmp, warmup=STAGE, joint=STAGE)
    # L_trait pairs queries within a micro-batch, and which queries share one depends on how rows
    # are split over processes; every other term is a per-row sum and must match exactly.
    tc.beta = 0.0
    pf = build_tiny()
    for m in pf.modules():  # the tiny BERT encoder's dropout draws differ between 1 and 2 processes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    run_warmup(pf, records, tc)
    run_joint(pf, records, tc)
    return {n: p.detach().clone() for n, p in pf.named_parameters() if ".lora_" in n or n.startswith("router.")}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    params = train(out)
    from accelerate import PartialState

    state = PartialState()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"params": params, "processes": state.num_processes, "backend": state.backend}, out / "params.pt")
