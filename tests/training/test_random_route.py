"""The Random Route k baseline as the paper's Table 3 defines it ("post-training: PersonaFuse", with
random activation instead of the router): warm-up as usual, no router stage, a joint stage where
each sequence gets k random experts at 1/k, only the experts training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import build_tiny, records_on_disk, train_config
from personafuse.moe.mixture import MixtureState
from personafuse.training.config import StageConfig, TrainConfig
from personafuse.training.objectives import random_route_weights
from personafuse.training.stages import run_joint, train


@pytest.mark.parametrize("k", [1, 2, 5])
def test_each_row_gets_k_experts_at_one_over_k_whatever_the_chunking(k):
    w = random_route_weights(k, seed=0, step=3, rows=list(range(12)))
    assert w.shape == (12, 10)
    assert ((w > 0).sum(-1) == k).all()
    torch.testing.assert_close(w[w > 0], torch.full(((w > 0).sum().item(),), 1 / k))
    # the draw is a function of (seed, step, record): micro-batches and processes see the same one
    halves = torch.cat([random_route_weights(k, 0, 3, list(range(6))), random_route_weights(k, 0, 3, list(range(6, 12)))])
    torch.testing.assert_close(halves, w)
    if k < 10:  # a new step (and another seed) draws again
        assert not torch.equal(random_route_weights(k, 0, 4, list(range(12))), w)
        assert not torch.equal(random_route_weights(k, 1, 3, list(range(12))), w)


def test_random_route_joint_trains_the_experts_only_under_k_random_experts(tmp_path, monkeypatch):
    records = records_on_disk(tmp_path, 48, 5)
    pf = build_tiny(init_range=0.3)
    before = {n: p.detach().clone() for n, p in pf.named_parameters()}
    seen: list[torch.Tensor] = []
    real_set = MixtureState.set

    def spy(self, weights, **kw):
        if weights is not None:
            seen.append(weights.detach().clone())
        return real_set(self, weights, **kw)

    monkeypatch.setattr(MixtureState, "set", spy)
    sc = StageConfig(steps=60, batch_size=8, lr=1e-2, micro_batch_size=4, warmup_ratio=0.0, scheduler="constant")
    tc = train_config(tmp_path, save_every=1000, random_route=2, joint=sc)
    result = run_joint(pf, records, tc)
    rows = torch.cat(seen)
    assert rows.shape[0] == 60 * 8  # every sequence of every step ran under a random route ...
    assert ((rows > 0).sum(-1) == 2).all() and torch.allclose(rows[rows > 0], torch.tensor(0.5))  # ... of 2 experts at 1/2
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 10  # drawn, not fixed
    lm = [e["loss_lm"] for e in result.losses]
    assert sum(lm[-5:]) / 5 < 0.7 * sum(lm[:5]) / 5
    moved = {n for n, p in pf.named_parameters() if not torch.equal(p, before[n])}
    assert any(".lora_" in n for n in moved)
    assert not any(n.startswith("router.") for n in moved)  # no router in this baseline


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    records = records_on_disk(tmp_path, 40, 4)
    sc = StageConfig(steps=6, batch_size=3, lr=5e-3, micro_batch_size=2)
    full = build_tiny()
    run_joint(full, records, train_config(tmp_path / "full", save_every=1000, random_route=2, joint=sc))
    tc = train_config(tmp_path / "split", save_every=1000, random_route=2, joint=sc)
    run_joint(build_tiny(), records, tc, stop_after=3)
    resumed = build_tiny()
    run_joint(resumed, records, tc, resume=True)
    for (n, p1), (_, p2) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6, msg=n)


def test_the_pipeline_runs_warmup_then_joint_and_no_router_stage(tmp_path):
    from personafuse import PersonaFuseModel

    tiny = build_tiny(tmp_path)  # saved base and encoder: the pipeline builds its model from the config
    records_on_disk(tmp_path, 24, 4)
    small = StageConfig(steps=2, batch_size=2, lr=1e-3, micro_batch_size=4)
    tc = train_config(tmp_path, save_every=1000, model=tiny.config, random_route=3, warmup=small, joint=small)
    final = train(tc)
    out = tmp_path / "out"
    assert final == out / "joint" / "model"
    assert not (out / "router").exists()
    assert json.loads((out / "joint" / "train_config.json").read_text())["random_route"] == 3
    warm = PersonaFuseModel.from_pretrained(out / "warmup" / "model")
    joint = PersonaFuseModel.from_pretrained(final)
    w, j = dict(warm.named_parameters()), dict(joint.named_parameters())
    assert all(torch.equal(p, w[n]) for n, p in j.items() if n.startswith("router."))
    assert any(not torch.equal(p, w[n]) for n, p in j.items() if ".lora_" in n)
    with pytest.raises(ValueError, match="random_route.*no router stage"):
        train(tc, "router")


def test_the_warmup_does_not_depend_on_random_route(tmp_path):
    """Why ``personafuse reproduce`` trains the warm-up once and copies it to Random Route k: the
    stage reads neither the router nor the routing, so the experts come out the same."""
    from personafuse import PersonaFuseModel

    tiny = build_tiny(tmp_path)
    records_on_disk(tmp_path, 24, 4)
    small = StageConfig(steps=3, batch_size=2, lr=1e-2, micro_batch_size=4)
    models = []
    for k in (0, 2):
        tc = dataclasses.replace(train_config(tmp_path, save_every=1000, model=tiny.config, random_route=k, warmup=small), out=str(tmp_path / f"k{k}"))
        models.append(PersonaFuseModel.from_pretrained(train(tc, "warmup")))
    a, b = dict(models[0].named_parameters()), dict(models[1].named_parameters())
    assert any(p.abs().sum() > 0 for n, p in a.items() if "lora_B" in n)  # it trained (a fresh B is zero)
    for n, p in a.items():
        torch.testing.assert_close(p, b[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("bad", [11, -1, "2", True, 1.5])
def test_random_route_must_be_a_count_of_experts(bad):
    with pytest.raises(ValueError, match="random_route"):
        TrainConfig.from_dict({"random_route": bad})


def test_cli_flag_reaches_the_config(tmp_path):
    from typer.testing import CliRunner

    from personafuse.training.cli import app

    res = CliRunner().invoke(app, ["--random-route", "12", "--data", str(tmp_path), "--out", str(tmp_path / "o")], terminal_width=200)
    assert res.exit_code == 2 and "--random-route" in res.output and "random_route must be" in res.output
    assert not (tmp_path / "o").exists()  # refused before anything is written
