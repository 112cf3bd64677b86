"""Three-stage training on tiny random models."""

import json
import math

import pytest
import torch

from conftest import build_tiny as _build_tiny
from conftest import synthetic_records, write_jsonl
from personafuse.moe.packing import group_of
from personafuse.training.config import StageConfig, TrainConfig
from personafuse.training.records import RecordError, load_records
from personafuse.training.stages import run_joint, run_router, run_warmup


def build_tiny():
    return _build_tiny(init_range=0.3)


def make_tc(tmp_path, **stages) -> TrainConfig:
    tc = TrainConfig(
        data=str(tmp_path / "data"), out=str(tmp_path / "out"), save_every=1000, mixed_precision="no"
    )
    for name, sc in stages.items():
        setattr(tc, name, sc)
    return tc


def records_from(rows, tmp_path, name="records-00000.jsonl"):
    write_jsonl(tmp_path / "data" / name, rows)
    return load_records(tmp_path / "data")


def topk_exact(pf, rows) -> float:
    w = pf.route([r["query"] for r in rows])
    hits = 0
    for row, wr in zip(rows, w, strict=True):
        active = {i for i, v in enumerate(row["p"]) if v}
        hits += set(wr.topk(len(active)).indices.tolist()) == active
    return hits / len(rows)


def test_batched_warmup_equals_ten_separate_runs(tmp_path):
    rows = synthetic_records(24, seed=1)
    records = records_from(rows, tmp_path)
    sc = StageConfig(
        steps=4,
        batch_size=2,
        grad_accum=2,
        lr=0.5,
        micro_batch_size=5,
        max_grad_norm=0.05,
        warmup_ratio=0.0,
        scheduler="linear",
        optimizer="sgd",
    )
    tc = make_tc(tmp_path, warmup=sc)
    batched = build_tiny()
    run_warmup(batched, records, tc, out_dir=tmp_path / "batched")
    moved = 0
    for i in range(10):
        alone = build_tiny()
        before = {n: m.expert(i) for n, m in alone.mixture_layers.items()}
        before = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in before.items()}
        run_warmup(alone, records, tc, experts=[i], out_dir=tmp_path / f"alone-{i}")
        for name, layer in batched.mixture_layers.items():
            a_b, b_b = layer.expert(i)
            a_s, b_s = alone.mixture_layers[name].expert(i)
            torch.testing.assert_close(a_b, a_s, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b_b, b_s, atol=1e-5, rtol=1e-5)
            moved += int(not torch.allclose(a_s, before[name][0]))
    assert moved > 0  # experts with records really trained


ROUTER_SC = StageConfig(
    steps=300, batch_size=16, lr=3e-3, micro_batch_size=16, warmup_ratio=0.0, scheduler="constant"
)


@pytest.fixture(scope="module")
def router_trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    records = records_from(synthetic_records(160, seed=2), tmp)
    tc = make_tc(tmp, router=ROUTER_SC)
    pf = build_tiny()
    held_out = synthetic_records(40, seed=99)
    before = topk_exact(pf, held_out)
    result = run_router(pf, records, tc)
    return pf.eval(), result, records, held_out, before, tmp


def test_router_stage_learns_synthetic_routing(router_trained):
    pf, result, _, held_out, before, tmp = router_trained
    first, last = result.losses[:5], result.losses[-5:]
    mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
    assert mean(last, "loss_contrastive") < 0.5 * mean(first, "loss_contrastive")
    assert mean(last, "loss_trait") < mean(first, "loss_trait")
    assert before < 0.5
    assert topk_exact(pf, held_out) >= 0.9
    assert (tmp / "out" / "router" / "loss.png").stat().st_size > 1000
    assert (tmp / "out" / "router" / "tensorboard").is_dir()
    # experts were frozen in this stage
    assert all(not p.requires_grad for n, p in pf.named_parameters() if ".lora_" in n)


