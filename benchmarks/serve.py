#!/usr/bin/env python
"""Serving benchmark: `plm serve` against llama.cpp's servers under the same load on loopback.

For each model and engine, one server process; for each concurrency level, that many clients
each send `--rounds` streamed greedy completions one after another (at least `--min-requests`
per level: more rounds at low concurrency), the levels run `--passes` times in turn and pooled
per level (a bounded load), and we
measure aggregate output tokens/s (all tokens / wall time of the level), time to first token
and inter-token latency (gaps between streamed chunks) at p50 and p95.

Engines (same 8-bit weights, same threads):
  ours              plm serve on the PyTorch edge runtime, --quant int8
  ours-native       plm serve --runtime native on the Q8_0 GGUF (if the native kernels are built)
  llama-cpp-python  python -m llama_cpp.server on the Q8_0 GGUF (its `server` extra)
  llama-server      llama.cpp's own server, -np 8 (continuous batching), built by
                    scripts/build_llama_server.sh ("not built" otherwise)
  ours@N, ours-native@N   the same with --prefill-chunk N (compare chunk sizes in one run)
  ours-native+cacheK      the same with --prompt-cache K (ours-native+cache0: none)

Every conversation begins with its own number, so no engine reuses a cached prompt of another
request. With --turns K each client's requests form conversations of K turns, each resending
the earlier turns and their replies as a chat client does; the report adds the time to first
token by turn, where a prompt cache (plm serve --prompt-cache, llama-server's slots) shows.

Engines run one after another, each through its passes; with --interleave every server is up
at once and each level runs engine after engine (order reversed every pass), so the host's
drift over minutes falls on all of them alike (needs the memory of every server at once).

    python benchmarks/serve.py --model tiny                       # a few minutes
    python benchmarks/serve.py --model plm-1.8b --threads 2       # the full run (see docs/serve.md)
    python benchmarks/serve.py --model plm-1.8b --engines ours-native,ours-native+cache0 --interleave \
        --turns 4 --concurrency 1,4                               # multi-turn chat: the prompt cache

Writes serve-MODEL.json, serve-MODEL.md and serve-MODEL.png in --out and prints the markdown.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENGINES = ("ours", "ours-native", "llama-cpp-python", "llama-server")
OURS = ("ours", "ours-native")


def engine_parts(name: str) -> tuple[str, int | None, int | None]:
    """'ours-native@16+cache0' -> ('ours-native', 16, 0): an engine, its prefill chunk and its
    prompt cache (plm serve --prefill-chunk / --prompt-cache; None: the server's default)."""
    m = re.fullmatch(r"([a-z-]+)(?:@(\d+))?(?:\+cache(\d+))?", name)
    base, chunk, cache = m.groups() if m else (None, None, None)
    if (base not in ENGINES or (chunk is not None and (base not in OURS or int(chunk) < 1))
            or (cache is not None and base != "ours-native")):
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}, or ours@N / ours-native@N "
                         f"(N: prefill chunk, a positive integer) and ours-native+cacheK (K: prompt cache)")
    return base, int(chunk) if chunk else None, int(cache) if cache else None


def engine_order(name: str) -> tuple[int, int, int]:
    base, chunk, cache = engine_parts(name)
    return ENGINES.index(base), chunk or 0, -1 if cache is None else cache
DEFAULT_MAX_TOKENS = {"tiny": 64, "plm-1.8b": 32}


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ---- models and weights -------------------------------------------------------------------------

def checkpoint(model: str, args) -> Path:
    """The tiny model of `make demo` when it exists, else random weights of the preset."""
    if args.ckpt:
        return Path(args.ckpt)
    if model == "tiny" and (REPO / "runs/tiny/aries/final/config.json").exists():
        return REPO / "runs/tiny/aries/final"
    from plm.bench.edge import ensure_checkpoint  # the same folder as benchmarks/edge.py's
    preset = "plm-tiny" if model == "tiny" else model
    return ensure_checkpoint(argparse.Namespace(ckpt=None, sparsity=None, preset=preset, workdir=args.workdir))


