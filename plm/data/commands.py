"""`plm tokenizer qwen2|train`."""
from __future__ import annotations

import argparse
from pathlib import Path

from plm.errors import PLMError


def iter_text_files(paths: list[str], exts: tuple[str, ...] = (".txt", ".md", ".py", ".rst", ".json", ".jsonl")):
    for p in map(Path, paths):
        if not p.exists():
            raise PLMError(f"{p}: no such file or directory")
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in exts) if p.is_dir() else [p]
        for f in files:
            try:
                yield f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise PLMError(f"{f}: cannot read as UTF-8 text ({e})") from None


def _cmd_qwen2(args: argparse.Namespace) -> int:
    from plm.data.tokenizer import build_qwen2
    tok = build_qwen2()
    tok.save(args.out)
    print(f"wrote the Qwen2 tokenizer ({tok.vocab_size} ids) to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from plm.data.tokenizer import train_bpe
    tok = train_bpe(iter_text_files(args.inputs), args.vocab_size)
    tok.save(args.out)
    print(f"wrote a byte-level BPE ({tok.vocab_size} ids) to {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="build the Qwen2 tokenizer or train a small BPE")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    q = tsub.add_parser("qwen2", help="write PLM's exact Qwen2 tokenizer, built offline")
    q.add_argument("--out", required=True)
    q.set_defaults(func=_cmd_qwen2)
    t = tsub.add_parser("train", help="train a byte-level BPE with PLM's pre-tokenizer on local text")
    t.add_argument("inputs", nargs="+", help="text files or folders")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_cmd_train)
