"""Config dataclasses as the one source of their options.

A field made with `option()` carries its help text, its bounds and, for settings read
from the environment, its variable's name. From that one description come:

- validation whenever an object is made (`check`), however it was made;
- the environment loop of `Settings.from_env` and `BotSettings.from_env` (`read_env`);
- the command line's options for a config (`add_options`, then `from_args`), with the
  field's default shown, so no default is written twice.

transformers' `HfArgumentParser` does the argparse half for training scripts, but it hands
a field's metadata to argparse as keyword arguments (no room for bounds or a variable
name), resolves types by rewriting the dataclass's own fields, and cannot leave a field
off the command line; the few lines here do what this project needs and no more.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, InvalidInput

Parse = Callable[[str], Any]


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    env: str | None = None,
    flags: Sequence[str] = (),
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: Sequence[Any] | None = None,
    parse: Parse | None = None,
    check: Callable[[Any], str | None] | None = None,
    cli: bool = True,
    secret: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field described once.

    `env`: the environment variable that sets it; `flags`: its command-line spelling
    (default `--field-name`); `low`/`high`: inclusive bounds, `above`/`below`
    exclusive ones; `choices`: the allowed
    values (a `Literal` type gives them too); `parse`: raw text to value, where the
    field's type does not say how; `check`: returns what was expected when a value is
    wrong; `cli=False` keeps it off the command line; `secret=True` keeps it out of the
    object's repr (so out of logs and tracebacks)."""
    metadata = {
        "help": help,
        "env": env,
        "flags": tuple(flags),
        "low": low,
        "high": high,
        "above": above,
        "below": below,
        "choices": tuple(choices) if choices is not None else None,
        "parse": parse,
        "check": check,
        "cli": cli,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(
            default_factory=default_factory, metadata=metadata, repr=not secret
        )
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


def described(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """`cls`'s fields made with `option()`, each with its resolved type."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def flags_of(field: dataclasses.Field[Any]) -> tuple[str, ...]:
    return field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)


def _base(kind: Any) -> tuple[Any, bool]:
    """`X | None` → (X, True); anything else → (it, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return kind, False


def _choices(field: dataclasses.Field[Any], kind: Any) -> tuple[Any, ...] | None:
    base, _ = _base(kind)
    if field.metadata["choices"] is not None:
        return field.metadata["choices"]
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _parser_for(field: dataclasses.Field[Any], kind: Any) -> Parse:
    if field.metadata["parse"] is not None:
        return field.metadata["parse"]
    base, _ = _base(kind)
    if typing.get_origin(base) is tuple:
        return lambda raw: tuple(p.strip() for p in raw.split(",") if p.strip())
    if base is Path:
        return lambda raw: Path(raw).expanduser()
    if base in (int, float):
        return base
    return str


def _expected(parse: Parse) -> str:
    return {int: "a whole number", float: "a number"}.get(parse, "a value")  # type: ignore[call-overload]


def check(
    obj: Any, *, name: Callable[[dataclasses.Field[Any]], str], error: type[Exception]
) -> None:
    """Raise `error("NAME: what was expected, got VALUE")` for the first field of `obj`
    out of its bounds or choices; `name` says how a field is called to the user (its
    variable, its flag)."""
    for field, kind in described(type(obj)):
        value = getattr(obj, field.name)
        base, optional = _base(kind)
        if value is None and optional:
            continue
        meta = field.metadata
        if base is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise error(f"{name(field)}: expected a whole number, got {value!r}")
        if (span := _span(meta)) is not None:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise error(f"{name(field)}: expected a number, got {value!r}")
            low, high, above, below = (meta[k] for k in ("low", "high", "above", "below"))
            if (
                (low is not None and value < low)
                or (high is not None and value > high)
                or (above is not None and value <= above)
                or (below is not None and value >= below)
            ):
                raise error(f"{name(field)}: must be {span}, got {value!r}")
        allowed = _choices(field, kind)
        if allowed is not None and value not in allowed:
            listed = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
            raise error(f"{name(field)}: expected {listed}, got {value!r}")
        if meta["check"] is not None and (expected := meta["check"](value)) is not None:
            raise error(f"{name(field)}: expected {expected}, got {value!r}")


def _span(meta: Mapping[str, Any]) -> str | None:
    """How a field's bounds read: `1..256`, `at least 1`, `above 0 and below 1`."""
    low, high, above, below = (meta[k] for k in ("low", "high", "above", "below"))
    if low is not None and high is not None:
        return f"{low:g}..{high:g}"
    parts = [
        f"{word} {bound:g}"
        for word, bound in (
            ("at least", low),
            ("at most", high),
            ("above", above),
            ("below", below),
        )
        if bound is not None
    ]
    return " and ".join(parts) or None


def check_settings(obj: Any) -> None:
    """`check` for settings read from the environment: errors name the variable."""
    check(obj, name=lambda f: f.metadata["env"] or f.name, error=ConfigError)


def check_options(obj: Any) -> None:
    """`check` for command-line configs: errors (`ValueError`, as a library user gets
    them; `from_args` turns them into `InvalidInput`) name the option."""
    check(obj, name=lambda f: flags_of(f)[0], error=ValueError)


def parse_setting(variable: str, raw: str, parse: Parse) -> Any:
    """`raw` read by `parse`; text it cannot read raises `ConfigError` naming
    `variable` and what was expected."""
    try:
        return parse(raw)
    except ValueError as exc:
        if parse in (int, float) or not str(exc):
            raise ConfigError(f"{variable}: expected {_expected(parse)}, got {raw!r}") from None
        raise ConfigError(f"{variable}: {exc}") from None


def read_env(cls: type, environ: Mapping[str, str]) -> dict[str, Any]:
    """The values the environment gives `cls`'s fields (unset or empty ones are left
    out), each parsed by its field; a value that does not parse raises `ConfigError`
    naming its variable."""
    values: dict[str, Any] = {}
    for field, kind in described(cls):
        variable = field.metadata["env"]
        raw = (environ.get(variable) or "").strip() if variable else ""
        if not raw:
            continue
        values[field.name] = parse_setting(variable, raw, _parser_for(field, kind))
    return values


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = ()) -> None:
    """One command-line option per field of `cls` (but those with `cli=False` or in
    `skip`), with its help, its type, its choices and its default shown."""
    for field, kind in described(cls):
        if not field.metadata["cli"] or field.name in skip:
            continue
        base, _ = _base(kind)
        default = (
            field.default_factory()  # type: ignore[misc]
            if field.default_factory is not dataclasses.MISSING
            else field.default
        )
        help_text = field.metadata["help"]
        if base is bool:  # a switch; one that is on by default also gets its --no-
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(
                *flags_of(field), dest=field.name, action=action, default=bool(default),
                help=help_text,
            )  # fmt: skip
            continue
        if default not in (None, (), dataclasses.MISSING):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})"
        metavar = flags_of(field)[0].lstrip("-").upper().replace("-", "_")
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text, "metavar": metavar}
        allowed = _choices(field, kind)
        if allowed is not None:
            kwargs["choices"], kwargs["metavar"] = allowed, None
        else:
            kwargs["type"] = _parser_for(field, kind)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(*flags_of(field), **kwargs)


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """`cls` made from the options `add_options` gave it (and `values`), its checks'
    errors as `InvalidInput` for the command line."""
    given = {
        f.name: getattr(args, f.name)
        for f, _ in described(cls)
        if f.metadata["cli"] and hasattr(args, f.name)
    }
    try:
        return cls(**{**given, **values})
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