def gguf_q8(ckpt: Path, workdir: Path) -> Path:
    from plm.export.gguf import export_gguf
    stamp = int(max(p.stat().st_mtime for p in ckpt.glob("*.safetensors")))
    out = workdir / f"{ckpt.resolve().parent.name}-{ckpt.resolve().name}-{stamp}-q8_0.gguf"
    if not out.exists():
        log(f"exporting {out.name}")
        export_gguf(ckpt, out, "q8_0")
    return out


def prompts(n: int, words: int) -> list[str]:
    """n different prompts of `words` words from this repository's docs."""
    text = " ".join((REPO / "README.md").read_text().split() + (REPO / "docs/edge.md").read_text().split())
    ws = text.split()
    return [" ".join(ws[(i * words) % max(1, len(ws) - words):][:words]) for i in range(n)]


# ---- engines ----------------------------------------------------------------------------------------

def llama_server_path(args) -> Path | None:
    if args.llama_server:
        return Path(args.llama_server)
    r = subprocess.run(["bash", str(REPO / "scripts/build_llama_server.sh"), "--path"], capture_output=True, text=True)
    return Path(r.stdout.strip()) if r.returncode == 0 else None


def unavailable(engine: str, args) -> str | None:
    """Why an engine cannot run here (None when it can)."""
    engine = engine_parts(engine)[0]
    if engine == "ours-native":
        from plm.serve.backend import native_unavailable
        return native_unavailable()
    if engine == "llama-cpp-python":
        missing = []
        for mod in ("llama_cpp", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
            try:
                __import__(mod)
            except ImportError:
                missing.append(mod)
        if missing:
            return (f"missing {', '.join(missing)}: pip install fastapi sse-starlette 'starlette-context>=0.3.6,<0.4' "
                    f"pydantic-settings (llama-cpp-python's server extra)")
    if engine == "llama-server" and llama_server_path(args) is None:
        return "not built (scripts/build_llama_server.sh)"
    return None


def command(engine: str, ckpt: Path, gguf: Path, port: int, args, max_tokens: int) -> list[str]:
    t = str(args.threads)
    # per sequence: prompts (words -> tokens) and replies of every turn of a conversation
    ctx = args.turns * (args.prompt_tokens * 2 + max_tokens + 8) + 64
    engine, chunk, cache = engine_parts(engine)
    chunk = chunk or args.prefill_chunk
    ours = ["--port", str(port), "--threads", t, "--max-batch", "16", "--max-queue", "256", "--model-name", "bench"]
    if chunk:
        ours += ["--prefill-chunk", str(chunk)]
    if cache is not None:
        ours += ["--prompt-cache", str(cache)]
    if engine == "ours":
        return [sys.executable, "-m", "plm", "serve", str(ckpt), "--runtime", "edge", "--quant", "int8", *ours]
    if engine == "ours-native":
        return [sys.executable, "-m", "plm", "serve", str(gguf), "--runtime", "native", *ours]
    if engine == "llama-cpp-python":
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench",
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", t, "--n_threads_batch", t,
                "--n_ctx", str(ctx), "--interrupt_requests", "False"]
    return [str(llama_server_path(args)), "-m", str(gguf), "--alias", "bench", "--host", "127.0.0.1",
            "--port", str(port), "-t", t, "-tb", t, "-np", "8", "-c", str(8 * ctx), "--no-warmup",
            # flash attention "auto" aborts on the plm architecture (GGML_ASSERT in ggml.c while
            # sizing the context); off is also what llama-cpp-python runs
            "-fa", "off"]


class Running:
    def __init__(self, cmd: list[str], port: int, timeout: float = 600) -> None:
        import httpx
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"not ready after {timeout:.0f}s: {' '.join(cmd)}")

    def cpu_seconds(self) -> float:
        try:
            f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- load -------------------------------------------------------------------------------------------

