"""`plm demo`: the main job on the embedded default, offline."""
from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from plm.cli import main as cli

    out = Path(args.out)
    ckpt = out / "plm-micro-random"
    print(f"== plm init --preset plm-micro --out {ckpt}")
    rc = cli(["init", "--preset", "plm-micro", "--out", str(ckpt), "--seed", "0"])
    print(f"\n== plm info {ckpt}")
    rc = rc or cli(["info", str(ckpt)])
    print(f"\n== plm generate {ckpt} --prompt 'The Peripheral Language Model' --max-new-tokens 24")
    rc = rc or cli(["generate", str(ckpt), "--prompt", "The Peripheral Language Model",
                    "--max-new-tokens", "24", "--temperature", "0.8", "--top-p", "0.95", "--seed", "0"])
    print("\n(random weights: the text is noise until the model is trained)")
    return rc


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default (offline)")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=_cmd_demo)