def test_joint_stage_lowers_lm_loss_and_keeps_routing(router_trained, tmp_path):
    import copy

    trained, _, records, held_out, _, _ = router_trained
    pf = copy.deepcopy(trained)
    tc = make_tc(
        tmp_path,
        joint=StageConfig(
            steps=30, batch_size=8, lr=1e-2, micro_batch_size=8, warmup_ratio=0.0, scheduler="constant"
        ),
    )
    result = run_joint(pf, records, tc)
    lm = [e["loss_lm"] for e in result.losses]
    assert sum(lm[-5:]) / 5 < 0.7 * sum(lm[:5]) / 5
    assert topk_exact(pf.eval(), held_out) >= 0.9
    moved = [n for n, p in pf.named_parameters() if not torch.equal(p, dict(trained.named_parameters())[n])]
    assert any(".lora_" in n for n in moved) and any(n.startswith("router.") for n in moved)


@pytest.mark.parametrize("stage", ["warmup", "joint"])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, stage):
    rows = synthetic_records(40, seed=4)
    records = records_from(rows, tmp_path)
    sc = StageConfig(steps=6, batch_size=3, lr=5e-3, micro_batch_size=4)
    run = run_warmup if stage == "warmup" else run_joint

    full_tc = make_tc(tmp_path / "full", **{stage: sc})
    full = build_tiny()
    run(full, records, full_tc)

    tc = make_tc(tmp_path / "split", **{stage: sc})
    part = build_tiny()
    run(part, records, tc, stop_after=3)  # as if the process died after step 3's checkpoint
    resumed = build_tiny()  # a fresh process: fresh model, state from the checkpoint
    result = run(resumed, records, tc, resume=True)

    for (n1, p1), (n2, p2) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6, msg=n1)
    steps = [e["step"] for e in result.losses]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_an_optimiser_state_from_another_engine(tmp_path):
    # A checkpoint written under FSDP holds the optimiser state keyed by parameter path; a
    # one-process resume must not feed it to a plain optimizer.load_state_dict.
    records = records_from(synthetic_records(12, seed=4), tmp_path)
    tc = make_tc(tmp_path, warmup=StageConfig(steps=2, batch_size=2, micro_batch_size=4))
    run_warmup(build_tiny(), records, tc, stop_after=1)
    path = tmp_path / "out" / "warmup" / "checkpoint-1" / "state.pt"
    state = torch.load(path, weights_only=False)
    state["optimizer"] = {"format": "fsdp-full", "state": {"state": {}, "param_groups": []}}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"checkpoint-1/state.pt: the optimiser state was saved under FSDP"):
        run_warmup(build_tiny(), records, tc, resume=True)


def test_bad_records_are_rejected_with_their_ids(tmp_path):
    rows = synthetic_records(6)
    rows[1]["p"] = [0] * 10
    rows[2]["p"] = [1, 0, 1]
    rows[3]["response"] = "  "
    del rows[4]["query"]
    write_jsonl(tmp_path / "data" / "records-00000.jsonl", rows)
    with (tmp_path / "data" / "records-00000.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(RecordError) as e:
        load_records(tmp_path / "data")
    msg = str(e.value)
    assert "5 bad training record(s)" in msg
    assert "id math-1" in msg and "all zero" in msg
    assert "id service-2" in msg and "has 3 entries" in msg
    assert "id support-3" in msg and "'response' is empty" in msg
    assert "missing field(s) query" in msg
    assert "records-00000.jsonl:7: not valid JSON" in msg
    with pytest.raises(RecordError, match="does not exist"):
        load_records(tmp_path / "nope")


def test_a_killed_generation_folder_trains_as_the_store_reads_it(tmp_path):
    """A `data generate` run killed mid-write leaves a torn last line; the store's reader skips it,
    and so must training (it used to stop with 'not valid JSON'). A record regenerated after a
    resume (same key) replaces its earlier line, as the store's read_all does."""
    from personafuse.data.store import RECORDS, read_all

    rows = synthetic_records(5)
    for i, r in enumerate(rows):
        r["key"] = f"k{i}"
    fixed = dict(rows[2], response="a second, complete answer", key="k2")
    d = tmp_path / "gen"
    write_jsonl(d / "records-00000.jsonl", rows[:4])
    write_jsonl(d / "records-00001.jsonl", [fixed, rows[4]])
    with (d / "records-00001.jsonl").open("a") as f:
        f.write('{"key": "k9", "query": "cut sho')  # the kill
    got = load_records(d)
    store = read_all(d, RECORDS)
    assert sorted(r.id for r in got) == sorted(r["id"] for r in store) and len(got) == 5
    assert next(r for r in got if r.id == rows[2]["id"]).response == "a second, complete answer"
    # A hand-written file whose last line lacks only its newline keeps that record.
    one = tmp_path / "mine.jsonl"
    one.write_text("\n".join(json.dumps(r) for r in rows[:2]))
    assert [r.id for r in load_records(one)] == [rows[0]["id"], rows[1]["id"]]


def test_train_config_round_trip_and_errors(tmp_path):
    tc = TrainConfig()
    assert (tc.warmup.batch_size, tc.warmup.grad_accum, tc.warmup.steps, tc.warmup.lr) == (32, 8, 1000, 1e-4)
    assert (tc.router.batch_size, tc.router.lr) == (64, 1e-4)
    assert (tc.joint.batch_size, tc.joint.lr, tc.joint.steps) == (32, 1e-5, 300)
    assert (tc.beta, tc.gamma) == (1.0, 0.2)
    path = tmp_path / "c.json"
    tc.save(path)
    assert TrainConfig.load(path).to_dict() == tc.to_dict()
    (tmp_path / "c.yaml").write_text("gamma: 1.0\nwarmup:\n  steps: 5\n")
    loaded = TrainConfig.load(tmp_path / "c.yaml")
    assert loaded.gamma == 1.0 and loaded.warmup.steps == 5 and loaded.warmup.lr == 1e-4
    (tmp_path / "bad.yaml").write_text("warmup:\n  stepz: 5\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: warmup\.stepz: unknown field 'stepz'"):
        TrainConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"rank": 4}}))
    with pytest.raises(ValueError, match=r"bad\.json: model\.rank: unknown field 'rank'"):
        TrainConfig.load(tmp_path / "bad.json")
    # a train_config.json saved by an earlier release, with a field since removed: loads, says so
    (tmp_path / "old.json").write_text(json.dumps({**tc.to_dict(), "log_every": 1}))
    with pytest.warns(UserWarning, match="'log_every' is no longer a setting"):
        assert TrainConfig.load(tmp_path / "old.json").to_dict() == tc.to_dict()


