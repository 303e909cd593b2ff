"""What constrained decoding (plm.model.grammar: JSON schemas, tool calls) costs per token,
side by side with sampling without a grammar, on the real Qwen2 vocabulary (151,646 tokens):

* plain: `sample_next` over a [1, V] row of logits (what every step pays anyway);
* grammar: the matcher's allowed-token mask applied to the row, `sample_next`, and the matcher
  advanced by the token (what a constrained step adds), the matcher driven along a valid reply.

Also the one-time costs: building the engine's token trie for the tokenizer (once per process)
and compiling each grammar (the first time it is sent: a grammar sent again, as agents send the
same schema and tools every turn, is kept compiled; both timed). No model is needed: the cost does not depend on
the logits, only on the grammar's state.

    python benchmarks/grammar.py                       # prints a table, writes runs/bench-grammar/
    python benchmarks/grammar.py --repeats 5 --out DIR
    python benchmarks/grammar.py --serve MODEL.gguf --threads 2   # and forced tokens end to end

With --serve, it also starts `plm serve MODEL` (native runtime) and times a forced tool call
(one function, `tool_choice` required, one call, greedy) with the grammar's forced tokens fed in
one forward, against the same request with `logprobs` set, which makes the server decode every
token on its own step (forced tokens have no log-probabilities); the two alternate, after a
warm-up that leaves the prompt in the prompt cache.
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

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
PROSE = ("The Peripheral Language Model runs on small devices: its latent attention cache keeps 576 values per "
         "token and layer, and about nine in ten of its MLP activations are exactly zero, so a phone or a "
         "Raspberry Pi can hold long conversations in little memory.")


def cases(tok):
    from plm.data.chat import tool_call_text
    from plm.model.grammar import Grammar, tool_call_grammar
    nested = {"id": 7, "items": [{"name": "apple", "price": 1.25, "tags": ["fruit", "red"]},
                                 {"name": "bread", "price": 2.5, "tags": []}], "paid": False, "note": None}
    return [
        ("JSON schema (4 fields)", lambda: Grammar.json_schema(PERSON, tok),
         json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["red", "blue"], "ok": True})),
        ("any JSON object", lambda: Grammar.json_schema(None, tok), json.dumps(nested)),
        ("tool call (2 tools, required)", lambda: tool_call_grammar(TOOLS, tok, "required"),
         tool_call_text("get_weather", {"city": "Paris", "unit": "C"})),
        ("tools auto, a text reply", lambda: tool_call_grammar(TOOLS, tok, "auto"), PROSE),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="passes over each reply (per-token times pooled)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="runs/bench-grammar")
    ap.add_argument("--serve", default=None, metavar="MODEL",
                    help="also time forced tokens end to end on `plm serve MODEL` (a GGUF or checkpoint)")
    ap.add_argument("--rounds", type=int, default=3, help="--serve: requests per mode")
    args = ap.parse_args()

    import torch

    from plm.bench.edge import machine_info
    from plm.bench.report import save, table
    from plm.data.tokenizer import build_qwen2
    from plm.model.generation import GenerationConfig, sample_next
    from plm.model.grammar import _engine_tokenizer

    torch.set_num_threads(args.threads)
    tok = build_qwen2()
    t0 = time.perf_counter()
    _engine_tokenizer(tok)
    trie_s = time.perf_counter() - t0
    cfg = GenerationConfig(temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 151936, generator=gen)
    rows = []
    for name, make, text in cases(tok):
        ids = tok.encode(text)
        t0 = time.perf_counter()
        grammar = make()
        grammar.matcher()
        compile_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        make().matcher()  # the same grammar sent again: kept compiled
        again_ms = (time.perf_counter() - t0) * 1e3
        plain, constrained = [], []
        for _ in range(args.repeats):
            m = grammar.matcher()
            for t in ids:
                t0 = time.perf_counter()
                sample_next(logits, cfg, gen)
                t1 = time.perf_counter()
                masked = m.mask(logits)
                masked[0, t] = 1e9  # the reply's token wins, so the matcher walks the reply
                assert int(sample_next(masked, cfg, gen)[0]) == t
                m.advance(t)
                t2 = time.perf_counter()
                plain.append((t1 - t0) * 1e6)
                constrained.append((t2 - t1) * 1e6)
            assert m.accepting, name
        rows.append({"grammar": name, "tokens": len(ids), "compile_ms": round(compile_ms, 2),
                     "again_ms": round(again_ms, 3),
                     "plain_us": round(statistics.median(plain), 1),
                     "grammar_us": round(statistics.median(constrained), 1),
                     "added_us": round(statistics.median(c - p for c, p in zip(constrained, plain)), 1),
                     "grammar_p95_us": round(sorted(constrained)[int(0.95 * (len(constrained) - 1))], 1),
                     "grammar_max_us": round(max(constrained), 1)})
    info = machine_info(args.threads)
    report = {"command": "python " + " ".join(sys.argv), "machine": info, "engine_trie_s": round(trie_s, 3),
              "vocab": 151936, "rows": rows}
    if args.serve:
        report["serve"] = _served(args.serve, args.threads, args.rounds)
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores; {args.threads} torch thread(s); torch {info['torch']}; "
             f"load average at start {info['loadavg_at_start'][0]:.2f}. "
             f"The engine's token trie for the Qwen2 tokenizer: built once per process in {trie_s:.2f} s.",
             ""]
    lines += table(["grammar", "reply tokens", "compile ms", "sent again ms", "plain step µs (p50)",
                    "constrained step µs (p50)", "p95", "max", "added µs (p50)"],
                   [[r["grammar"], r["tokens"], r["compile_ms"], r["again_ms"], r["plain_us"], r["grammar_us"], r["grammar_p95_us"],
                     r["grammar_max_us"], r["added_us"]] for r in rows])
    if args.serve:
        sv = report["serve"]
        lines += ["", f"`plm serve {args.serve}` ({sv['runtime']} runtime), a forced tool call of "
                      f"{sv['tokens']} tokens, {args.rounds} requests per mode, alternating:", ""]
        lines += table(["mode", "seconds (median)", "tokens/s", "decode steps saved"],
                       [["forced tokens fed in one forward", sv["ff_s"], sv["ff_tok_s"],
                         f"{sv['forced_tokens']} of {sv['tokens']}"],
                        ["every token its own step (`logprobs`)", sv["plain_s"], sv["plain_tok_s"], 0]])
    save(args.out, "grammar", report, lines)
    _plot(rows, Path(args.out) / "grammar.png")
    return 0


def _served(model: str, threads: int, rounds: int) -> dict:
    """Forced tokens end to end: the same tool call with and without them, on a live server."""
    import re
    import subprocess

    import httpx
    proc = subprocess.Popen([sys.executable, "-m", "plm", "serve", model, "--port", "0", "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"\((\w+) runtime.* on (http://\S+)/v1", line)
            if m:
                runtime, url = m.group(1), m.group(2)
                break
        if url is None:
            raise SystemExit(f"plm serve {model} did not start")
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}}
        body = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [tool],
                "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 64, "temperature": 0}

        def ask(logprobs: bool) -> tuple[float, dict]:
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/chat/completions", json={**body, "logprobs": logprobs}, timeout=900).json()
            return time.perf_counter() - t0, r

        ask(False)  # warm-up: the prompt goes into the prompt cache
        before = _counter(httpx.get(url + "/metrics").text, "plm_grammar_forced_tokens_total")
        times: dict[bool, list[float]] = {False: [], True: []}
        replies = {}
        for _ in range(rounds):
            for lp in (False, True):
                s, r = ask(lp)
                times[lp].append(s)
                replies[lp] = r
        forced = (_counter(httpx.get(url + "/metrics").text, "plm_grammar_forced_tokens_total") - before) / rounds
        calls = [replies[lp]["choices"][0]["message"]["tool_calls"] for lp in (False, True)]
        assert calls[0][0]["function"] == calls[1][0]["function"], calls  # the same call either way
        n = replies[False]["usage"]["completion_tokens"]
        ff, plain = statistics.median(times[False]), statistics.median(times[True])
        return {"runtime": runtime, "tokens": n, "forced_tokens": int(forced), "ff_s": round(ff, 3),
                "plain_s": round(plain, 3), "ff_tok_s": round(n / ff, 1), "plain_tok_s": round(n / plain, 1),
                "call": calls[0][0]["function"]}
    finally:
        proc.kill()
        proc.wait(30)


def _counter(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _plot(rows: list[dict], path: Path) -> None:
    from plm.bench.plot import png
    with png(path, figsize=(8, 3.5), title="Constrained decoding: cost per token (Qwen2 vocabulary)") as ax:
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], [r["grammar_us"] for r in rows], height=0.4, label="constrained (p50)")
        ax.barh([i - 0.2 for i in y], [r["plain_us"] for r in rows], height=0.4, label="plain sampling (p50)")
        ax.set_yticks(list(y), [r["grammar"] for r in rows])
        ax.set_xlabel("µs per token")
        ax.legend()


if __name__ == "__main__":
    raise SystemExit(main())
