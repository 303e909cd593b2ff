"""What turning a growing reply into text costs per token, side by side in one run:

* whole: decode every token of the reply so far at each new token (what streaming did before
  `IncrementalText`: `plm serve`'s scheduler, `plm generate`'s stream, stop-string checks);
* incremental: `plm.model.generation.IncrementalText`, which decodes a few tokens per call.

The reply is English, German, Japanese and emoji prose in the Qwen2 tokenizer (151,646 tokens),
so some tokens end inside a UTF-8 character, as in real replies. Both paths must give the same
text at every length (checked). No model: the cost depends only on the tokens.

    python benchmarks/detokenize.py                  # prints a table, writes runs/bench-detokenize/
    python benchmarks/detokenize.py --lengths 256,4096 --repeats 5 --out DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROSE = ("The Peripheral Language Model runs on small devices; Größe und Geschwindigkeit zählen. "
         "名前は小さなモデルです。 🫠🪿 Its latent cache keeps 576 values per token and layer.\n")


def _per_token(tok, ids: list[int], incremental: bool) -> float:
    """Seconds to produce the text after each token of `ids`, summed over the reply."""
    from plm.model.generation import IncrementalText
    text_of = IncrementalText(tok.decode) if incremental else tok.decode
    reply: list[int] = []
    t0 = time.perf_counter()
    for t in ids:  # the reply grows by a token, as in the server's scheduler
        reply.append(t)
        text_of(reply)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,1024,4096", help="reply lengths in tokens")
    ap.add_argument("--repeats", type=int, default=3, help="runs per path and length (median)")
    ap.add_argument("--out", default="runs/bench-detokenize")
    args = ap.parse_args()
    from plm.bench.edge import machine_info
    from plm.data.tokenizer import build_qwen2
    from plm.model.generation import IncrementalText

    tok = build_qwen2()
    lengths = [int(x) for x in args.lengths.split(",")]
    base = tok.encode(PROSE * (max(lengths) // 20 + 1))
    rows = []
    for L in lengths:
        ids = base[:L]
        inc = IncrementalText(tok.decode)
        assert all(inc(ids[:n]) == tok.decode(ids[:n]) for n in range(L + 1)), "the two paths disagree"
        whole, incr = [], []
        for _ in range(args.repeats):  # alternate, so a slow phase of the host hits both
            whole.append(_per_token(tok, ids, False))
            incr.append(_per_token(tok, ids, True))
        w, i = statistics.median(whole), statistics.median(incr)
        rows.append({"tokens": L, "whole_us_per_token": round(w / L * 1e6, 1),
                     "incremental_us_per_token": round(i / L * 1e6, 1),
                     "whole_s_per_reply": round(w, 3), "incremental_s_per_reply": round(i, 3),
                     "speedup": round(w / i, 1)})
    info = machine_info(1)
    report = {"command": "python " + " ".join(sys.argv), "machine": info, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detokenize.json").write_text(json.dumps(report, indent=2))
    lines = [f"Command: `{report['command']}`  ",
             f"Machine: {info['cpu']}, {info['cores']} cores; load average at start "
             f"{info['loadavg_at_start'][0]:.2f}; median of {args.repeats} runs per path, alternating.", "",
             "| reply tokens | whole decode µs/token | incremental µs/token | whole s/reply | incremental s/reply "
             "| speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['whole_us_per_token']} | {r['incremental_us_per_token']} | "
              f"{r['whole_s_per_reply']} | {r['incremental_s_per_reply']} | {r['speedup']}x |" for r in rows]
    table = "\n".join(lines)
    (out / "detokenize.md").write_text(table + "\n")
    _plot(rows, out / "detokenize.png")
    print(table)
    print(json.dumps(report))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    from plm.bench.plot import png
    with png(path, title="Streaming text: cost per token (Qwen2 tokenizer)") as ax:
        x = [r["tokens"] for r in rows]
        ax.plot(x, [r["whole_us_per_token"] for r in rows], "o-", label="decode the whole reply")
        ax.plot(x, [r["incremental_us_per_token"] for r in rows], "o-", label="IncrementalText")
        ax.set(xscale="log", yscale="log", xlabel="reply length (tokens)", ylabel="µs per token (mean over the reply)")
        ax.legend()


if __name__ == "__main__":
    raise SystemExit(main())
