"""One config mechanism (issue 33, item 4): every config is read by personafuse.configs, old files
still load, errors name the file and the field, and the CLI options that set a config field take
their default and help from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from personafuse.configs import ConfigError, build, default, field_of
from personafuse.data.config import PipelineConfig
from personafuse.data.source_options import SourceOptions
from personafuse.data.teacher_options import TeacherOptions
from personafuse.evaluation.config import EvalConfig
from personafuse.moe.config import PersonaFuseConfig
from personafuse.reproduce.config import ReproduceConfig
from personafuse.serving.config import ServeConfig
from personafuse.training.config import TrainConfig

TESTS = Path(__file__).parent
# Written by the hand-written loader (commit dcc1d93) from {warmup: {steps: 5}, model: {r: 4,
# alpha: 8}, random_route: 2}: its partial stage kept the warm-up's other defaults.
OLD_TRAIN_CONFIG = TESTS / "fixtures" / "configs" / "train_config_dcc1d93.json"


def test_a_train_config_json_written_before_still_loads_and_saves_the_same(tmp_path: Path) -> None:
    tc = TrainConfig.load(OLD_TRAIN_CONFIG)
    assert (tc.warmup.steps, tc.warmup.batch_size, tc.warmup.grad_accum, tc.model.r, tc.random_route) == (5, 32, 8, 4, 2)
    tc.save(tmp_path / "train_config.json")
    assert json.loads((tmp_path / "train_config.json").read_text()) == json.loads(OLD_TRAIN_CONFIG.read_text())


def test_the_committed_checkpoint_config_loads() -> None:
    cfg = PersonaFuseConfig.load(TESTS / "golden" / "checkpoint")
    saved = json.loads((TESTS / "golden" / "checkpoint" / "personafuse_config.json").read_text())
    saved.pop("personafuse_version", None)
    assert cfg.to_dict() == saved


@pytest.mark.parametrize(
    ("cls", "text", "error"),
    [
        (TrainConfig, "joint:\n  lr: fast\n", r"c\.yaml: joint\.lr: Input should be a valid number"),
        (TrainConfig, "model:\n  tau: 0\n", r"c\.yaml: model: config field 'tau' must be positive"),
        (TrainConfig, "sft: 3\n", r"c\.yaml: sft: Input should be a dictionary"),
        (ReproduceConfig, "eval:\n  batch_size: 0\n", r"c\.yaml: eval\.batch_size: Input should be greater than or equal to 1"),
        (ReproduceConfig, "data:\n  heldout: true\n", r"c\.yaml: data\.heldout: Input should be a valid integer"),
        (PipelineConfig, "mode: essay\n", r"c\.yaml: mode must be one of persona_cot"),
        (ServeConfig, "max_batch: many\n", r"c\.yaml: max_batch: Input should be a valid integer"),
        (EvalConfig, "benchmarks: [gsm8k, 3]\n", r"c\.yaml: benchmarks\[1\]: Input should be a valid string"),
        (EvalConfig, "judges: x\n", r"c\.yaml: judges: unknown field 'judges'; known: model, benchmarks"),
    ],
)
def test_every_config_names_the_file_and_the_field(tmp_path: Path, cls: type, text: str, error: str) -> None:
    from personafuse.configs import read_mapping

    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=error):
        if cls is ReproduceConfig:
            ReproduceConfig.load(f)
        elif cls is TrainConfig:
            TrainConfig.load(f)
        else:
            build(cls, read_mapping(f), str(f))


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path: Path) -> None:
    # PyYAML reads "1e-4" as a string (YAML 1.1); the typed field makes it the number it means
    (tmp_path / "c.yaml").write_text("warmup:\n  lr: 1e-4\n  steps: 7\n")
    tc = TrainConfig.load(tmp_path / "c.yaml")
    assert tc.warmup.lr == 1e-4 and isinstance(tc.warmup.lr, float) and tc.warmup.batch_size == 32


# command -> {parameter: (config class, field)}: the options that set a config field.
DERIVED: dict[str, dict[str, tuple[type, str]]] = {
    "serve": {"api_key": (ServeConfig, "api_key"), "served_name": (ServeConfig, "model_name"),
              "max_batch": (ServeConfig, "max_batch"), "max_queue": (ServeConfig, "max_queue"),
              "batch_wait_ms": (ServeConfig, "batch_wait_ms"), "max_prompt_tokens": (ServeConfig, "max_prompt_tokens"),
              "max_tokens_limit": (ServeConfig, "max_tokens_limit"), "default_max_tokens": (ServeConfig, "default_max_tokens"),
              "temperature": (ServeConfig, "default_temperature"), "max_body_bytes": (ServeConfig, "max_body_bytes"),
              "max_prompt_chars": (ServeConfig, "max_prompt_chars"), "request_timeout": (ServeConfig, "request_timeout_s"),
              "drain_timeout": (ServeConfig, "drain_timeout_s"), "scheduler": (ServeConfig, "scheduler"),
              "prefill_chunk": (ServeConfig, "prefill_chunk"), "base_only": (ServeConfig, "base_only")},
    "data generate": {"mode": (PipelineConfig, "mode"), "single_call": (PipelineConfig, "single_call"),
                      "allow_both_poles": (PipelineConfig, "allow_both_poles"), "poles_per_cue": (PipelineConfig, "poles_per_cue"),
                      "temperature": (PipelineConfig, "temperature"),
                      "max_endpoint_failures": (PipelineConfig, "max_endpoint_failures"),
                      **{name: (TeacherOptions, name)
                         for name in ("timeout", "max_retries", "backoff", "max_rate_limit_wait", "batch_size")},
                      **{name: (SourceOptions, name) for name in ("source", "limit", "shuffle", "seed", "lang", "min_chars",
                                                                   "max_chars")},
                      "hub_config": (SourceOptions, "config"), "hub_split": (SourceOptions, "split")},
    "eval": {name: (EvalConfig, name) for name in ("model", "data", "limit", "seed", "item_seed", "routing", "judge",
                                                   "batch_size", "system_prompt", "max_new_tokens")},
}


def _command(path: str) -> Any:
    import typer

    import personafuse.cli as cli

    cli._register()
    cmd = typer.main.get_command(cli.app)
    for part in path.split():
        cmd = cmd.commands[part]
    return cmd


@pytest.mark.parametrize("path", sorted(DERIVED))
def test_cli_options_take_default_and_help_from_the_config_field(path: str) -> None:
    params = {p.name: p for p in _command(path).params}
    for name, (cls, field) in DERIVED[path].items():
        assert params[name].default == default(cls, field), (path, name)
        help_text = field_of(cls, field).metadata.get("help")
        if help_text is not None and name not in ("judge",):  # judge's help lists the registry
            assert params[name].help == help_text, (path, name)
    if path == "eval":  # the two options whose CLI form differs from the field's
        assert params["benchmarks"].default == ",".join(default(EvalConfig, "benchmarks"))
        assert str(params["out"].default) == default(EvalConfig, "out")


def test_the_reasoning_token_budget_has_one_default() -> None:
    """`eval --reasoning-tokens`, the grid's eval.reasoning_tokens, the grid's replies cell and the
    prompting wrapper itself all start from evaluation.config.REASONING_TOKENS."""
    import inspect

    from personafuse.evaluation.config import REASONING_TOKENS
    from personafuse.evaluation.cot_prompting import PersonaCoTPrompting
    from personafuse.reproduce.config import GridEvalConfig
    from personafuse.reproduce.replies import build_parser

    params = {p.name: p for p in _command("eval").params}
    assert params["reasoning_tokens"].default == REASONING_TOKENS
    assert default(GridEvalConfig, "reasoning_tokens") == REASONING_TOKENS
    assert build_parser().parse_args(["--model", "base", "--queries", "q", "--out", "o", "--system", "s"]).reasoning_tokens == REASONING_TOKENS
    assert inspect.signature(PersonaCoTPrompting).parameters["reasoning_tokens"].default == REASONING_TOKENS



def test_data_generate_store_options_are_the_store_defaults() -> None:
    import inspect

    from personafuse.data.store import ShardStore

    params = {p.name: p for p in _command("data generate").params}
    store = inspect.signature(ShardStore).parameters
    assert params["shard_size"].default == store["shard_size"].default
    assert params["fsync"].default == store["fsync"].default


def test_the_replies_cell_names_a_bad_queries_line_before_loading_a_model(tmp_path: Path) -> None:
    from personafuse.reproduce.replies import write_replies

    q = tmp_path / "queries.jsonl"
    q.write_text('{"id": "a", "query": "Hi there"}\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"queries\.jsonl:2: no query"):
        write_replies("hf:/nonexistent/model", q, tmp_path / "out.jsonl", system="x")
    q.write_text('{"id": "a", "query": "Hi there"}\n{"id": "b", "query": "cut', encoding="utf-8")
    with pytest.raises(ValueError, match=r"queries\.jsonl:2: not valid JSON"):
        write_replies("hf:/nonexistent/model", q, tmp_path / "out.jsonl", system="x")
    assert not (tmp_path / "out.jsonl").exists()


def test_the_source_loaders_default_to_source_options() -> None:
    import inspect

    from personafuse.data.sources import hub_queries, load_source

    for fn in (load_source, hub_queries):
        for name, p in inspect.signature(fn).parameters.items():
            if name in ("limit", "shuffle", "seed", "lang", "min_chars", "max_chars", "config", "split"):
                assert p.default == default(SourceOptions, name), (fn.__name__, name)
