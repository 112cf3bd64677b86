"""Safety net for the package reshape (issue 21): behaviours whose breakage no other test noticed.

Each test here was shown to fail on a planted bug before it was committed (the bug is named in its
docstring), so a refactor that reintroduces one of those mistakes is caught.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import build_tiny, make_tokenizer, synthetic_records, tiny_causal_lm, write_jsonl
from personafuse.evaluation.subjects import HFSubject
from personafuse.training.config import StageConfig, TrainConfig
from personafuse.training.records import Record, load_records
from personafuse.training.stages import Featurizer, run_joint, run_warmup
from personafuse.traits import weights_dict


def _records(tmp_path: Path, n: int, seed: int) -> list[Record]:
    write_jsonl(tmp_path / "data" / "records-00000.jsonl", synthetic_records(n, seed=seed))
    return load_records(tmp_path / "data")


def _tc(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "out"), mixed_precision="no", **kw)


def _no_dropout(module: nn.Module) -> None:
    # The step runs in train mode; finite differences need the same function it differentiated.
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


# --------------------------------------------------------------------------- stage 3 gradient
def _lm_loss(pf, feats: Featurizer, ks: list[int]) -> float:
    """L_lm of the joint stage on rows ``ks`` (token mean over the step), the mixture from the
    router, computed here in float64 from the model's logits (not with the training loss code)."""
    b, enc = feats.lm_batch(ks, "cpu"), feats.enc_batch(ks, "cpu")
    with torch.no_grad():
        w, _ = pf.router(enc["enc_ids"], enc["enc_mask"])
        logits = pf(b["input_ids"], weights=w, attention_mask=b["attention_mask"]).logits.double()
    labels = b["labels"][:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp[keep].gather(1, labels[keep].unsqueeze(1))
    return float(nll.sum() / keep.sum())


# Directions the gradient is checked along: the whole step, then each block of the router on its
# own (a block whose gradient were lost or mis-scaled shows there even if the total looks right).
BLOCKS = {
    "all": "router.",
    "expert embeddings": "router.expert_embeddings",
    "projection": "router.encoder.proj.",
    "encoder backbone": "router.encoder.backbone.",
}


def _fd_along(before, v: dict[str, torch.Tensor], feats: Featurizer, ks: list[int], eps: float) -> float:
    f = []
    for sign in (1, -1):
        probe = copy.deepcopy(before)
        with torch.no_grad():
            for n, p in probe.named_parameters():
                if n in v:
                    p.add_(sign * eps * v[n])
        f.append(_lm_loss(probe, feats, ks))
    return (f[0] - f[1]) / (2 * eps)


def test_joint_lm_loss_reaches_the_router_through_the_mixture_weights(tmp_path: Path) -> None:
    """One joint SGD step with gamma=0 (L_lm only): the router's update must be -lr times the
    finite-difference gradient of L_lm. Planted bug caught: ``self.pf.state.set(w.detach())`` in
    JointObjective.forward (the router then never moves)."""
    records = _records(tmp_path, 6, seed=5)
    lr = 1.0
    sc = StageConfig(steps=1, batch_size=6, micro_batch_size=6, lr=lr, optimizer="sgd", scheduler="constant",
                     warmup_ratio=0.0, max_grad_norm=None)
    tc = _tc(tmp_path, joint=sc, gamma=0.0, save_every=1000)
    pf = build_tiny(init_range=0.3).double()  # float64 LM; the router's cosines stay float32
    _no_dropout(pf)
    before = copy.deepcopy(pf)
    run_joint(pf, records, tc)

    names = [n for n, _ in pf.named_parameters() if n.startswith("router.")]
    after, start = dict(pf.named_parameters()), dict(before.named_parameters())
    step = {n: (after[n] - start[n]).detach() for n in names}  # = -lr * dL_lm/dtheta
    feats = Featurizer.for_model(records, before, tc)
    for block, prefix in BLOCKS.items():
        part = {n: d for n, d in step.items() if n.startswith(prefix)}
        size = float(torch.sqrt(sum((d**2).sum() for d in part.values())))
        assert size > 1e-3, f"{block}: L_lm did not reach it (update norm {size})"
        # Along the unit direction of the update, dL/dv = -|update| / lr. eps: the float32 cosines
        # make smaller steps rounding noise, larger ones curvature (measured: 0.05 % off at 1e-3).
        fd = _fd_along(before, {n: d / size for n, d in part.items()}, feats, list(range(len(records))), 1e-3)
        assert -size / lr == pytest.approx(fd, rel=5e-3), block


# --------------------------------------------------------------------------- reply order
PROMPTS = [  # lengths out of order, so a length sort reorders them
    "please help me with this math problem and my exam",
    "hello",
    "i feel so anxious about my job",
    [{"role": "user", "content": "write a poem"}],
    "why",
    "can you solve the equation x plus two",
]


def test_hf_subject_keeps_each_reply_with_its_prompt() -> None:
    """A batched call must return, at position k, the reply prompt k gets on its own. Planted bug
    caught: HFSubject.generate storing a batch's replies in sorted order (``out[s + j]``)."""
    subj = HFSubject(tiny_causal_lm(init_range=0.3), make_tokenizer(), batch_size=4)
    alone = [subj.generate([p], max_new_tokens=5)[0].text for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS), "replies must differ for the order to be observable"
    together = [g.text for g in subj.generate(PROMPTS, max_new_tokens=5)]
    assert together == alone


def test_personafuse_generate_keeps_each_reply_with_its_prompt_and_weights() -> None:
    """Per-prompt weights: reply k must carry row k and equal prompt k generated alone with it.
    Planted bug caught: PersonaFuseModel.generate storing replies by batch row (``results[start + row]``)."""
    pf = build_tiny(init_range=0.3)
    w = torch.eye(10)[[3, 0, 7, 5, 1, 9]]  # one expert each: rows are told apart by weights
    alone = [pf.generate([p], weights=w[k], max_new_tokens=5)[0] for k, p in enumerate(PROMPTS)]
    assert len({g.text for g in alone}) == len(PROMPTS), "replies must differ for the order to be observable"
    together = pf.generate(PROMPTS, weights=w, max_new_tokens=5, batch_size=4)
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.weights for g in together] == [weights_dict(row.tolist()) for row in w]


