"""`plm export gguf`."""
from __future__ import annotations

import argparse

from plm.export import TYPES


def _cmd_gguf(args: argparse.Namespace) -> int:
    from plm.export.gguf import export_gguf
    out = export_gguf(args.dir, args.out, args.type, progress=True)
    print(f"wrote {out} ({args.type}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0


# the edge runtime's int8/int4 are llama.cpp's Q8_0/Q4_0 blocks on the native kernels
QUANTIZE_TYPES = {"int8": "q8_0", "int4": "q4_0", "q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "q4_k_m",
                  "q5_k_m": "q5_k_m", "q6_k": "q6_k"}


def _cmd_quantize(args: argparse.Namespace) -> int:
    from plm.export.gguf import export_gguf
    qtype = QUANTIZE_TYPES[args.type]
    out = export_gguf(args.dir, args.out, qtype, progress=True)
    print(f"wrote {out} ({qtype}, {out.stat().st_size / 1e6:.1f} MB): `plm generate {out}` runs it on the native "
          "kernels without quantising again; llama.cpp runs it as it is")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="write a quantised model once (a GGUF the edge runtime and llama.cpp load "
                                        "as they are)")
    q.add_argument("dir", help="checkpoint folder or Hugging Face hub id")
    q.add_argument("--type", required=True, choices=list(QUANTIZE_TYPES),
                   help="int8 = q8_0 and int4 = q4_0 (the edge runtime's native blocks, written without llama.cpp); "
                        "K-quants use llama.cpp's quantiser (the llama extra)")
    q.add_argument("--out", required=True, help="the GGUF file to write")
    q.set_defaults(func=_cmd_quantize)
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
