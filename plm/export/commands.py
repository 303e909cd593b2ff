"""`plm export gguf`."""
from __future__ import annotations

import argparse

from plm.export import TYPES


def _cmd_gguf(args: argparse.Namespace) -> int:
    from plm.export.gguf import export_gguf
    out = export_gguf(args.dir, args.out, args.type, progress=True)
    print(f"wrote {out} ({args.type}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint for other runtimes")
    esub = p.add_subparsers(dest="export_command", metavar="FORMAT")
    esub.required = True
    g = esub.add_parser("gguf", help="GGUF for llama.cpp (architecture plm)")
    g.add_argument("dir", help="checkpoint folder or Hugging Face hub id")
    g.add_argument("--out", required=True, help="the GGUF file to write")
    g.add_argument("--type", default="f16", choices=TYPES,
                   help="f32, f16, bf16, q8_0 and q4_0 are written directly; K-quants use llama.cpp's quantiser "
                        "(the llama extra)")
    g.set_defaults(func=_cmd_gguf)
