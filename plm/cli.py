"""The `plm` command. Each area registers its own subcommands through `add_commands(sub)`.

User mistakes raise `plm.errors.PLMError`; they are printed as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands; each defines add_commands(subparsers).
COMMAND_MODULES = [
    "plm.model.commands",
    "plm.data.commands",
    "plm.infer.commands",
    "plm.export.commands",
    "plm.train.commands",
    "plm.align.commands",
    "plm.eval.commands",
    "plm.pipeline.commands",
    "plm.serve.commands",
]


def build_parser() -> argparse.ArgumentParser:
    from plm import __version__
    parser = argparse.ArgumentParser(prog="plm", description="PLM: the Peripheral Language Model toolkit")
    parser.add_argument("--version", action="version", version=f"plm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # area not built yet
                continue
            raise
        mod.add_commands(sub)
    _conventions(parser)
    return parser


def _conventions(parser: argparse.ArgumentParser) -> None:
    """Every command shows its defaults in --help and says what it does (its one-line help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.formatter_class is argparse.HelpFormatter:
                    sub.formatter_class = argparse.ArgumentDefaultsHelpFormatter
                if not sub.description and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                _conventions(sub)


def add_recipe_args(p: argparse.ArgumentParser, example: str, resume_help: str = "ignore existing checkpoints") -> None:
    """The arguments every recipe-driven command shares: RECIPE, --set, --no-resume."""
    p.add_argument("recipe", help=f"recipe YAML, e.g. {example}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. train.micro_batch_size=4 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help=resume_help)


def main(argv: list[str] | None = None) -> int:
    from plm.errors import PLMError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except PLMError as e:
        print(f"plm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # missing, unreadable, a folder where a file was meant, no space left, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"plm {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
