"""Recipes: YAML files of settings parsed once, strictly, into typed dataclasses.

`load_recipe(path, cls, overrides)` reads the YAML, applies `--set a.b=value` overrides,
replaces `${name}` with the recipe's `vars:`, and builds `cls` (a dataclass whose fields are
the sections) with `parse`. Every value is checked against its field's type, unknown keys are
errors at any depth, and every error names the dotted path of the setting
(`phases[1].schedule.warmup`), the value, and the file. The section dataclasses live beside the
code that owns them (`plm.train.config`, `plm.align.config`, `plm.pipeline.config`); this module
imports nothing heavy.

Conventions for section dataclasses:
* `validate()` (called from `__post_init__`) raises `ConfigError("field: what is wrong")`;
  `parse` prefixes the section's path.
* A field with `metadata={"rest": True}` (a dict) collects the keys the class does not name,
  for sections whose keys depend on another setting (e.g. a data builder's own arguments);
  the class's `validate()` checks them.
* A field with `metadata={"alias": "lambda"}` is written under that name in YAML.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from plm.errors import ConfigError

T = TypeVar("T")


# ---- reading ----------------------------------------------------------------------------
PACKAGED = Path(__file__).resolve().parent / "recipes"  # recipes/ of the repository, shipped in the wheel


def find_recipe(path: str | Path) -> Path:
    """A recipe path as given; failing that, the same path among the recipes shipped with the
    package ("recipes/tiny/sft.yaml", or "tiny/sft.yaml"), so commands work from any folder."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    rel = p.relative_to("recipes") if p.parts[:1] == ("recipes",) else p
    packaged = PACKAGED / rel
    return packaged if packaged.exists() else p


def packaged_recipes() -> list[str]:
    return sorted(str(f.relative_to(PACKAGED)) for f in PACKAGED.rglob("*.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = find_recipe(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; name the YAML file inside it")
    if not path.exists():
        raise ConfigError(f"{path}: recipe not found (shipped recipes: {', '.join(packaged_recipes())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of settings")
    return data


def load_recipe(path: str | Path, cls: type[T], overrides: list[str] | None = None) -> T:
    """Read, override, interpolate and parse a recipe file into `cls`."""
    path = find_recipe(path)
    raw = read_yaml(path)
    try:
        apply_overrides(raw, overrides or [])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    raw = interpolate(raw, raw.get("vars") or {}, str(path))  # its errors name the file
    try:
        recipe = parse(cls, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if hasattr(recipe, "source"):
        recipe.source = str(path)
    return recipe


_EXP_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(text: str) -> Any:
    """A --set value as YAML, except that "2e-4" is a number: YAML 1.1 (PyYAML) needs "2.0e-4",
    and a learning rate silently read as a string only fails later, far from its cause."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read {text!r} as a value ({e})") from None
    if isinstance(value, str) and _EXP_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """`--set a.b=value` / `--set phases.1.tokens=5` on the raw tree (parse then checks keys and types)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.micro_batch_size=4")
        set_dotted(raw, key, parse_value(value), f"--set {key}")


def set_dotted(d: Any, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(d, list):
            if not p.isdigit() or int(p) >= len(d):
                raise ConfigError(f"{where}: {'.'.join(parts[:i]) or 'the recipe'} is a list of {len(d)}; "
                                  f"{p!r} is not an index in 0..{len(d) - 1}")
            if last:
                d[int(p)] = value
            else:
                d = d[int(p)]
        elif isinstance(d, dict):
            if last:
                d[p] = value
            else:
                if d.get(p) is None:
                    d[p] = {}
                d = d[p]
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value ({d!r}), not a section")


_VAR = re.compile(r"\$\{(\w+)\}")


def interpolate(node: Any, variables: dict, where: str = "recipe") -> Any:
    """Replace ${name} in every string with the recipe's `vars: {name: ...}`, so one setting
    (e.g. `vars.run`, the run folder) relocates every path built from it."""
    if isinstance(node, dict):
        return {k: (v if k == "vars" else interpolate(v, variables, where)) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, variables, where) for v in node]
    if isinstance(node, str):
        def sub(m: re.Match) -> str:
            if m.group(1) not in variables:
                raise ConfigError(f"{where}: ${{{m.group(1)}}} is not defined under 'vars:' "
                                  f"(defined: {', '.join(sorted(variables)) or 'none'})")
            return str(variables[m.group(1)])
        return _VAR.sub(sub, node)
    return node


# ---- typed parsing ------------------------------------------------------------------------
def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_FLOAT_TEXT = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false", dict: "a mapping",
             list: "a list"}
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def parse(tp: Any, value: Any, where: str) -> Any:
    """`value` (from YAML) as type `tp`, strictly; ConfigError names `where` on any mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        shaped = [o for o in options if _same_shape(o, value)]
        if len(shaped) == 1:  # the value's shape picks the option: its own error is the clearest
            return parse(shaped[0], value, where)
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return parse(opt, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, "
                          f"got {_show(value)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}; got {_show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        out = [parse(item, v, _join(where, i)) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): parse(vt, v, _join(where, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 3e-4 as text
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {_show(value)}")
        return value
    raise TypeError(f"recipe field type {tp!r} is not supported ({where})")


def _same_shape(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or origin is dict
    if isinstance(value, list):
        return origin in (list, tuple)
    if isinstance(value, str):
        return tp is str or origin is typing.Literal
    return False


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def field_names(cls: type) -> dict[str, str]:
    """YAML key -> field name of a section dataclass (aliases applied, internal fields left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("rest") or f.metadata.get("internal"):
            continue
        out[f.metadata.get("alias", f.name)] = f.name
    return out


def unknown_key_error(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    section = f"{where}: " if where else ""
    return ConfigError(f"{section}unknown setting {key!r}{hint} (known: {', '.join(sorted(known))})")


def _parse_dataclass(cls: type, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping of settings, got {_show(value)}")
    names = field_names(cls)
    rest_field = next((f.name for f in dataclasses.fields(cls) if f.metadata.get("rest")), None)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, v in value.items():
        key = str(key)
        if key in names:
            kwargs[names[key]] = parse(hints[names[key]], v, _join(where, key))
        elif rest_field is not None:
            rest[key] = v
        else:
            raise unknown_key_error(where, key, list(names))
    if rest_field is not None:
        kwargs[rest_field] = rest
    missing = [k for k, n in names.items() if n not in kwargs and _required(cls, n)]
    if missing:
        raise ConfigError(f"{_join(where, missing[0])}: required setting missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{_join(where, str(e))}" if where else str(e)) from None


def _required(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def to_dict(obj: Any) -> Any:
    """A parsed section back to plain YAML-able data (aliases restored, rest keys merged)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            v = getattr(obj, f.name)
            if f.metadata.get("rest"):
                out.update({k: to_dict(x) for k, x in v.items()})
            else:
                out[f.metadata.get("alias", f.name)] = to_dict(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---- the parts every recipe has -------------------------------------------------------------
@dataclasses.dataclass
class RecipeBase:
    """name, vars, run_dir, seed: the header of every stage recipe."""

    name: str = "run"
    vars: dict[str, Any] = dataclasses.field(default_factory=dict)  # ${name} substitutions
    run_dir: str | None = None  # default runs/<name>
    seed: int = 0
    source: str = dataclasses.field(default="", metadata={"internal": True})  # the YAML file, once loaded

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


def check(condition: bool, message: str) -> None:
    """In a section's validate(): raise ConfigError("field: message") unless condition holds."""
    if not condition:
        raise ConfigError(message)
