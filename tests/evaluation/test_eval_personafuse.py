"""The evaluation suite on a real (tiny) PersonaFuse checkpoint: ``pf:DIR`` subjects with routing
modes, per-item weights in the run files, routing analysis with the real router, lm-eval's
``personafuse`` class with mixture weights, and probing the persona encoder.

Skips until ``personafuse.moe.model`` is on the branch; uses the tiny-model builder of tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("personafuse.moe.model", reason="the PersonaFuse model is not on this branch yet")
conftest = pytest.importorskip("conftest")
if not hasattr(conftest, "build_tiny"):
    pytest.skip("tests/conftest.py has no build_tiny yet", allow_module_level=True)

from eval_support import FIXTURE_BENCHDATA, FIXTURES  # noqa: E402
from personafuse.evaluation.runner import EvalConfig, Runner, read_records  # noqa: E402
from personafuse.evaluation.subjects import PersonaFuseSubject, SubjectOptions, load_subject  # noqa: E402
from personafuse.traits import TRAIT_POLES  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pf")
    model = conftest.build_tiny(d / "parts")
    model.save_pretrained(d / "ckpt")
    return d / "ckpt"


def test_pf_subject_random_route_records_weights(ckpt: Path, tmp_path: Path) -> None:
    subj = load_subject(f"pf:{ckpt}", SubjectOptions(routing="random:2", batch_size=2))
    assert isinstance(subj, PersonaFuseSubject)
    cfg = EvalConfig(model=f"pf:{ckpt}", benchmarks=["gsm8k"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA), routing="random:2", max_new_tokens=4)
    res = Runner(cfg, lambda: subj, progress=False).run()
    recs = list(read_records(tmp_path / "run" / "gsm8k.jsonl").values())
    for r in recs:
        w = r["weights"]
        assert set(w) == set(TRAIT_POLES)
        assert sorted(w.values())[-2:] == [0.5, 0.5] and sum(w.values()) == pytest.approx(1.0)
    assert res["subject"]["routing"] == {"mode": "random", "k": 2, "seed": 0}
    assert set(res["benchmarks"]["gsm8k"]["mean_weights"]) == set(TRAIT_POLES)


def test_pf_router_weights_and_routing_analysis(ckpt: Path, tmp_path: Path) -> None:
    from personafuse.evaluation.routing_analysis import analyse

    rep = analyse([], situations=str(FIXTURES / "situations.jsonl"), model=f"pf:{ckpt}", out=str(tmp_path))
    # Each situation's row is the mean of the router's weights over that situation's own queries.
    from personafuse import PersonaFuseModel

    model = PersonaFuseModel.from_pretrained(ckpt)
    by_sit: dict[str, list[str]] = {}
    for line in (FIXTURES / "situations.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_sit.setdefault(row["situation"], []).append(row["query"])
    assert sorted(r["group"] for r in rep.rows) == sorted(by_sit)
    for row in rep.rows:
        want = model.route(by_sit[row["group"]]).mean(0).tolist()
        assert row["n"] == len(by_sit[row["group"]])
        assert [row[p] for p in TRAIT_POLES] == pytest.approx(want, abs=1e-5), row["group"]
    assert (tmp_path / "radar_situations.png").is_file()


def test_pf_lm_eval_class_applies_mixture_weights(ckpt: Path) -> None:
    pytest.importorskip("lm_eval")
    from personafuse.evaluation.lm_eval_model import PersonaFuseLM

    lm = PersonaFuseLM(model=f"pf:{ckpt}", routing="pole:high_A", device="cpu", batch_size=2)
    ids = torch.tensor([[2, 10, 11, 12], [2, 13, 14, 15]])
    logits_a = lm._model_call(ids)
    assert lm.last_weights is not None and lm.last_weights[:, 6].tolist() == [1.0, 1.0]
    lm._routing = {"mode": "pole", "pole": "low_A"}
    logits_b = lm._model_call(ids)
    assert not torch.allclose(logits_a, logits_b)  # a different expert changes the output


def test_pf_persona_encoder_probe(ckpt: Path) -> None:
    from personafuse.evaluation.probing import make_encoder

    enc = make_encoder(f"pf:{ckpt}")
    x = enc(["i feel so sad", "solve x plus two"])
    assert x.shape[0] == 2 and x.ndim == 2


def test_pf_dir_spec_without_prefix(ckpt: Path) -> None:
    subj = load_subject(str(ckpt), SubjectOptions(routing="fixed:high_C=1"))
    g = subj.generate(["hello"], max_new_tokens=2)
    assert g[0].weights["high_C"] == pytest.approx(1.0)
    assert json.loads((ckpt / "personafuse_config.json").read_text())
