"""One config for the whole experiment: which teacher writes the data, which variants are trained
and evaluated on which benchmarks, with which seeds. YAML on disk; ``--set a.b=VALUE`` overrides
any field by its dotted key (the value read as YAML: ``--set seeds=[0,1,2]``). Every mistake is
reported with the field it is in, before any work starts."""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from personafuse.backends import TEACHER_KINDS, teacher_kind
from personafuse.configs import ConfigError, build, config_class, read_mapping
from personafuse.evaluation.config import REASONING_TOKENS
from personafuse.reproduce.variants import VARIANT_TABLE, listed_variants

__all__ = ["ConfigError", "DataConfig", "GridEvalConfig", "ProbeConfig", "ReproduceConfig", "TeacherConfig"]

LABELLERS = ("teacher", "tat", "both")
# A count of items, tokens or rows: an integer (not True, not "8") of at least 1 (0 for heldout).
Count = Annotated[int, Field(strict=True, ge=1)]


@config_class
class TeacherConfig:
    spec: str = "default"  # default | hf:ID | openai:MODEL | vllm:ID
    base_url: str | None = None
    constrained: bool | None = None  # None: the teacher's default (personafuse data generate)
    max_new_tokens: int | None = None  # the response step's limit (None: the command's default)


@config_class
class DataConfig:
    # a query source of `personafuse data generate --source`, or a list of them (mixed in turn)
    source: str | list[str] = "seeds"
    limit: Count = 24  # training queries (the same ones for every data mode)
    heldout: Annotated[int, Field(strict=True, ge=0)] = 2  # situation queries per situation kept out of training (router analysis, pairs)
    seed: int = 0  # shuffles the source before the split
    # teacher: the teacher's activation vectors; tat: the PersonaFuse pipeline learns from the TAT
    # labeller's (personafuse data relabel); both: the teacher's, plus a personafuse_tat variant
    labeller: str = "teacher"

    @property
    def sources(self) -> list[str]:
        """``source`` as a list (one spec or several)."""
        return [self.source] if isinstance(self.source, str) else list(self.source)


def _grid_benchmarks() -> list[str]:
    """The benchmarks the grid evaluates when ``eval.benchmarks`` is not set (``grid_default``)."""
    from personafuse.evaluation.benchmarks import BENCHMARKS

    return [name for name, cls in BENCHMARKS.items() if cls.grid_default]


@config_class
class GridEvalConfig:
    """The grid's ``eval`` section (the eval cells' ``personafuse eval`` options; not the runner's
    ``evaluation.runner.EvalConfig``)."""

    benchmarks: list[str] = field(default_factory=_grid_benchmarks)
    data: str | None = None
    limit: Count | None = 8  # None: every item
    item_seed: int = 0  # which items eval.limit picks: the same for every seed and variant (paired comparisons)
    judge: str | None = None  # for the judged benchmarks (needs_judge): openai:MODEL, hf:PATH, default
    judge_base_url: str | None = None
    # A judge whose URL resolves to the teacher's (e.g. both from $OPENAI_BASE_URL) is refused by the
    # preflight check unless this says the teacher is meant to judge too.
    judge_shares_teacher: bool = False
    # per-benchmark protocol options, as `personafuse eval -o BENCH.KEY=VALUE` (recorded in results)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    reasoning_tokens: Count = REASONING_TOKENS  # Persona-CoT prompting's budget before the answer
    batch_size: Count = 8
    reply_tokens: Count = 256  # replies to the held-out queries (the pairwise study's file)
    threads: int | None = None  # torch CPU threads per cell (None: torch's default)
    # where every model-loading cell (eval, replies, a local teacher's data) runs and in which dtype:
    # the commands' --device auto|cpu|cuda|cuda:N|mps and --dtype auto|bfloat16|float16|float32
    device: str = "auto"
    dtype: str = "auto"
    # Devices the independent eval / replies cells run on side by side, one cell per entry (each
    # child sees its GPU as CUDA_VISIBLE_DEVICES): auto (every visible CUDA device; one cell at a
    # time without one) | [cuda:0, cuda:1, ...] | [cpu, cpu] (several CPU cells at once).
    devices: str | list[str] = "auto"


@config_class
class ProbeConfig:
    """The encoder probing of the paper's Table 6 (``personafuse probe``); off without a dataset."""

    # clinc150 | clinc150-intents | emotion | ecommerce | a local CSV/JSONL | seeds (the bundled
    # seed queries by situation: offline, but the router saw data.limit of them in training)
    dataset: str | None = None
    data: str | None = None  # a local copy of a preset (nothing is downloaded unless the Hub is reachable)
    text_field: str | None = None  # columns of a local file
    label_field: str | None = None
    limit: int | None = 2000


