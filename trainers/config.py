"""One mechanism for every trainer config (student, teacher, masked-LM pretraining).

A config is a plain dataclass: its fields carry their types and defaults, and ``Rules``
declares the constraints beyond types once. ``check`` reports every problem of a config in
one ConfigError; ``make`` builds a config from a preset's values and overrides, naming
unknown keys too; ``parse_set`` is the one parser of ``--set key=value``; ``cli_options``
turns the fields into command-line options, so no command declares them by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import typer

from kdstore.errors import ConfigError


class ConfigProblems(ConfigError):
    """A config with one or more invalid values; ``problems`` lists them (``field: ...``)."""

    def __init__(self, cls_name: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{cls_name}: {'; '.join(problems)}")


@dataclass(frozen=True)
class Rules:
    """Constraints on a config's fields beyond their types. None values pass the bounds; a
    tuple value meets a bound when each of its items does."""

    choices: dict[str, tuple | Callable[[], tuple]] = field(default_factory=dict)  # a callable: looked up when checked
    positive: tuple[str, ...] = ()  # > 0
    non_negative: tuple[str, ...] = ()  # >= 0
    fraction: tuple[str, ...] = ()  # in [0, 1)
    probability: tuple[str, ...] = ()  # in (0, 1)
    minimum: dict[str, float] = field(default_factory=dict)  # >= the given value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_ok(value: Any, hint: Any) -> bool:
    if _is_union(hint):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:  # temperature=10 is a fine float
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return hint.__name__


def problems(cfg: Any, rules: Rules) -> list[str]:
    """Every way ``cfg`` breaks its field types or ``rules``, as ``field: expected ..., got ...``."""
    hints = typing.get_type_hints(type(cfg))
    out, mistyped = [], set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            out.append(f"{f.name}: expected {_type_name(hints[f.name])}, got {value!r}")
            mistyped.add(f.name)
    for name, options in rules.choices.items():
        options = options() if callable(options) else options
        if name not in mistyped and getattr(cfg, name) not in options:
            out.append(f"{name}: expected one of {', '.join(map(str, options))}, got {getattr(cfg, name)!r}")
    bounds = [(rules.positive, lambda v: v > 0, "> 0"), (rules.non_negative, lambda v: v >= 0, ">= 0"),
              (rules.fraction, lambda v: 0 <= v < 1, "in [0, 1)"), (rules.probability, lambda v: 0 < v < 1, "in (0, 1)"),
              *(((name,), lambda v, low=low: v >= low, f">= {low:g}") for name, low in rules.minimum.items())]
    for names, ok, text in bounds:
        for name in names:
            value = getattr(cfg, name)
            if name in mistyped or value is None:
                continue
            if not all(ok(v) for v in (value if isinstance(value, tuple) else (value,))):
                out.append(f"{name}: expected {text}" + (" each" if isinstance(value, tuple) else "") + f", got {value!r}")
    return out


def check(cfg: Any, rules: Rules, relations: Callable[[Any], Iterable[str]] | None = None) -> None:
    """Raise one ConfigProblems naming every problem of ``cfg``: types, ``rules``, then
    ``relations(cfg)`` (checks between fields, run only when every field has a valid value)."""
    found = problems(cfg, rules)
    if not found and relations is not None:
        found = list(relations(cfg))
    if found:
        raise ConfigProblems(type(cfg).__name__, found)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, hint: Any) -> Any:
    """JSON's lists as the tuples a tuple field holds."""
    tuple_hint = next((h for h in (typing.get_args(hint) if _is_union(hint) else (hint,))
                       if typing.get_origin(h) is tuple), None)
    return tuple(value) if tuple_hint is not None and isinstance(value, list) else value


def make(cls: type, *layers: dict[str, Any]) -> Any:
    """``cls`` from its defaults overlaid by each dict of ``layers`` in turn (a preset, then
    overrides); one ConfigProblems names unknown keys and every invalid value at once."""
    names, hints = set(field_names(cls)), typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for layer in layers:
        for key, value in layer.items():
            if key not in names:
                unknown.append(key)
            else:
                values[key] = _coerce(value, hints[key])
    found = [f"{key}: unknown option (known: {', '.join(sorted(names))})" for key in sorted(set(unknown))]
    try:
        cfg = cls(**values)
    except ConfigProblems as e:
        found += e.problems
    if found:
        raise ConfigProblems(cls.__name__, found)
    return cfg


