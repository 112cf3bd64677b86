"""``router_data``: the router stage reads its own labelled queries, the other stages ``data``.

For runs with few generated records but many labelled queries: the router stage trains on
``router_data``'s records (the same router as the stage run by hand on them, not on ``data``'s),
the warm-up on ``data``'s; a bad ``router_data`` is refused before any stage trains.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny, synthetic_records, write_jsonl
from personafuse.training.config import StageConfig, TrainConfig
from personafuse.training.records import RecordError, load_records
from personafuse.training.stages import run_router, train
from personafuse.traits import POLE_INDEX

ONE_STEP = StageConfig(steps=1, batch_size=2, lr=1e-3, micro_batch_size=4, warmup_ratio=0.0)
ROUTER = StageConfig(steps=3, batch_size=8, lr=1e-2, micro_batch_size=8, warmup_ratio=0.0, scheduler="constant")


def _tc(tmp_path, tiny, router_data, out="out") -> TrainConfig:
    return TrainConfig(
        data=str(tmp_path / "data"), router_data=router_data, out=str(tmp_path / out), model=tiny.config,
        warmup=ONE_STEP, router=ROUTER, joint=ONE_STEP, save_every=1000, mixed_precision="no",
    )


def _router_state(pf) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pf.router.named_parameters()}


def test_the_router_stage_reads_router_data_and_the_warmup_reads_data(tmp_path):
    from personafuse import PersonaFuseModel

    tiny = build_tiny(tmp_path, init_range=0.3)  # saved base and encoder: train() builds from the config
    write_jsonl(tmp_path / "data" / "records-00000.jsonl", [r for r in synthetic_records(24, seed=1) if r["situation"] == "math"])
    write_jsonl(tmp_path / "router" / "records-00000.jsonl", synthetic_records(24, seed=2))
    tc = _tc(tmp_path, tiny, str(tmp_path / "router"))
    train(tc, "warmup")
    routed = _router_state(PersonaFuseModel.from_pretrained(train(tc, "router")))
    # the same stage run by hand on router_data's records gives the same router; on data's, another
    warm = tmp_path / "out" / "warmup" / "model"
    for source, same in (("router", True), ("data", False)):
        pf = PersonaFuseModel.from_pretrained(warm)
        run_router(pf, load_records(tmp_path / source), _tc(tmp_path, tiny, None, out=f"by-hand-{source}"))
        by_hand = _router_state(pf)
        # (the encoder body is saved as a delta from the base: equal up to float rounding)
        gap = max(float((routed[n] - by_hand[n]).abs().max()) for n in routed)
        assert (gap < 1e-5) if same else (gap > 1e-3), (source, gap)
    # the warm-up read ``data`` (math: high_C, high_E, low_N), not ``router_data``: only those three
    # experts moved from their zero-initialised B
    warmed = PersonaFuseModel.from_pretrained(warm)
    moved = {i for layer in warmed.mixture_layers.values() for i in range(10) if layer.expert(i)[1].abs().sum() > 0}
    assert moved == {POLE_INDEX["high_C"], POLE_INDEX["high_E"], POLE_INDEX["low_N"]}


@pytest.mark.parametrize("case", ["missing_p", "no_such_path"])
def test_bad_router_data_is_refused_before_any_stage_trains(tmp_path, case):
    tiny = build_tiny(tmp_path)
    write_jsonl(tmp_path / "data" / "records-00000.jsonl", synthetic_records(8, seed=1))
    rows = synthetic_records(4, seed=2)
    if case == "missing_p":
        del rows[1]["p"]
        write_jsonl(tmp_path / "router" / "records-00000.jsonl", rows)
        match = r"records-00000\.jsonl:2"
    else:
        match = "does not exist"
    with pytest.raises(RecordError, match=match):
        train(_tc(tmp_path, tiny, str(tmp_path / "router")))
    assert not (tmp_path / "out" / "warmup").exists()  # refused before the warm-up ran
