"""Batched generation (what ARIES sampling and held-out evaluation do), side by side with the
naive path in the same run:

* naive: every row decodes until the longest one ends (finished rows decode pads), and top-p
  sorts the whole vocabulary each step;
* ours (plm.infer.generate): finished rows leave the batch and the KV cache, and top-p looks for
  the nucleus among the NUCLEUS_CANDIDATES best tokens first.

    python benchmarks/generate_batch.py --ckpt runs/tiny/sft/final      # after make demo
    python benchmarks/generate_batch.py --ckpt DIR --n 576 --batch-size 128 --temperature 0.5

Greedy outputs must be identical between the two paths (checked); sampled ones are the same
distribution with other random draws. Prints a table and JSON (--json FILE also writes it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/tiny/sft/final", help="a chat-tuned checkpoint (make demo writes this one)")
    ap.add_argument("--n", type=int, default=576, help="prompts (arith train problems, as ARIES samples them)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    import plm.infer.generate as G
    import plm.model.generation as core  # where sample_next reads NUCLEUS_CANDIDATES
    from plm.data.chat import chat_prompt, direct_messages
    from plm.eval.config import TaskSource
    from plm.eval.tasks import load_task_pool
    from plm.data.tokenizer import Tokenizer
    from plm.model.checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").exists():
        sys.exit(f"{ckpt} is not a checkpoint: run `make demo` first, or pass --ckpt")
    model = load_model(ckpt, dtype=torch.float32, device=torch.device("cpu")).eval()
    tok = Tokenizer.from_dir(ckpt)
    tasks = load_task_pool(TaskSource(builder="arith", args={"n": args.n, "seed": 11, "skip": 5000, "difficulty": 1}))
    texts = [chat_prompt(direct_messages(t.prompt)) for t in tasks]

    def run(naive: bool, temperature: float) -> tuple[float, list[str], int]:
        saved = core.NUCLEUS_CANDIDATES
        core.NUCLEUS_CANDIDATES = tok.vocab_size if naive else saved  # naive: sort the whole vocabulary
        texts_out, tokens = [], 0
        t = time.perf_counter()
        try:
            for i in range(0, len(texts), args.batch_size):
                step = G.model_step_fn(model)
                if naive:  # a step without `select`: finished rows stay in the batch
                    step = (lambda s: (lambda ids, mask: s(ids, mask)))(step)
                cfg = G.GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=temperature,
                                         top_p=args.top_p, seed=i)
                res = G.generate(model, tok, texts[i:i + args.batch_size], cfg, step=step)
                texts_out += res.texts
                tokens += sum(len(x) for x in res.tokens)
        finally:
            core.NUCLEUS_CANDIDATES = saved
        return time.perf_counter() - t, texts_out, tokens

    rows = []
    for mode, temp in (("sampled", args.temperature), ("greedy", 0.0)):
        t_naive, out_naive, tok_naive = run(True, temp)
        t_ours, out_ours, tok_ours = run(False, temp)
        row = {"mode": mode, "temperature": temp, "naive_s": t_naive, "ours_s": t_ours,
               "speedup": t_naive / t_ours, "tokens_naive": tok_naive, "tokens_ours": tok_ours}
        if mode == "greedy":
            row["greedy_identical"] = out_naive == out_ours
        rows.append(row)
    result = {"ckpt": str(ckpt), "prompts": len(texts), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "top_p": args.top_p, "threads": torch.get_num_threads(),
              "rows": rows}
    print(f"{len(texts)} prompts, batch {args.batch_size}, up to {args.max_new_tokens} new tokens, "
          f"top-p {args.top_p}, {torch.get_num_threads()} threads, {ckpt}\n")
    print("| decoding | naive (s) | ours (s) | speed-up | tokens generated (naive / ours) | greedy identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} (T={r['temperature']}) | {r['naive_s']:.1f} | {r['ours_s']:.1f} | {r['speedup']:.2f}x "
              f"| {r['tokens_naive']} / {r['tokens_ours']} | {r.get('greedy_identical', '-')} |")
    print("\n" + json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(r.get("greedy_identical", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
