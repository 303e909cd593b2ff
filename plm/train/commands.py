"""`plm pretrain` and `plm schedule plot`."""
from __future__ import annotations

import argparse

from plm.cli import add_recipe_args


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from plm.recipe import load_recipe
    from plm.train.config import PretrainRecipe
    from plm.train.pretrain import pretrain
    pretrain(load_recipe(args.recipe, PretrainRecipe, args.set), resume=not args.no_resume)
    return 0


def _cmd_schedule_plot(args: argparse.Namespace) -> int:
    from plm.errors import ConfigError
    from plm.recipe import load_recipe, parse
    from plm.train.config import PretrainRecipe, ScheduleSpec
    from plm.train.schedule import lr_at, plot_schedule

    steps = args.steps
    if args.recipe:
        from plm.data.mixture import MixturePhase
        recipe = load_recipe(args.recipe, PretrainRecipe, args.set)
        if not 0 <= args.phase < len(recipe.phases):
            raise ConfigError(f"--phase {args.phase}: the recipe has phases 0..{len(recipe.phases) - 1}")
        phase = recipe.phases[args.phase]
        spec = phase.schedule
        if steps is None:  # the phase's own length, on one process
            t = recipe.train
            steps = MixturePhase(phase.name, {k: ("", w) for k, w in phase.mixture.items()},
                                 phase.tokens).steps(t.seq_len, t.micro_batch_size * t.grad_accum)
    else:
        spec = parse(ScheduleSpec, {"kind": args.kind, "peak_lr": args.peak_lr, "floor_lr": args.floor_lr,
                                    "warmup": args.warmup, "stable": args.stable, "decay": args.decay,
                                    "decay_shape": args.shape}, "schedule")
    steps = steps or 1000
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    try:
        cfg = spec.build(steps)
    except ConfigError as e:
        raise ConfigError(f"schedule.{e}") from None
    plot_schedule(cfg, args.out, steps)
    W, S, D, shape = cfg.phases()
    print(f"wrote {args.out}: {cfg.kind} warmup {W}, stable {S}, decay {D} ({shape}), "
          f"lr at end {lr_at(cfg, steps - 1):.3g}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain from a recipe (works under torchrun)")
    add_recipe_args(p, "recipes/tiny/pretrain.yaml")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("schedule", help="learning-rate schedules")
    ssub = p.add_subparsers(dest="schedule_command", metavar="ACTION")
    ssub.required = True
    q = ssub.add_parser("plot", help="plot a schedule to PNG")
    q.add_argument("--out", required=True, help="the PNG to write")
    q.add_argument("--steps", type=int, default=None, help="steps to plot (default: the recipe phase's steps, else 1000)")
    q.add_argument("--recipe", help="take the schedule of a recipe phase")
    q.add_argument("--phase", type=int, default=0, help="which phase of --recipe (0 = the first)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe setting (repeatable)")
    q.add_argument("--kind", default="wsdc", choices=["wsdc", "wsd", "cosine"], help="schedule kind (without --recipe)")
    q.add_argument("--peak-lr", type=float, default=3e-4, help="learning rate after warmup")
    q.add_argument("--floor-lr", type=float, default=3e-5, help="learning rate after the decay")
    q.add_argument("--warmup", type=float, default=0.05, help="steps, or a fraction if < 1")
    q.add_argument("--stable", type=float, default=0.6, help="steps, or a fraction if < 1")
    q.add_argument("--decay", type=float, default=0.25, help="steps, or a fraction if < 1")
    q.add_argument("--shape", default="1-sqrt", choices=["linear", "cosine", "1-sqrt", "exp"], help="decay shape")
    q.set_defaults(func=_cmd_schedule_plot)
