"""What a streamed reply costs the server per token beside the model, side by side in one run:

* text, whole: decode every token of the reply so far at each new token (what streaming did
  before `IncrementalText`: `plm serve`'s scheduler, `plm generate`'s stream, stop-string checks);
  text, incremental: `plm.model.generation.IncrementalText`, which decodes a few tokens per call;
* penalties, dense: the repetition / presence / frequency penalties from [V] masks rebuilt over
  the prompt and the whole reply at each token (what `plm serve` did before `SequencePenalties`);
  penalties, incremental: `plm.model.generation.SequencePenalties`, which records each token once
  and adjusts only the distinct ids seen.

The reply is English, German, Japanese and emoji prose in the Qwen2 tokenizer (151,646 tokens,
151,936 logits), so some tokens end inside a UTF-8 character, as in real replies. Each pair must
agree at every length (checked: the same text, the same logits bit for bit). No model: the cost
depends only on the tokens.

    python benchmarks/stream_overhead.py              # prints a table, writes runs/bench-stream-overhead/
    python benchmarks/stream_overhead.py --lengths 256,4096 --prompt 2000 --repeats 5 --out DIR
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROSE = ("The Peripheral Language Model runs on small devices; Größe und Geschwindigkeit zählen. "
         "名前は小さなモデルです。 🫠🪿 Its latent cache keeps 576 values per token and layer.\n")


VOCAB = 151936  # PLM's logits (the Qwen2 vocabulary padded)
PENALTIES = dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)


def _dense_penalties(cfg, prompt: list[int]):
    """The rule before SequencePenalties: [V] masks rebuilt from prompt and reply each token."""
    import torch

    from plm.model.generation import penalize

    def adjust(logits, reply: list[int]):
        seen = torch.zeros(1, VOCAB, dtype=torch.bool)
        seen[0, torch.tensor(prompt + reply, dtype=torch.long)] = True
        counts = torch.bincount(torch.tensor(reply, dtype=torch.long), minlength=VOCAB)[None]
        return penalize(logits, cfg, seen, counts)
    return adjust


def _paths(tok, kind: str, prompt: list[int]) -> tuple[Callable, Callable]:
    """(before, incremental): each called with the reply so far after every token."""
    from plm.model.generation import GenerationConfig, IncrementalText, SequencePenalties
    if kind == "text":
        return tok.decode, IncrementalText(tok.decode)
    cfg = GenerationConfig(**PENALTIES)
    logits = _logits()
    dense, pen = _dense_penalties(cfg, prompt), SequencePenalties(cfg, prompt)
    return (lambda reply: dense(logits, reply)), (lambda reply: pen(logits, reply))


def _logits():
    import torch
    return torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))


def _per_token(fn: Callable, ids: list[int]) -> float:
    """Seconds to handle each token of `ids` as the reply grows, summed over the reply."""
    reply: list[int] = []
    t0 = time.perf_counter()
    for t in ids:  # the reply grows by a token, as in the server's scheduler
        reply.append(t)
        fn(reply)
    return time.perf_counter() - t0


def _agree(tok, kind: str, prompt: list[int], ids: list[int]) -> bool:
    before, inc = _paths(tok, kind, prompt)
    every = 1 if kind == "text" else 61  # the dense penalties cost milliseconds a call
    for n in sorted({*range(1, len(ids) + 1, every), len(ids)}):
        a, b = before(ids[:n]), inc(ids[:n])
        if not (a == b if kind == "text" else bool((a == b).all())):
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,1024,4096", help="reply lengths in tokens")
    ap.add_argument("--prompt", type=int, default=1000, help="prompt tokens (the repetition penalty covers them)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per path and length (median)")
    ap.add_argument("--out", default="runs/bench-stream-overhead")
    args = ap.parse_args()
    from plm.bench.edge import machine_info
    from plm.bench.report import save, table
    from plm.data.tokenizer import build_qwen2

    tok = build_qwen2()
    lengths = [int(x) for x in args.lengths.split(",")]
    base = tok.encode(PROSE * ((max(lengths) + args.prompt) // 20 + 1))
    prompt, reply = base[:args.prompt], base[args.prompt:]
    rows = []
    for kind in ("text", "penalties"):
        for L in lengths:
            ids = reply[:L]
            assert _agree(tok, kind, prompt, ids), f"the two {kind} paths disagree"
            before, incr = [], []
            for _ in range(args.repeats):  # alternate, so a slow phase of the host hits both
                old, new = _paths(tok, kind, prompt)
                before.append(_per_token(old, ids))
                incr.append(_per_token(new, ids))
            w, i = statistics.median(before), statistics.median(incr)
            rows.append({"work": kind, "tokens": L, "before_us_per_token": round(w / L * 1e6, 1),
                         "incremental_us_per_token": round(i / L * 1e6, 1),
                         "before_s_per_reply": round(w, 3), "incremental_s_per_reply": round(i, 3),
                         "speedup": round(w / i, 1)})
    info = machine_info(1)
    report = {"command": "python " + " ".join(sys.argv), "machine": info, "prompt_tokens": args.prompt,
              "penalties": PENALTIES, "rows": rows}
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores; load average at start "
             f"{info['loadavg_at_start'][0]:.2f}; median of {args.repeats} runs per path, alternating; "
             f"penalties over a {args.prompt}-token prompt and the reply.", ""]
    lines += table(["work", "reply tokens", "before µs/token", "incremental µs/token", "before s/reply",
                    "incremental s/reply", "speed-up"],
                   [[r["work"], r["tokens"], r["before_us_per_token"], r["incremental_us_per_token"],
                     r["before_s_per_reply"], r["incremental_s_per_reply"], f"{r['speedup']}x"] for r in rows])
    save(args.out, "stream_overhead", report, lines)
    _plot(rows, Path(args.out) / "stream_overhead.png")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    from plm.bench.plot import png
    labels = {"text": ("decode the whole reply", "IncrementalText"),
              "penalties": ("dense penalty masks", "SequencePenalties")}
    with png(path, title="A streamed reply: host cost per token beside the model") as ax:
        for kind, (old, new) in labels.items():
            sel = [r for r in rows if r["work"] == kind]
            x = [r["tokens"] for r in sel]
            ax.plot(x, [r["before_us_per_token"] for r in sel], "o-", label=old)
            ax.plot(x, [r["incremental_us_per_token"] for r in sel], "o--", label=new)
        ax.set(xscale="log", yscale="log", xlabel="reply length (tokens)", ylabel="µs per token (mean over the reply)")
        ax.legend()


if __name__ == "__main__":
    raise SystemExit(main())
