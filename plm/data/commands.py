"""`plm tokenizer qwen2|train`."""
from __future__ import annotations

import argparse



def _cmd_qwen2(args: argparse.Namespace) -> int:
    from plm.data.tokenizer import build_qwen2
    tok = build_qwen2()
    tok.save(args.out)
    print(f"wrote the Qwen2 tokenizer ({tok.vocab_size} ids) to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from plm.data.prepare import iter_text_files
    from plm.data.tokenizer import train_bpe
    tok = train_bpe(iter_text_files(args.inputs), args.vocab_size)
    tok.save(args.out)
    print(f"wrote a byte-level BPE ({tok.vocab_size} ids) to {args.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from plm.data.prepare import prepare
    from plm.data.tokenizer import Tokenizer, build_qwen2

    tok = build_qwen2() if args.tokenizer == "qwen2" else Tokenizer.from_dir(args.tokenizer)
    m = prepare(args.sources, args.out, tok, text_field=args.text_field, shard_tokens=args.shard_tokens,
                workers=args.workers, dedup=args.dedup, name=args.name, eos_id=tok.endoftext_id)
    print(f"{args.out}: {sum(s.tokens for s in m.shards):,} tokens in {len(m.shards)} shard(s), "
          f"{m.shards[-1].documents if m.shards else 0:,} documents ({m.dtype})")
    return 0


def _cmd_corpus(args: argparse.Namespace) -> int:
    from plm.data.corpus import write_embedded_corpus
    info = write_embedded_corpus(args.out, code_bytes=args.code_bytes, math_problems=args.math_problems,
                                 math_test=args.math_test, seed=args.seed)
    for k, v in info.items():
        print(f"{k:10s} {v}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare token shards; write the embedded offline corpus")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    q = dsub.add_parser("prepare", help="tokenise files/folders/JSONL/Parquet/hf:NAME into token shards")
    q.add_argument("sources", nargs="+", help="paths, globs, or hf:NAME[:CONFIG[:SPLIT]]")
    q.add_argument("--out", required=True, help="shard folder to write")
    q.add_argument("--tokenizer", required=True, help="tokenizer directory or 'qwen2'")
    q.add_argument("--text-field", default="text", help="field of JSONL/Parquet/HF records")
    q.add_argument("--name", default="data", help="shard file prefix")
    q.add_argument("--workers", type=int, default=1, help="tokenising processes")
    q.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file")
    q.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    q.set_defaults(func=_cmd_prepare)
    q = dsub.add_parser("corpus", help="write the embedded offline corpus (stdlib code, docs, math problems)")
    q.add_argument("--out", required=True, help="corpus folder to write")
    q.add_argument("--code-bytes", type=int, default=6_000_000, help="bytes of standard-library code")
    q.add_argument("--math-problems", type=int, default=20_000, help="arithmetic word problems (train split)")
    q.add_argument("--math-test", type=int, default=500, help="held-out problems (test split)")
    q.add_argument("--seed", type=int, default=0, help="seed of the problem generator")
    q.set_defaults(func=_cmd_corpus)

    p = sub.add_parser("tokenizer", help="build the Qwen2 tokenizer or train a small BPE")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    q = tsub.add_parser("qwen2", help="write PLM's exact Qwen2 tokenizer, built offline")
    q.add_argument("--out", required=True, help="tokenizer folder to write")
    q.set_defaults(func=_cmd_qwen2)
    t = tsub.add_parser("train", help="train a byte-level BPE with PLM's pre-tokenizer on local text")
    t.add_argument("inputs", nargs="+", help="text files or folders")
    t.add_argument("--vocab-size", type=int, default=8192, help="ids, including the 256 bytes and the special tokens")
    t.add_argument("--out", required=True, help="tokenizer folder to write")
    t.set_defaults(func=_cmd_train)