def one_request(client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: its start, the arrival of each text chunk, the token
    count the server reported, the text, or the error."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, pieces, usage, err = [], [], None, None
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("usage"):
                    usage = obj["usage"].get("completion_tokens")
                ch = obj.get("choices") or []
                if ch and ch[0].get("text"):
                    times.append(time.perf_counter())
                    pieces.append(ch[0]["text"])
    except Exception as e:  # a server that falls over is a result too
        err = f"{type(e).__name__}: {e}"
    tokens = usage if usage else len(times)
    return {"t0": t0, "times": times, "tokens": tokens, "text": "".join(pieces), "error": err}


def rounds_at(c: int, args) -> int:
    """Requests per client at concurrency c: --rounds, more where c clients would send fewer
    than --min-requests; whole conversations of --turns."""
    n = max(args.rounds, -(-args.min_requests // c))
    turns = getattr(args, "turns", 1)
    return -(-n // turns) * turns


CONVERSATIONS = itertools.count(1)  # numbers every conversation of the run: no two prompts begin alike


def run_level(url: str, texts: list[str], c: int, rounds: int, max_tokens: int, turns: int = 1) -> dict:
    """c clients, each sending `rounds` requests one after another: the requests' raw timings.
    Every `turns` requests of a client are one conversation: each turn's prompt is the previous
    prompt and its reply, then new text (what a chat client resends). A conversation begins with
    its own number, so no server can reuse another request's cache unless it is the same
    conversation's earlier turn (the levels and passes reuse the texts)."""
    import httpx
    results: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(c)

    def worker(w: int) -> None:
        with httpx.Client(timeout=3600) as client:
            start.wait()
            history = ""
            for r in range(rounds):
                text = texts[(w * rounds + r) % len(texts)]
                turn = r % turns
                prompt = f"{history} {text}" if turn else f"{next(CONVERSATIONS)}. {text}"
                res = one_request(client, url, prompt, max_tokens)
                res["turn"] = turn
                history = prompt + res["text"]
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "wall": time.perf_counter() - t0}


def level_stats(c: int, runs: list[dict]) -> dict:
    """One level's figures from its runs (one per pass), pooled: the passes alternate between
    the levels, so a drift in the host's speed reaches every level alike."""
    results = [r for run in runs for r in run["results"]]
    wall = sum(run["wall"] for run in runs)
    ok = [r for r in results if not r.get("error") and r["times"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["times"][0] - r["t0"] for r in ok]
    # decode throughput: tokens after each request's first / the time some request was decoding
    # (the union of [first token, last token] over requests): prefill-only stretches excluded
    spans = sorted((r["times"][0], r["times"][-1]) for r in ok)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    decode_tokens = sum(r["tokens"] - 1 for r in ok)
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    turns = 1 + max((r.get("turn", 0) for r in ok), default=0)
    by_turn = [pct([r["times"][0] - r["t0"] for r in ok if r.get("turn", 0) == t], 0.5) for t in range(turns)]
    return {"concurrency": c, "requests": len(results), "errors": len(results) - len(ok),
            "error_sample": next((r["error"] for r in results if r.get("error")), None),
            "output_tokens": tokens, "wall_s": round(wall, 3), "tok_s": tokens / wall if wall else 0.0,
            "decode_tok_s": decode_tokens / busy if busy else 0.0,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95), "passes": len(runs),
            **({"ttft_p50_by_turn": by_turn} if turns > 1 else {})}


# ---- report -----------------------------------------------------------------------------------------

def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}" if x >= 0.1 else f"{1000 * x:.1f}"


def targets(res: dict) -> list[dict]:
    eng = res["engines"]

    def level(e: str, c: int) -> dict | None:
        return next((lv for lv in eng.get(e, {}).get("levels", []) if lv["concurrency"] == c), None)

    rows = []
    for ours in sorted((e for e in eng if engine_parts(e)[0] in OURS), key=engine_order):
        a1, a8 = level(ours, 1), level(ours, 8)
        if not (a1 and a8):
            continue
        r = a8["decode_tok_s"] / a1["decode_tok_s"] if a1["decode_tok_s"] else 0
        rows.append({"target": f"{ours}: decode throughput at c=8 >= 3x c=1", "measured":
                     f"{a8['decode_tok_s']:.1f} vs {a1['decode_tok_s']:.1f} tok/s = {r:.3f}x", "met": r >= 3})
        if a1["itl_p95"] and a8["itl_p95"]:
            r = a8["itl_p95"] / a1["itl_p95"]
            rows.append({"target": f"{ours}: p95 inter-token latency at c=8 <= 3x c=1", "measured":
                         f"{_ms(a8['itl_p95'])} vs {_ms(a1['itl_p95'])} ms = {r:.3f}x", "met": r <= 3})
        for other, bar in (("llama-cpp-python", 1.5), ("llama-server", 1.0)):
            b8 = level(other, 8)
            if b8 and b8["decode_tok_s"]:
                r = a8["decode_tok_s"] / b8["decode_tok_s"]
                rows.append({"target": f"{ours} vs {other}, decode throughput at c=8: >= {bar}x", "measured":
                             f"{a8['decode_tok_s']:.1f} vs {b8['decode_tok_s']:.1f} tok/s = {r:.3f}x",
                             "met": r >= bar})
        # llama-server's target names "aggregate throughput": every token over the level's wall
        # time as well, where its holding streams until all prompts are in counts against it
        b8 = level("llama-server", 8)
        if b8 and b8.get("tok_s") and a8.get("tok_s") is not None:
            r = a8["tok_s"] / b8["tok_s"]
            rows.append({"target": f"{ours} vs llama-server, output throughput (all tokens / wall time) at c=8: "
                                   f">= 1.0x", "measured": f"{a8['tok_s']:.1f} vs {b8['tok_s']:.1f} tok/s = {r:.3f}x",
                         "met": r >= 1.0})
    return rows


def _load_words(res: dict) -> str:
    """The load in words (runs before --passes and --min-requests: rounds per client only)."""
    if "passes" not in res:
        return f"{res['rounds']} streamed greedy requests per client per level"
    how = ("every server up at once, each level run engine after engine, the order reversed every pass"
           if res.get("interleave") else "one engine after another")
    return (f"streamed greedy requests, {res['rounds']} per client per level and at least {res['min_requests']} "
            f"per level, in {res['passes']} passes over the levels (pooled per level; {how})")


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"### {res['model']} ({res['checkpoint']}), {res['threads']} threads", "",
           f"Command: `{res['command']}`  ",
           f"Machine: {m['cpu']}, {m['cores']} cores; load average at start {m['loadavg'][0]:.2f}; "
           f"{_load_words(res)}, prompts of about {res['prompt_tokens']} words, {res['max_tokens']} new tokens "
           f"each.", "",
           "| engine | concurrency | decode tok/s | output tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | "
           "ITL p95 ms | errors | load | other CPU |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in res["engines"].items():
        if e.get("skipped"):
            out.append(f"| {name} | {e['skipped']} | | | | | | | | | |")
            continue
        for lv in e["levels"]:
            out.append(f"| {name} | {lv['concurrency']} | {lv['decode_tok_s']:.1f} | {lv['tok_s']:.1f} | "
                       f"{_ms(lv['ttft_p50'])} | "
                       f"{_ms(lv['ttft_p95'])} | {_ms(lv['itl_p50'])} | {_ms(lv['itl_p95'])} | {lv['errors']} | "
                       f"{lv['loadavg']:.2f} | {100 * lv['other_cpu']:.0f}% |")
    out += ["", "Decode tok/s: tokens after each request's first / the time at least one request was "
                "decoding (stalls for others' prefill included, prefill-only stretches not). Output tok/s: "
                "every streamed token of the level / its wall time. ITL: gaps between streamed chunks. Load: 1-minute load average before the level; other CPU: "
                "share of the CPUs used by processes other than the server and this client during it.", ""]
    turns = res.get("turns", 1)
    if turns > 1:
        out += [f"Conversations of {turns} turns (each prompt resends the earlier turns and their replies): "
                "time to first token, p50 ms, by turn.", "",
                "| engine | concurrency | " + " | ".join(f"turn {t + 1}" for t in range(turns)) + " |",
                "|---|---|" + "---|" * turns]
        for name, e in res["engines"].items():
            for lv in e.get("levels", []):
                out.append(f"| {name} | {lv['concurrency']} | "
                           + " | ".join(_ms(x) for x in lv.get("ttft_p50_by_turn", [])) + " |")
        out.append("")
    rows = targets(res)
    if rows:
        out += ["| target | measured | met |", "|---|---|---|"]
        out += [f"| {r['target']} | {r['measured']} | {'yes' if r['met'] else 'no'} |" for r in rows]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    from plm.bench.plot import png
    with png(path, 3, (15, 4.2), f"plm serve vs llama.cpp servers: {res['model']}, {res['threads']} threads",
             dpi=110) as axes:
        _draw(res, axes)


def _draw(res: dict, axes) -> None:
    for name, e in res["engines"].items():
        lv = e.get("levels") or []
        if not lv:
            continue
        c = [x["concurrency"] for x in lv]
        axes[0].plot(c, [x["decode_tok_s"] for x in lv], "o-", label=name)
        axes[1].plot(c, [1000 * (x["itl_p95"] or 0) for x in lv], "o-", label=name)
        axes[2].plot(c, [1000 * (x["ttft_p50"] or 0) for x in lv], "o-", label=name)
    for ax, title in zip(axes, ("aggregate decode tok/s", "inter-token latency p95 (ms)", "time to first token p50 (ms)")):
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")  # a server that queues has TTFTs orders of magnitude longer
    axes[0].legend()


def keep_earlier(earlier: dict, res: dict) -> dict:
    """`res` plus the engines `earlier` measured and `res` did not (skipped or not asked for),
    in the usual engine order, with both commands and the targets recomputed."""
    engines = dict(res["engines"])
    for name, r in earlier["engines"].items():
        if "levels" in r and "levels" not in engines.get(name, {}):
            engines[name] = r
    out = {**res, "engines": {e: engines[e] for e in sorted(engines, key=engine_order)},
           "command": f"{earlier['command']}; then {res['command']}"}
    out["targets"] = targets(out)
    return out


# ---- the native decoder alone --------------------------------------------------------------------

def decoder_alone(gguf: Path, levels: list[int], prompt_tokens: int, threads: int) -> str:
    """The native decoder's batched step and prefill without the server (what the server's
    throughput is made of): B sequences, each prefilled with `prompt_tokens` random ids, then
    timed batched steps; and the step's matrices alone at B rows, read from memory as in the
    step (plm.bench.edge.kernel_seconds), with their share of the step. Returns a markdown table."""
    import torch

    from plm.bench.edge import cold_copies, kernel_seconds, layer_kernels
    from plm.infer.native_decoder import NativeDecoder
    torch.set_num_threads(threads)
    dec = NativeDecoder.from_gguf(gguf, capacity=prompt_tokens + 64)
    mats, head = layer_kernels(dec)
    copies = cold_copies(mats)
    g = torch.Generator().manual_seed(0)
    rows = [f"| sequences B | prefill tok/s | batched step ms | decode tok/s | vs B={levels[0]} | matrices ms | matrices share |",
            "|---|---|---|---|---|---|---|"]
    one = None
    for B in levels:
        seqs = [dec.new_sequence() for _ in range(B)]
        t0 = time.perf_counter()
        for sq in seqs:
            dec.prefill(sq, torch.randint(0, 1000, (prompt_tokens,), generator=g).tolist(), chunk=512)
        pre = B * prompt_tokens / (time.perf_counter() - t0)
        dec.step(seqs, [5] * B)
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            dec.step(seqs, [5] * B)
            times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        one = one or B / step
        mm = kernel_seconds(copies, head, dec, prompt_tokens, threads, rows=B)["matmul_s"]
        rows.append(f"| {B} | {pre:.0f} | {step * 1e3:.0f} | {B / step:.1f} | {B / step / one:.2f}x "
                    f"| {mm * 1e3:.0f} | {mm / step:.0%} |")
        for sq in seqs:
            dec.free(sq)
    return "\n".join(rows) + "\n"


# ---- main -------------------------------------------------------------------------------------------

def bench_model(model: str, args) -> dict:
    from plm.bench.edge import machine_info, Quiet
    ckpt = checkpoint(model, args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_q8(ckpt, workdir)
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS.get(model, 32)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = prompts(max(c * rounds_at(c, args) for c in levels), args.prompt_tokens)
    info = machine_info(args.threads)
    res = {"model": model, "checkpoint": str(ckpt), "gguf": str(gguf), "threads": args.threads,
           "rounds": args.rounds, "min_requests": args.min_requests, "passes": args.passes,
           "interleave": bool(args.interleave), "turns": args.turns,
           "prompt_tokens": args.prompt_tokens, "max_tokens": max_tokens,
           "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
           "machine": {"cpu": info["cpu"], "cores": info["cores"], "loadavg": list(os.getloadavg()),
                       "torch": info["torch"], "llama_cpp_python": info["llama_cpp_python"]},
           "engines": {}}
    log(f"CPU: {info['cpu']}, {info['cores']} cores; load average {os.getloadavg()[0]:.2f}")
    quiet = Quiet(limit=args.contention, max_wait=args.max_wait)

    def measure(engine: str, srv: Running, c: int, p: int) -> dict:
        best = None
        for attempt in range(1, args.retries + 1):  # keep the least contended attempt
            quiet.wait_idle()
            load = os.getloadavg()[0]
            s0, cpu0 = quiet.snapshot(), srv.cpu_seconds()
            run = run_level(srv.url, texts, c, rounds_at(c, args), max_tokens, args.turns)
            s1, cpu1 = quiet.snapshot(), srv.cpu_seconds()
            wall = s1[0] - s0[0]
            other = ((s1[1] - s0[1]) - (s1[2] - s0[2]) - (cpu1 - cpu0)) / (wall * quiet.ncpu) if wall else 0
            run.update(loadavg=load, other_cpu=max(0.0, other), attempts=attempt)
            if best is None or run["other_cpu"] < best["other_cpu"]:
                best = run
            if run["other_cpu"] <= args.contention:
                break
            log(f"{engine} c={c}: contended ({100 * run['other_cpu']:.0f}% of the CPUs used by others); again")
        lv = level_stats(c, [best])
        log(f"{engine} c={c} pass {p + 1}/{args.passes}: decode {lv['decode_tok_s']:.1f} tok/s, output "
            f"{lv['tok_s']:.1f} tok/s, TTFT p50 {_ms(lv['ttft_p50'])} ms, ITL p50/p95 "
            f"{_ms(lv['itl_p50'])}/{_ms(lv['itl_p95'])} ms, errors {lv['errors']}")
        return best

    engines = args.engines.split(",")
    for group in ([engines] if args.interleave else [[e] for e in engines]):
        servers: dict[str, Running] = {}
        try:
            for engine in group:
                why = unavailable(engine, args)
                if why:
                    log(f"{engine}: {why}")
                    res["engines"][engine] = {"skipped": why}
                    continue
                port = free_port()
                log(f"{engine}: starting")
                try:
                    servers[engine] = Running(command(engine, ckpt, gguf, port, args, max_tokens), port)
                except RuntimeError as e:
                    log(f"{engine}: {e}")
                    res["engines"][engine] = {"skipped": f"failed to start ({e})"[:300]}
                    continue
                one_request(__import__("httpx").Client(timeout=600), servers[engine].url, texts[0], 4)  # warm-up
                res["engines"][engine] = {"levels": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            runs = {e: {c: [] for c in levels} for e in servers}
            for p in range(args.passes):
                for c in levels:
                    for engine in (list(servers) if p % 2 == 0 else list(servers)[::-1]):
                        runs[engine][c].append(measure(engine, servers[engine], c, p))
            for engine, by_level in runs.items():
                for c in levels:
                    lv = level_stats(c, by_level[c])
                    lv.update(loadavg=max(r["loadavg"] for r in by_level[c]),
                              other_cpu=max(r["other_cpu"] for r in by_level[c]),
                              attempts=sum(r["attempts"] for r in by_level[c]))
                    res["engines"][engine]["levels"].append(lv)
        finally:
            for srv in servers.values():
                srv.stop()
    res["targets"] = targets(res)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", choices=["tiny", "plm-1.8b", "plm-300m"],
                    help="repeatable (default: tiny)")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder instead of the default for --model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level (at least)")
    ap.add_argument("--min-requests", type=int, default=8,
                    help="requests per level and pass at least (more rounds at low concurrency)")
    ap.add_argument("--passes", type=int, default=2,
                    help="passes over the levels, pooled per level (the host's speed drifts over minutes; "
                         "alternating spreads the drift over every level)")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 64 tiny, 32 else)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in words")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma-separated: " + ", ".join(ENGINES) + "; ours@N / ours-native@N: --prefill-chunk N; "
                         "ours-native+cacheK: --prompt-cache K (e.g. ours-native+cache0: no prompt cache)")
    ap.add_argument("--interleave", action="store_true",
                    help="every server up at once, each level run engine after engine (order reversed every "
                         "pass): the host's drift falls on all engines alike")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="plm serve --prefill-chunk (default: the server's; smaller: shorter stalls of running "
                         "streams when one joins)")
    ap.add_argument("--turns", type=int, default=1,
                    help="requests per conversation: each turn resends the earlier ones and their replies, "
                         "as a chat client does (the table adds the time to first token by turn)")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: the one the script built)")
    ap.add_argument("--workdir", default="runs/edge", help="random checkpoints and GGUFs (shared with edge.py)")
    ap.add_argument("--out", default="runs/bench-serve")
    ap.add_argument("--contention", type=float, default=1.0,
                    help="wait before each level until other processes use less than this share of the CPUs, "
                         "and run it again if they used more during it (1.0: neither; 0.1 on a shared machine)")
    ap.add_argument("--max-wait", type=float, default=300, help="longest wait for a quiet machine per level (s)")
    ap.add_argument("--retries", type=int, default=3,
                    help="runs of a level while others used more than --contention of the CPUs during it")
    ap.add_argument("--decoder-alone", type=int, default=None, metavar="PROMPT_TOKENS",
                    help="instead of the servers: the native decoder's prefill and batched step at each "
                         "concurrency, prompts of this many tokens (writes OUT/decoder-MODEL.md)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the engines of OUT/serve-MODEL.json that this run does not measure (rerun one "
                         "engine into an earlier run's table; each engine's own time stays in the JSON)")
    args = ap.parse_args()
    if args.turns < 1:
        ap.error(f"--turns must be at least 1, got {args.turns}")
    names = args.engines.split(",")
    for e in names:
        try:
            engine_parts(e)
        except ValueError as err:
            ap.error(str(err))
    if len(set(names)) < len(names):
        ap.error(f"an engine named twice in --engines {args.engines}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.model or ["tiny"]:
        if args.decoder_alone:
            gguf = gguf_q8(checkpoint(model, args), Path(args.workdir))
            from plm.bench.edge import machine_info
            info = machine_info(args.threads)
            md = (f"Command: `python benchmarks/serve.py {' '.join(sys.argv[1:])}`  \nMachine: {info['cpu']}, "
                  f"{info['cores']} cores, {args.threads} threads; {gguf.name}\n\n"
                  + decoder_alone(gguf, [int(c) for c in args.concurrency.split(",")], args.decoder_alone, args.threads))
            (out / f"decoder-{model}.md").write_text(md)
            print(md)
            continue
        res = bench_model(model, args)
        old = out / f"serve-{model}.json"
        if args.keep and old.exists():
            res = keep_earlier(json.loads(old.read_text()), res)
        (out / f"serve-{model}.json").write_text(json.dumps(res, indent=2))
        md = markdown(res)
        (out / f"serve-{model}.md").write_text(md)
        plot(res, out / f"serve-{model}.png")
        print(md)
        log(f"wrote {out / f'serve-{model}.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