# --------------------------------------------------------------------------- resume after a crash
SC_RESUME = StageConfig(steps=5, batch_size=3, lr=5e-3, micro_batch_size=4)


def _crash_after_step_3(tmp_path: Path, records: list[Record]) -> tuple[TrainConfig, Path]:
    """Checkpoints every 2 steps; the process dies after step 3's log line, before any checkpoint-3.
    (stop_after=3 writes checkpoint-3 too; removing it leaves what the crash would have left.)"""
    tc = _tc(tmp_path / "split", warmup=SC_RESUME, save_every=2)
    run_warmup(build_tiny(init_range=0.3), records, tc, stop_after=3)
    stage = Path(tc.out) / "warmup"
    shutil.rmtree(stage / "checkpoint-3")
    assert (stage / "checkpoint-2" / "state.pt").is_file()
    return tc, stage / "losses.jsonl"


def _straight(tmp_path: Path, records: list[Record]):
    pf = build_tiny(init_range=0.3)
    result = run_warmup(pf, records, _tc(tmp_path / "full", warmup=SC_RESUME, save_every=2))
    return pf, result


def _same_run(a, ra, b, rb) -> None:
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6, msg=n1)
    assert [e["step"] for e in rb.losses] == [1, 2, 3, 4, 5]
    for ea, eb in zip(ra.losses, rb.losses, strict=True):
        assert eb["loss_lm"] == pytest.approx(ea["loss_lm"], rel=1e-5)


def test_resume_drops_log_lines_past_the_last_checkpoint(tmp_path: Path) -> None:
    """Step 3 was logged but never checkpointed: the resume redoes it, and the log holds each step
    once. Planted bug caught: train_loop keeping every old log line on resume (``<= start`` dropped)."""
    records = _records(tmp_path, 30, seed=4)
    full, full_result = _straight(tmp_path, records)
    tc, log = _crash_after_step_3(tmp_path, records)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    resumed = build_tiny(init_range=0.3)
    result = run_warmup(resumed, records, tc, resume=True)
    _same_run(full, full_result, resumed, result)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_resume_survives_a_torn_last_log_line(tmp_path: Path) -> None:
    """The crash hit mid-write of step 4's log line: the torn line is dropped, not a crash."""
    records = _records(tmp_path, 30, seed=4)
    full, full_result = _straight(tmp_path, records)
    tc, log = _crash_after_step_3(tmp_path, records)
    with log.open("a") as f:
        f.write('{"step": 4, "lr": 0.00')  # no newline: the write never finished
    resumed = build_tiny(init_range=0.3)
    result = run_warmup(resumed, records, tc, resume=True)
    _same_run(full, full_result, resumed, result)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