def test_sft_baseline_trains_a_peft_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from personafuse.moe.config import PersonaFuseConfig
    from personafuse.training.stages import train_baseline

    base_dir = tmp_path / "base"
    _build_tiny(tmp_path, init_range=0.3)  # writes base/ and encoder/ there
    rows = synthetic_records(40, seed=5)
    for r in rows:
        r["p"] = None  # baseline data modes carry no activation vector
    write_jsonl(tmp_path / "direct" / "records-00000.jsonl", rows)
    tc = make_tc(tmp_path, sft=StageConfig(steps=20, batch_size=8, lr=1e-2, micro_batch_size=8, warmup_ratio=0.0, scheduler="constant"))
    tc.data = str(tmp_path / "direct")
    tc.model = PersonaFuseConfig(base_model=str(base_dir), encoder_model=str(tmp_path / "encoder"))
    adapter = train_baseline(tc, "direct")
    losses = [json.loads(x)["loss_lm"] for x in (tmp_path / "out" / "baseline-direct" / "losses.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="unknown baseline kind 'funny'"):
        train_baseline(tc, "funny")


def _two_processes_equal_one(tmp_path, engine_env: dict[str, str]) -> dict:
    # The same training code under torchrun (2 CPU processes, gloo over loopback): each process
    # takes half of every step's rows and the engine averages gradients, which must give the
    # one-process parameters (warm-up with per-expert clipping, then the joint stage). In the same
    # world, the joint stage with AdamW stopped after two steps and resumed must equal a straight run.
    import ddp_worker

    rows = synthetic_records(24, seed=1)
    for d in ("one", "two"):
        records_from(rows, tmp_path / d)
    one = ddp_worker.train(tmp_path / "one")
    _torchrun_worker(engine_env, tmp_path / "two")
    saved = torch.load(tmp_path / "two" / "params.pt")
    assert (saved["processes"], saved["backend"]) == (2, "gloo")  # really distributed
    two = saved["params"]
    assert one.keys() == two.keys() and any(".lora_B" in k for k in one)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4, msg=k)
    logs = (tmp_path / "two" / "out" / "joint" / "losses.jsonl").read_text().splitlines()
    assert len(logs) == 3  # one writer, no duplicate lines
    for stage in ("warmup", "joint"):  # the logged loss is the whole step's, not the main process's share
        lm = [[json.loads(x)["loss_lm"] for x in (tmp_path / d / "out" / stage / "losses.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
        assert lm[1] == pytest.approx(lm[0], rel=1e-4), stage
        # the checkpoint holds the whole trained tensors (gathered under FSDP), keyed as one process keys them
        ckpt = [torch.load(tmp_path / d / "out" / stage / "checkpoint-3" / "state.pt", weights_only=False)["params"]
                for d in ("one", "two")]
        assert ckpt[0].keys() == ckpt[1].keys() and ckpt[0]
        for k in ckpt[0]:
            torch.testing.assert_close(ckpt[0][k], ckpt[1][k], atol=1e-5, rtol=1e-4, msg=f"{stage} checkpoint {k}")
    assert saved["adamw_resume_gap"] <= 1e-6
    return saved


def test_ddp_two_processes_equal_one(tmp_path):
    saved = _two_processes_equal_one(tmp_path, {})
    assert saved["engine"] == "MULTI_CPU" and saved["sharded_clips"] == 0


# what `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}


def test_fsdp_two_processes_equal_one(tmp_path):
    # FSDP2 through accelerate's environment (what `accelerate launch --config_file fsdp.yaml`
    # sets): every decoder layer and the encoder's layers are sharded over the two processes, the
    # per-expert clipping works on the local shards, checkpoints hold whole tensors, and the
    # caller's model comes back unsharded with the trained values.
    saved = _two_processes_equal_one(tmp_path, FSDP_ENV)
    assert saved["engine"] == "FSDP"
    # TRANSFORMER_BASED_WRAP without class names: the models' own _no_split_modules, plus the root
    assert {"LlamaDecoderLayer", "BertLayer", "WarmupObjective", "JointObjective"} <= set(saved["fsdp_units"])
    assert saved["sharded_clips"] == 3  # every warm-up step clipped sharded gradients
    assert saved["plain_after"]


def test_fsdp_bf16_with_accelerate_activation_checkpointing(tmp_path):
    # The GPU configuration on CPU processes: bf16 compute through accelerate's FSDP2 mixed-precision
    # policy, float32 master weights for the adapters, accelerate's own activation checkpointing
    # (which renames the wrapped layers); the trained tensors come back in bf16. Then a peft
    # single-LoRA baseline (run_sft) through the same engine.
    records_from(synthetic_records(24, seed=1), tmp_path)
    _torchrun_worker({**FSDP_ENV, "FSDP_ACTIVATION_CHECKPOINTING": "true"}, tmp_path, "bf16")
    saved = torch.load(tmp_path / "bf16.pt")
    assert saved["dtype"] == "torch.bfloat16" and saved["moved"] > 0
    assert len(saved["losses"]) == 7 and all(math.isfinite(x) for x in saved["losses"])
    assert saved["losses"][-1] < saved["losses"][3]  # the joint stage's LM loss falls
    assert len(saved["sft_losses"]) == 3 and saved["sft_moved"] > 0  # a peft baseline trains too


def test_fsdp1_is_refused_before_anything_is_written(tmp_path):
    # FSDP1's flat parameters would hide the experts' tensors: the run names the setting to change.
    records_from(synthetic_records(8, seed=1), tmp_path)
    _torchrun_worker({**FSDP_ENV, "FSDP_VERSION": "1"}, tmp_path, "refused")
    assert "FSDP1 is not supported" in (tmp_path / "refused.txt").read_text()
    assert "fsdp_version: 2" in (tmp_path / "refused.txt").read_text()
    assert not (tmp_path / "out" / "warmup").exists()


def _torchrun_worker(engine_env: dict[str, str], *args) -> None:
    """tests/ddp_worker.py on two CPU processes (gloo over loopback), the engine from the environment."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), **engine_env}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()),
         os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddp_worker.py"), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_encoder_lr_sets_the_backbone_rate_apart(tmp_path):
    # encoder_lr=0 freezes the pretrained encoder in effect while projection and expert
    # embeddings still learn at lr; unset, the backbone moves too.
    rows = synthetic_records(24, seed=2)
    records = records_from(rows, tmp_path)
    moved = {}
    for enc_lr in (0.0, None):
        sc = StageConfig(steps=3, batch_size=8, lr=1e-2, micro_batch_size=8, warmup_ratio=0.0, encoder_lr=enc_lr)
        tc = make_tc(tmp_path / str(enc_lr), router=sc)
        pf = build_tiny()
        before = {n: p.detach().clone() for n, p in pf.named_parameters() if n.startswith("router.")}
        run_router(pf, records, tc)
        after = dict(pf.named_parameters())
        moved[enc_lr] = {
            part: any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix))
            for part, prefix in (("backbone", "router.encoder.backbone."), ("proj", "router.encoder.proj"),
                                 ("embeddings", "router.expert_embeddings"))
        }
    assert moved[0.0] == {"backbone": False, "proj": True, "embeddings": True}
    assert moved[None] == {"backbone": True, "proj": True, "embeddings": True}
    assert TrainConfig.from_dict({"router": {"encoder_lr": 1e-5}}).router.encoder_lr == 1e-5


def test_half_precision_model_trains_float32_master_weights(tmp_path):
    # A bf16 model: at lr 1e-5 a bf16 weight of size ~0.1 cannot move (its spacing is ~4e-4), so
    # the adapters must train as float32 and be cast back after the stage.
    rows = synthetic_records(24, seed=3)
    records = records_from(rows, tmp_path)
    sc = StageConfig(steps=3, batch_size=2, lr=1e-5, micro_batch_size=10, warmup_ratio=0.0, scheduler="constant")
    tc = make_tc(tmp_path, warmup=sc)
    pf = build_tiny().to(torch.bfloat16)
    # the layer as built: packing swaps a packed layer in for it and unpacking swaps it back
    layer = pf.mixture_layers["model.layers.0.self_attn.q_proj"]
    pf.state.pack = True  # packed for inference before training: the stage must not leave it stale
    ids = torch.randint(7, 150, (2, 6), generator=torch.Generator().manual_seed(1))
    w = torch.softmax(torch.randn(2, 10, generator=torch.Generator().manual_seed(2)), -1)
    with torch.no_grad():
        pf(ids, weights=w)
    assert pf.mixture_layers["model.layers.0.self_attn.q_proj"] is not layer  # packed now
    a0 = layer.lora_A.detach().float().clone()
    seen = []
    original = layer.forward
    layer.forward = lambda x: seen.append((layer.lora_A.dtype, x.dtype)) or original(x)
    result = run_warmup(pf, records, tc)
    assert seen and set(seen) == {(torch.float32, torch.bfloat16)}  # fp32 master weights, bf16 compute
    assert layer.lora_A.dtype == torch.bfloat16  # restored after the stage
    moved = (layer.lora_A.float() - a0).abs()
    assert moved.max() > 0 and moved.max() < 1e-3  # small fp32 updates survived the round trip
    assert all(math.isfinite(e["loss_lm"]) for e in result.losses)
    pure = layer.lora_A.detach().clone()
    pure = pure[pure.abs() > 0.01]
    # the same size of update applied to bf16 weights directly is lost
    assert torch.equal(pure + 1e-5 * torch.sign(pure), pure)
    pf.state.set(None)
    with torch.no_grad():  # inference after training sees the trained adapters, packed or not
        packed = pf(ids, weights=w).logits
        pack = group_of(layer).weight
        assert pack is not None and layer.lora_A.untyped_storage().data_ptr() == pack.untyped_storage().data_ptr()
        pf.state.pack = False
        pf.state.invalidate_packs()
        plain = pf(ids, weights=w).logits
    torch.testing.assert_close(packed, plain, atol=1e-2, rtol=1e-2)  # bf16, two summation orders


def test_deepspeed_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # `accelerate launch` with a DeepSpeed config sets this; DeepSpeed's engine would own the
    # optimiser step and clip one global norm, so the run stops with an error that names FSDP2.
    records = records_from(synthetic_records(8, seed=1), tmp_path)
    tc = make_tc(tmp_path, warmup=StageConfig(steps=1, batch_size=2, micro_batch_size=2))
    pf = build_tiny()
    before = {n: p.detach().clone() for n, p in pf.named_parameters() if ".lora_" in n}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(NotImplementedError, match=r"DeepSpeed is not supported .* use FSDP2"):
        run_warmup(pf, records, tc)
    assert not (tmp_path / "out" / "warmup").exists() or not any((tmp_path / "out" / "warmup").iterdir())
    assert all(torch.equal(before[n], p) for n, p in pf.named_parameters() if n in before)