@config_class
class ReproduceConfig:
    model: str = "default"  # the base model every variant starts from
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: str | None = None  # a training config file (personafuse train --config); None: the paper's
    # dotted edits on top of it, from ``--set train.FIELD=VALUE`` (e.g. train.warmup.steps=2)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    # how training cells start on several GPUs, e.g. "accelerate launch --multi_gpu --num_processes 8"
    # (the cell runs `LAUNCHER -m personafuse.cli train ...`); None: one process
    train_launcher: str | None = None
    variants: list[str] = field(default_factory=lambda: list(listed_variants()))
    eval: GridEvalConfig = field(default_factory=GridEvalConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def all_variants(self) -> list[str]:
        """The configured variants plus the ones the labeller adds, in report order."""
        extra = [v.name for v in VARIANT_TABLE.values() if v.relabelled and not v.listed] if self.data.labeller == "both" else []
        return [*self.variants, *extra]

    def validate(self, where: str = "config") -> ReproduceConfig:
        from personafuse.evaluation.benchmarks import BENCHMARKS, canonical_name

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{where}: {key}: {msg}")

        if not isinstance(self.teacher.spec, str) or not self.teacher.spec.strip():
            raise bad("teacher.spec", "a teacher is required (default, hf:ID, openai:MODEL or vllm:ID)")
        if teacher_kind(self.teacher.spec) not in TEACHER_KINDS:
            raise bad("teacher.spec", f"unknown teacher {self.teacher.spec!r}; use default, hf:ID, openai:MODEL or vllm:ID")
        if not self.variants:
            raise bad("variants", "at least one variant")
        known = listed_variants()
        for i, v in enumerate(self.variants):
            if v not in known:  # personafuse_tat comes with data.labeller: both
                raise bad(f"variants[{i}]", f"unknown variant {v!r}; known: {', '.join(known)}")
        for i, b in enumerate(self.eval.benchmarks):
            if canonical_name(str(b)) not in BENCHMARKS:
                raise bad(f"eval.benchmarks[{i}]", f"unknown benchmark {b!r}; known: {', '.join(BENCHMARKS)}")
        if not isinstance(self.data.source, str | list) or not self.data.sources or not all(isinstance(x, str) and x.strip() for x in self.data.sources):
            raise bad("data.source", f"a query source or a list of them, got {self.data.source!r}")
        if not isinstance(self.eval.options, dict) or not all(isinstance(v, dict) for v in self.eval.options.values()):
            raise bad("eval.options", "a mapping of benchmark -> {option: value}, e.g. {NAME: {max_new_tokens: 32}}")
        _check_placement(self.eval.device, self.eval.dtype, bad)
        if self.data.labeller not in LABELLERS:
            raise bad("data.labeller", f"{self.data.labeller!r}; use {', '.join(LABELLERS)}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise bad("seeds", f"a list of integers, got {self.seeds!r}")
        if self.train is not None and not Path(self.train).is_file():
            raise bad("train", f"training config {self.train!r} does not exist")
        _check_devices(self.eval.devices, bad)
        if not isinstance(self.train_overrides, dict):
            raise bad("train_overrides", "a mapping of dotted training fields to values (--set train.FIELD=VALUE)")
        for key in self.train_overrides:  # each alone, so the error names the one that is wrong
            try:
                self.training({key: self.train_overrides[key]})
            except (ValueError, TypeError, ConfigError) as e:
                raise bad(f"train.{key}", str(e)) from None
        return self

    def training(self, overrides: dict[str, Any] | None = None) -> Any:
        """The ``TrainConfig`` of ``train`` (or the paper's defaults) with ``train_overrides``
        (or ``overrides``) applied to its fields."""
        from personafuse.training.config import TrainConfig

        data: dict[str, Any] = read_mapping(self.train, "training config") if self.train else {}
        for key, value in (self.train_overrides if overrides is None else overrides).items():
            _set_dotted(data, key, value, f"train.{key}")
        return TrainConfig.from_dict(data, source=f"{self.train or 'the default training config'} with --set train.*")

    # ---- reading --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> ReproduceConfig:
        return build(cls, data, where).validate(where)

    @classmethod
    def load(cls, path: str | Path | None, sets: list[str] | None = None) -> ReproduceConfig:
        """The config in ``path`` (None: the defaults) with ``--set KEY=VALUE`` overrides applied."""
        import yaml

        where = str(path) if path else "defaults"
        data: Any = {}
        if path:
            data = read_mapping(path)
            if isinstance(data.get("train"), str):
                data["train"] = _beside(data["train"], Path(path))
        for item in sets or []:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. eval.limit=8")
            value = yaml.safe_load(raw) if raw.strip() else None
            if key.strip().startswith("train."):  # a field of the training file, not of the grid
                data.setdefault("train_overrides", {})[key.strip()[len("train."):]] = value
            else:
                _set_dotted(data, key.strip(), value, f"--set {item!r}")
        return cls.from_dict(data, where if not sets else f"{where} with --set")


def _check_placement(device: Any, dtype: Any, bad: Any) -> None:
    """eval.device / eval.dtype spelled as the commands read them (whether this machine has the
    device is the cells' and the preflight's to say: a config is often checked elsewhere)."""
    import re

    from personafuse.devices import DTYPES

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise bad("eval.device", f"{device!r}; use auto, cpu, cuda, cuda:N or mps")
    if dtype not in DTYPES:
        raise bad("eval.dtype", f"{dtype!r}; use {', '.join(DTYPES)}")


def _beside(path: str, config: Path) -> str:
    """A relative path in a config file: from the working directory if it is there, else from the
    config's folder or the nearest folder above it that has it (the presets name
    ``configs/...`` from the repository root), so a preset runs from any directory."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    for folder in config.resolve().parents:
        if (folder / path).exists():
            return str(folder / path)
    return path


def _check_devices(devices: Any, bad: Any) -> None:
    """``eval.devices`` names devices (whether this machine has them is the preflight's question)."""
    import re

    if devices == "auto":
        return
    if not isinstance(devices, list) or not devices:
        raise bad("eval.devices", f"auto or a list such as [cuda:0, cuda:1] or [cpu, cpu], got {devices!r}")
    for i, d in enumerate(devices):
        if not isinstance(d, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", d.strip().lower()):
            raise bad(f"eval.devices[{i}]", f"{d!r} is not a device; use cpu, mps, cuda or cuda:N")


def _set_dotted(data: dict[str, Any], key: str, value: Any, what: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{what}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value
