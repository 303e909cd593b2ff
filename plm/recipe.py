"""Recipes: YAML files of settings, with `--set a.b=value` overrides from the command line."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml

from plm.errors import ConfigError


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; name the YAML file inside it")
    if not path.exists():
        raise ConfigError(f"{path}: recipe not found")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of settings")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.micro_batch_size=4")
        set_dotted(recipe, key, parse_value(value))
    recipe = interpolate(recipe, recipe.get("vars") or {}, str(path))
    recipe.setdefault("_path", str(path))
    return recipe


_EXP_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(text: str) -> Any:
    """A --set value as YAML, except that "2e-4" is a number: YAML 1.1 (PyYAML) needs "2.0e-4",
    and a learning rate silently read as a string only fails later, far from its cause."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _EXP_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


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


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        if p.isdigit() and isinstance(d, list):
            d = d[int(p)]
            continue
        d = d.setdefault(p, {})
        if not isinstance(d, (dict, list)):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    last = parts[-1]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


def section(recipe: dict, name: str, required: bool = True) -> Any:
    if name not in recipe:
        if required:
            raise ConfigError(f"{recipe.get('_path', 'recipe')}: missing section {name!r}")
        return {}
    return recipe[name]


def add_recipe_args(p: argparse.ArgumentParser, example: str, resume_help: str = "ignore existing checkpoints") -> None:
    """The arguments every recipe-driven command shares: RECIPE, --set, --no-resume."""
    p.add_argument("recipe", help=f"recipe YAML, e.g. {example}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. train.micro_batch_size=4 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help=resume_help)
