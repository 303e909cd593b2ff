"""`plm sft` and `plm aries`."""
from __future__ import annotations

import argparse

from plm.recipe import load_recipe


def _cmd_sft(args: argparse.Namespace) -> int:
    from plm.align.sft import sft
    sft(load_recipe(args.recipe, args.set), resume=not args.no_resume)
    return 0


def _cmd_aries(args: argparse.Namespace) -> int:
    from plm.align.aries import aries
    aries(load_recipe(args.recipe, args.set), resume=not args.no_resume)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning in phases from a recipe (works under torchrun)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/sft.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. train.micro_batch_size=4 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("aries", help="ARIES self-refinement preference learning from a recipe")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/aries.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. aries.lambda=0 (the DPO baseline) (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="start over, ignoring finished iterations")
    p.set_defaults(func=_cmd_aries)
