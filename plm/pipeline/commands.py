"""`plm pipeline` and `plm demo`."""
from __future__ import annotations

import argparse


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from plm.pipeline.run import run
    run(args.recipe, args.set, args.from_stage)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from plm.pipeline.run import run
    run("recipes/tiny")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run the whole pipeline (resumable stages) and write a report")
    p.add_argument("recipe", help="a pipeline recipe directory (e.g. recipes/tiny) or YAML file")
    p.add_argument("--from", dest="from_stage", default=None, help="rerun from this stage on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline setting, e.g. vars.run=runs/mine (repeatable)")
    p.set_defaults(func=_cmd_pipeline)
    p = sub.add_parser("demo", help="the main job on the embedded default: plm pipeline recipes/tiny")
    p.set_defaults(func=_cmd_demo)
