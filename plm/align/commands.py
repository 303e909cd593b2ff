"""`plm sft` and `plm aries`."""
from __future__ import annotations

import argparse

from plm.cli import add_recipe_args


def _cmd_sft(args: argparse.Namespace) -> int:
    from plm.align.config import SFTRecipe
    from plm.align.sft import sft
    from plm.recipe import load_recipe
    sft(load_recipe(args.recipe, SFTRecipe, args.set), resume=not args.no_resume)
    return 0


def _cmd_aries(args: argparse.Namespace) -> int:
    from plm.align.aries import aries
    from plm.align.config import AriesRecipe
    from plm.recipe import load_recipe
    aries(load_recipe(args.recipe, AriesRecipe, args.set), resume=not args.no_resume)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning in phases from a recipe (works under torchrun)")
    add_recipe_args(p, "recipes/tiny/sft.yaml")
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("aries", help="ARIES self-refinement preference learning from a recipe "
                                     "(--set aries.lambda=0 gives the DPO baseline)")
    add_recipe_args(p, "recipes/tiny/aries.yaml", "start over, ignoring finished iterations")
    p.set_defaults(func=_cmd_aries)