def _parse_value(text: str, hint: Any) -> Any:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    for h in options:
        if h is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if h is int and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if h is float:
            try:
                return float(text)
            except ValueError:
                pass
        if typing.get_origin(h) is tuple:
            parts = [p for p in text.strip("[]()").replace(" ", "").split(",") if p]
            item = typing.get_args(h)[0]
            try:
                return tuple(_parse_value(p, item) for p in parts)
            except ValueError:
                pass
        if h is str:
            return text
    raise ValueError(f"expected {_type_name(hint)}, got {text!r}")


def parse_set(cls: type, pairs: Iterable[str]) -> dict[str, Any]:
    """``--set key=value`` pairs as typed values of ``cls``'s fields (numbers, true/false,
    none, comma-separated lists); one ConfigProblems names every bad pair."""
    hints, out, found = typing.get_type_hints(cls), {}, []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            found.append(f"--set {pair!r}: expected key=value")
        elif key not in hints:
            found.append(f"{key}: unknown option (known: {', '.join(field_names(cls))})")
        else:
            try:
                out[key] = _parse_value(text.strip(), hints[key])
            except ValueError as e:
                found.append(f"{key}: {e}")
    if found:
        raise ConfigProblems(cls.__name__, found)
    return out


def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the class source: the one place a field is described."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.+)$", source, flags=re.M)
    return {name: text.strip() for name, text in found}


def _render(value: Any) -> str:
    """``value`` as ``--set`` and the generated options read it."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "()"
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _cli_type(hint: Any) -> type:
    options = [h for h in (typing.get_args(hint) if _is_union(hint) else (hint,)) if h is not type(None)]
    if len(options) == 1 and options[0] in (int, float, bool, str):
        return options[0]
    return str  # tuples and mixed unions arrive as text and go through _parse_value


def cli_options(cls: type, rules: Rules | None = None, skip: Iterable[str] = (), flags: dict[str, str] | None = None,
                preset: bool = True) -> Callable[[Callable], Callable]:
    """Decorator for a typer command: one ``--field-name`` option per field of ``cls`` (except
    ``skip`` and the command's own parameters), its help the field's comment and the fixed
    choices of ``rules``; the options given reach the command as one ``options: dict`` of typed
    values, an option not given is absent (it hides no ``--set`` value). ``flags`` names a
    field's option otherwise (``{"multi_task": "--multi-task/--single-task"}``). An option not
    given means the preset's value, or with ``preset=False`` the field's default, shown in the help."""
    hints, helps, flags = typing.get_type_hints(cls), field_help(cls), flags or {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    panel = f"{cls.__name__} (default: the preset's)" if preset else f"{cls.__name__}"

    def decorate(command: Callable) -> Callable:
        sig = inspect.signature(command, eval_str=True)  # annotations resolved in the command's module
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != "options"]
        taken = {p.name for p in own} | set(skip)
        added = []
        for name in field_names(cls):
            if name in taken:
                continue
            kind = _cli_type(hints[name])
            flag = "--" + name.replace("_", "-")
            decls = [flags.get(name) or (f"{flag}/--no-{name.replace('_', '-')}" if kind is bool else flag)]
            options = (rules.choices if rules else {}).get(name)
            choices = f"one of {', '.join(map(str, options))}" if isinstance(options, tuple) else ""
            default = "" if preset or defaults[name] is dataclasses.MISSING else f"default {_render(defaults[name])}"
            text = "; ".join(filter(None, (helps.get(name), choices, default))) or f"{cls.__name__}.{name}"
            info = typer.Option(None, *decls, help=text, rich_help_panel=panel)
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                           annotation=Optional[kind]))

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {p.name: kwargs.pop(p.name) for p in added}
            options = {}
            for name, value in given.items():
                if value is None:
                    continue
                try:
                    options[name] = _parse_value(value, hints[name]) if isinstance(value, str) and hints[name] is not str else value
                except ValueError as e:
                    raise ConfigProblems(cls.__name__, [f"{name}: {e}"]) from None
            return command(**kwargs, options=options)

        params = [*own, *added]
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the new signature, not the command's
        return wrapper

    return decorate
