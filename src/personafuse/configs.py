"""One config mechanism for every config: pydantic dataclasses, one file reader and one loader.

Each config is a ``@config_class`` (a pydantic dataclass: ``dataclasses.fields``, ``replace`` and
``asdict`` keep working, and the fields' types are checked on construction). :func:`build` turns a
mapping read by :func:`read_mapping` into one, filling a nested section's missing keys from that
field's own default (``warmup: {steps: 5}`` keeps the warm-up's batch size), and reports every
mistake as a :class:`ConfigError` naming the file and the field's dotted path.

The CLI commands that expose config fields take their defaults (and help, where the field carries
it) from the class with :func:`default` and :func:`option`, so each default is written once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")

# Unknown keys are errors (a typo must not silently fall back to a default).
CONFIG = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A bad config; the message names the file (or source) and the field's dotted path."""


def config_class(cls: type[T] | None = None, /, **kwargs: Any) -> Any:
    """``@config_class`` (or ``@config_class(frozen=True)``): a pydantic dataclass that forbids
    unknown fields."""

    def wrap(c: type[T]) -> type[T]:
        return _pydantic_dataclass(c, config=CONFIG, **kwargs)  # type: ignore[return-value]

    return wrap(cls) if cls is not None else wrap


def read_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML or JSON file's top-level mapping; a missing file, bad syntax (with its line) or a
    non-mapping is a :class:`ConfigError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such {what} file")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":  # json's own errors give the line of a JSON file
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: line {e.lineno}: invalid JSON ({e.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}  # JSON is YAML too
        except yaml.YAMLError as e:  # carries the line and column
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def build(cls: type[T], data: Any, source: str = "config") -> T:
    """``cls`` from a mapping, nested sections merged onto their fields' defaults; any mistake is
    a :class:`ConfigError` ``"SOURCE: dotted.field: what is wrong"``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    try:
        return TypeAdapter(cls).validate_python(_with_defaults(cls, dict(data)))
    except ValidationError as e:
        raise ConfigError(describe(e, cls, source)) from None


def describe(error: ValidationError, cls: type, source: str) -> str:
    """The first error of ``error`` as ``"SOURCE: field.path: message"`` (unknown fields list the
    known ones)."""
    err = error.errors()[0]
    loc = tuple(err["loc"])
    where = f"{source}: {dotted(loc)}: " if loc else f"{source}: "
    if err["type"] == "unexpected_keyword_argument":
        known = ", ".join(f.name for f in dataclasses.fields(_class_at(cls, loc[:-1])))
        return f"{where}unknown field {loc[-1]!r}; known: {known}"
    ctx_error = (err.get("ctx") or {}).get("error")
    return where + (str(ctx_error) if isinstance(ctx_error, Exception) else err["msg"])


def config_message(error: Exception) -> str:
    """A config constructor's error in one line (a pydantic error as ``field: message``)."""
    if not isinstance(error, ValidationError):
        return str(error)
    err = error.errors()[0]
    ctx_error = (err.get("ctx") or {}).get("error")
    msg = str(ctx_error) if isinstance(ctx_error, Exception) else err["msg"]
    return f"{dotted(tuple(err['loc']))}: {msg}" if err["loc"] else msg


def dotted(loc: tuple[Any, ...]) -> str:
    """``("eval", "benchmarks", 1)`` -> ``eval.benchmarks[1]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _class_at(cls: type, loc: tuple[Any, ...]) -> type:
    for part in loc:
        sub = _nested(cls).get(part) if isinstance(part, str) else None
        if sub is None:
            return cls
        cls = sub
    return cls


def _nested(cls: type) -> dict[str, type]:
    """The fields of ``cls`` that are config sections themselves (by their default's class)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = _field_default(f)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = type(value)
    return out


def _with_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each nested section's missing keys taken from that field's default."""
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        default = _field_default(f) if isinstance(value, Mapping) else None
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            base = {k.name: getattr(default, k.name) for k in dataclasses.fields(default)}
            data[f.name] = _with_defaults(type(default), {**base, **value})  # type: ignore[dict-item]
    return data


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return getattr(f.default, "default", f.default)  # a pydantic Field(...) holds it inside
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def field_of(cls: type, name: str) -> dataclasses.Field[Any]:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the (pydantic or plain) dataclass ``cls``."""
    value = _field_default(field_of(cls, name))
    if value is dataclasses.MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    return value


def option(cls: type, name: str, *decls: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` for a command parameter that sets field ``name`` of ``cls``: its help is
    the field's ``metadata["help"]`` unless given here."""
    import typer

    help_text = field_of(cls, name).metadata.get("help")
    if help_text is not None:
        kwargs.setdefault("help", help_text)
    return typer.Option(*decls, **kwargs)


def help_field(default_value: Any = dataclasses.MISSING, help: str = "", *,
               factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field carrying its CLI help: ``max_batch: int = help_field(16, "Most ...")``."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default_value, metadata={"help": help})
