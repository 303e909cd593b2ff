"""`plm export gguf`."""
from __future__ import annotations

import argparse

from plm.export.gguf import TYPES, export_gguf


def _cmd_gguf(args: argparse.Namespace) -> int:
    out = export_gguf(args.dir, args.out, args.type)
    print(f"wrote {out} ({args.type})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint for other runtimes")
    esub = p.add_subparsers(dest="export_command", metavar="FORMAT")
    esub.required = True
    g = esub.add_parser("gguf", help="GGUF for llama.cpp (architecture plm)")
    g.add_argument("dir")
    g.add_argument("--out", required=True)
    g.add_argument("--type", default="f16", choices=TYPES)
    g.set_defaults(func=_cmd_gguf)
