"""Edge benchmark: PLM's edge runtimes against llama.cpp on the same machine, same threads.

For a checkpoint (or a preset with random weights, optionally with a chosen relu² sparsity) it
measures, for every engine, prefill and decode tokens/s at each context (the cache is filled to
the context, then `--decode-tokens` greedy tokens are decoded), the engine's RSS and KV-cache
bytes, the memory read bandwidth around every few decode steps (roofline = bandwidth / bytes read
per token, at the moment: see measure_stages) and, for the native decoder, the step against its kernels timed apart (per-token
overhead); then decode under memory budgets (the PyTorch runtime's layer-wise loading), the
PyTorch sparse-MLP kernel sweep, and, on a given checkpoint, perplexity and KL to the float
model of each weight format, ours and llama.cpp's. Engines: `ours-*` (native decoder; the block
formats read llama.cpp's own quantised GGUF files), `torch-*` (PyTorch runtime), `llama-*`.
Every engine runs in its own process, one after another.

    python benchmarks/edge.py --preset plm-1.8b --threads 2            # the full run
    python benchmarks/edge.py --preset plm-1.8b --sparsity 0.909 ...    # whole-model sparse decode
    python benchmarks/edge.py --quick                                   # a few minutes
    python benchmarks/edge.py --ckpt runs/my-model --data some.txt      # a trained model (+ quality)
    (the pipeline's bench stage calls `run`)

Writes edge.json, edge.md and edge.png in --out. Numbers come from this machine at run
time; the markdown says which machine, which load, and which command.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plm.errors import PLMError
from plm.utils import cpu_name, peak_rss_bytes, rss_bytes

PACKAGE = Path(__file__).resolve().parents[1]  # plm/: its sources are the default prompt text

# engine name -> how it runs. ours-*: the native decoder (plm.infer.native_decoder): bf16 from
# the checkpoint, the block formats from llama.cpp's own GGUF files (the very weights llama.cpp
# runs); torch-*: the PyTorch edge runtime (plm.infer.runtime), the naive path kept for reference,
# layer-wise loading and the full-K/V cache; llama-*: llama.cpp through llama-cpp-python.
OURS = {
    "ours-bf16": dict(fmt="bf16"),
    "ours-f16": dict(gguf="f16"),
    "ours-q8_0": dict(gguf="q8_0"),
    "ours-q4_0": dict(gguf="q4_0"),
    "ours-q4_k_m": dict(gguf="q4_k_m"),
    "ours-q5_k_m": dict(gguf="q5_k_m"),
}
OURS.update({f"{k}-sparse": dict(v, sparse=True) for k, v in list(OURS.items())})
TORCH = {
    "torch-bf16": dict(dtype="bfloat16", kv="latent", sparse="off", quant="none"),
    "torch-bf16-sparse": dict(dtype="bfloat16", kv="latent", sparse="auto", quant="none"),
    "torch-bf16-fullkv": dict(dtype="bfloat16", kv="full", sparse="off", quant="none"),
    "torch-int8": dict(dtype="bfloat16", kv="latent", sparse="off", quant="int8"),
    "torch-int4": dict(dtype="bfloat16", kv="latent", sparse="off", quant="int4"),
}
LLAMA = {
    "llama-f16": dict(gguf="f16", flash_attn=False),
    "llama-q8_0": dict(gguf="q8_0", flash_attn=False),
    "llama-q4_0": dict(gguf="q4_0", flash_attn=False),
    "llama-q4_k_m": dict(gguf="q4_k_m", flash_attn=False),
    "llama-q5_k_m": dict(gguf="q5_k_m", flash_attn=False),
    "llama-f16-fa": dict(gguf="f16", flash_attn=True),
    "llama-q8_0-fa": dict(gguf="q8_0", flash_attn=True),
}
# llama.cpp 0.3.36's flash-attention path aborts for `plm` (GGML_ASSERT a->ne[0] == b->ne[0] while
# reserving the graph: K is 192-d, V 128-d), so the default compares against its standard path;
# the -fa engines stay selectable for a later llama.cpp.
DEFAULT_ENGINES = ["ours-bf16", "ours-q8_0", "ours-q4_0", "ours-q4_k_m", "torch-bf16", "torch-int8",
                   "llama-f16", "llama-q8_0", "llama-q4_0", "llama-q4_k_m"]
SPARSE_ENGINES = ["ours-bf16-sparse", "ours-q8_0-sparse", "ours-q4_k_m-sparse"]  # added with --sparsity
# the same weight format on both sides: (ours, llama.cpp, label)
PAIRS = [("ours-bf16", "llama-f16", "16-bit (bf16 / F16)"), ("ours-q8_0", "llama-q8_0", "Q8_0"),
         ("ours-q4_0", "llama-q4_0", "Q4_0"), ("ours-q4_k_m", "llama-q4_k_m", "Q4_K_M"),
         ("ours-q5_k_m", "llama-q5_k_m", "Q5_K_M")]  # Q5_K_M: --engines only
ALL_ENGINES = {**OURS, **TORCH, **LLAMA}


def log(msg: str) -> None:
    print(f"[edge {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# workers (run in a subprocess each)


class Quiet:
    """Contention guard: the machine is shared, and a busy neighbour on a 2-core box stalls
    every parallel region. Each timed section waits for an idle machine, measures how much CPU
    other processes used during it (from /proc/stat minus this process's own CPU time), and is
    repeated when that share is above `limit`. Every result records the share it ran under."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, limit: float = 0.1, retries: int = 3, max_wait: float = 600, helper=None) -> None:
        self.limit, self.retries, self.max_wait = limit, retries, max_wait
        self.ncpu = os.cpu_count() or 1
        self.helper = helper  # a Prober: its CPU time is the measurement's own, not contention

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / Quiet.HZ  # all but idle and iowait, seconds

    def snapshot(self) -> tuple[float, float, float]:
        t = os.times()
        return time.perf_counter(), self._busy(), t.user + t.system + (self.helper.cpu_s if self.helper else 0.0)

    def other_share(self, s0, s1) -> float:
        wall = s1[0] - s0[0]
        return max(0.0, ((s1[1] - s0[1]) - (s1[2] - s0[2])) / (wall * self.ncpu)) if wall > 0 else 0.0

    def wait_idle(self) -> float:
        """Wait until other processes use < limit of the CPUs over two 2 s windows."""
        t0, ok = time.perf_counter(), 0
        while self.limit < 1 and time.perf_counter() - t0 < self.max_wait:
            s0 = self.snapshot()
            time.sleep(2)
            ok = ok + 1 if self.other_share(s0, self.snapshot()) < self.limit else 0
            if ok >= 2:
                break
        return time.perf_counter() - t0

    def measure(self, fn, rollback=None) -> dict:
        """Run fn() (returns a dict with timings) until it ran on a quiet machine; rollback()
        undoes its effect before a retry. Keeps the least contended attempt."""
        best = None
        for attempt in range(1, self.retries + 1):
            waited = self.wait_idle()
            s0 = self.snapshot()
            res = fn()
            share = self.other_share(s0, self.snapshot())
            res.update(other_cpu_share=round(share, 3), attempts=attempt, waited_s=round(waited, 1))
            if best is None or share < best["other_cpu_share"]:
                best = res
            if share <= self.limit:
                break
            log(f"  contended ({100 * share:.0f}% of the CPUs used by other processes); retrying")
            if rollback is not None and attempt < self.retries:
                rollback()
        best["contended"] = best["other_cpu_share"] > self.limit
        return best


def warm_steps(times: list) -> list:
    """The timed decode steps that count: the first step after a prefill is a warm-up."""
    return times[1:] if len(times) > 2 else times


def _stage_result(ctx: int, n_new: int, pre: dict, dec: dict, **extra) -> dict:
    times = dec["times"]
    warm = warm_steps(times)
    win = decode_windows(times, dec.get("probes") or [])
    if win:
        extra = {**extra, "windows": win, "read_gb_s": windows_gb_s(win)}
    return {"context": ctx, "prefill_tokens": n_new, "prefill_s": pre["s"], "prefill_tok_s": n_new / pre["s"],
            "decode_tok_s": len(warm) / sum(warm), "decode_tok_s_median": 1 / float(np.median(warm)),
            "decode_ms": [round(t * 1e3, 2) for t in times], "greedy": dec["greedy"],
            "prefill_other_cpu_share": pre["other_cpu_share"], "decode_other_cpu_share": dec["other_cpu_share"],
            "attempts": [pre["attempts"], dec["attempts"]],
            "contended": bool(pre["contended"] or dec["contended"]), **extra}


class Session:
    """One engine's batch-1 sequence, as the stage loop drives it."""

    def prefill(self, ids: list[int]) -> int: ...  # append ids; argmax of the last logits
    def step(self, tok: int) -> int: ...  # one token; argmax of its logits
    def truncate(self, n: int) -> None: ...  # forget positions n and after
    def kv_bytes(self) -> int | None: ...


PROBE_EVERY = 4  # decode steps between two bandwidth probes
PROBE_BYTES = 256 << 20  # each probe's buffer: 8x this host kind's 32 MiB L3
PROBE_MIN_WEIGHTS = 256 << 20  # smaller models decode from the caches: no roofline, no probes


def decode_windows(times: list[float], probes: list[tuple[int, float]]) -> list[dict]:
    """The decode steps cut at the bandwidth probes taken between them: per window of steps
    between two probes, its tok/s and the mean of the two probes (GB/s). probes: (number of
    steps before the probe, GB/s). The warm-up step (warm_steps) counts in no window."""
    first = len(times) - len(warm_steps(times))
    out = []
    for (i0, b0), (i1, b1) in zip(probes, probes[1:]):
        steps = times[max(i0, first):i1]
        if steps:
            out.append({"steps": len(steps), "tok_s": len(steps) / sum(steps), "read_gb_s": (b0 + b1) / 2})
    return out


def windows_gb_s(windows: list[dict]) -> float:
    """A stage's bandwidth when it has windows: the median of theirs."""
    return float(np.median([w["read_gb_s"] for w in windows]))


def measure_stages(a: dict, sess: Session, res: dict, extra=None) -> None:
    """For each context: prefill up to it (timed), then decode `decode_tokens` greedy tokens
    (timed per token), each redone while the machine is contended; `extra(ctx, decode)` adds
    engine-specific fields to the stage.

    The roofline needs the memory bandwidth of the moment: on a shared host it moves between
    about 30 and 56 GB/s within minutes, often within seconds, so one probe per run, or one after
    each decode, can land in another phase than the steps it is compared with. So for a model
    that decodes from memory (weights >= PROBE_MIN_WEIGHTS) a short read probe runs before the
    first step, after every PROBE_EVERY steps and after the last, outside the steps' timings,
    and each window of steps is compared with the mean of the two probes around it
    (decode_windows, roofline)."""
    tokens = np.load(a["tokens"]).tolist()
    probe = Prober(a["threads"], PROBE_BYTES)
    try:
        _measure_stages(a, sess, res, extra, tokens, probe, (res.get("weight_bytes") or 0) >= PROBE_MIN_WEIGHTS)
    finally:
        probe.close()


def _measure_stages(a: dict, sess: Session, res: dict, extra, tokens: list[int], probe, windows: bool) -> None:
    quiet = Quiet(a.get("contention", 0.1), a.get("retries", 3), helper=probe)
    length = 0
    for ctx in a["contexts"]:
        start, state = length, {}

        def prefill():
            t0 = time.perf_counter()
            state["first"] = sess.prefill(tokens[start:ctx])
            return {"s": time.perf_counter() - t0}

        pre = quiet.measure(prefill, lambda: sess.truncate(start))
        kv = sess.kv_bytes()

        def decode():
            sess.truncate(ctx)
            nxt, gen, times, probes = state["first"], [], [], []
            for i in range(a["decode_tokens"]):
                if windows and i % PROBE_EVERY == 0:
                    probes.append((i, probe()))
                gen.append(nxt)
                # teacher-forced: feed the text's next token (the argmax is still recorded), so the
                # activations stay those of real text, not of a random model's degenerate output
                feed = tokens[ctx + i] if a.get("teacher_force") else nxt
                t0 = time.perf_counter()
                nxt = sess.step(feed)
                times.append(time.perf_counter() - t0)
            if windows:
                probes.append((len(times), probe()))
            return {"times": times, "greedy": gen, "probes": probes}

        dec = quiet.measure(decode)
        rss = rss_bytes()  # before the kernel timings below allocate
        length = ctx + a["decode_tokens"]
        bw = {} if windows else {"read_gb_s": probe()}  # the windows' median, else one probe right after
        st = _stage_result(ctx, ctx - start, pre, dec, kv_bytes=kv, rss=rss, **bw, **(extra(ctx, dec) if extra else {}))
        res["stages"].append(st)
        log(f"{a['engine']} ctx {ctx}: prefill {st['prefill_tok_s']:.1f} tok/s, decode {st['decode_tok_s']:.2f} tok/s"
            + (" (contended)" if st["contended"] else ""))
    # the engine's memory: its RSS right after each decode, before the measurement's own buffers
    res["peak_rss"] = max(st["rss"] for st in res["stages"])
    res["peak_rss_process"] = peak_rss_bytes()


def worker_torch(a: dict) -> dict:
    """The PyTorch edge runtime (the naive path)."""
    import torch
    from plm.infer.runtime import EdgeOptions, EdgeRuntime

    torch.set_num_threads(a["threads"])
    opts = EdgeOptions(**TORCH[a["engine"]], memory_budget=a.get("budget"), threads=a["threads"],
                       predictor=a.get("predictor"), backend="torch")
    t0 = time.perf_counter()
    rt = EdgeRuntime.from_checkpoint(a["ckpt"], opts)
    res = {"engine": a["engine"], "load_s": time.perf_counter() - t0, "weight_bytes": rt.weight_bytes(),
           "rss_after_load": rss_bytes(), "resident_layers": rt.layers.n_resident,
           "layers": rt.config.num_hidden_layers, "stages": []}
    cache = rt.new_cache(1, max(a["contexts"]) + a["decode_tokens"] + 8)

    class S(Session):
        def prefill(self, ids):
            return int(rt.forward(torch.tensor([ids]), None, cache).argmax(-1))

        def step(self, tok):
            return int(rt.forward(torch.tensor([[tok]]), None, cache).argmax(-1))

        def truncate(self, n):
            cache.length = n

        def kv_bytes(self):
            return cache.nbytes()

    def extra(ctx, dec):
        st = {"kv_values_per_token": cache.values_per_token(), "sparse": rt.stats.as_dict()}
        rt.stats.__init__()
        return st

    measure_stages(a, S(), res, extra)
    res["kv_allocated_bytes"] = cache.allocated_bytes()
    return res


def open_native(a: dict):
    """The native decoder of engine a["engine"]: bf16 from the checkpoint, else llama.cpp's GGUF."""
    from plm.infer.native_decoder import NativeDecoder
    spec = OURS[a["engine"]]
    cap = max(a["contexts"]) + a["decode_tokens"] + 8
    if "gguf" in spec:
        return NativeDecoder.from_gguf(a["gguf"], sparse=spec.get("sparse", False), capacity=cap)
    from safetensors import safe_open

    from plm.model.checkpoint import load_config, weight_map
    files, wm = {}, weight_map(a["ckpt"])

    def get(name):
        f = wm[name]
        if f not in files:
            files[f] = safe_open(str(f), "pt")
        return files[f].get_tensor(name)

    return NativeDecoder.from_state_dict(load_config(a["ckpt"]), get, fmt=spec["fmt"],
                                         sparse=spec.get("sparse", False), capacity=cap)


def layer_kernels(dec) -> tuple[list, object]:
    """Layer 0's matrices and the lm_head, the very packed matrices the decode step reads."""
    return dec.matrices(0), dec.matrices(-1)[0]


def cold_copies(mats: list) -> list[list]:
    """Copies of a layer's matrices until they exceed the last-level cache (512 MiB in all)."""
    from plm.infer import native as nv
    n = -(-(512 << 20) // sum(m.nbytes() for m in mats))
    return [mats] + [[nv.PackedLinear.from_packed(m.data.clone(), m.fmt, m.N, m.K, m.groups, m.sparse) for m in mats]
                     for _ in range(n - 1)]


def kernel_seconds(copies, head, dec, ctx: int, threads: int, rows: int = 1) -> dict:
    """Seconds per step in the matmuls and the attention kernel alone. Layer 0's matrices are
    copied until the copies exceed the last-level cache and timed a layer pass at a time, cycling
    through the copies, so every matrix is read from memory as in the decode step (the same
    matrix timed twice in a row would come from cache); the attention kernel runs the heads one
    thread gets in the decoder, for one sequence. `rows`: activation rows per matrix (the
    sequences of a batched step). Each call comes from Python, so the overhead is a lower bound."""
    import torch
    from plm.infer import native as nv
    c = dec.config
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(m.groups * rows, m.K, generator=g) for m in copies[0]]

    def layer_pass(ms):
        t0 = time.perf_counter()
        for m, x in zip(ms, xs):
            m(x)
        return time.perf_counter() - t0

    for ms in copies:
        layer_pass(ms)
    layer = float(np.median([layer_pass(ms) for _ in range(3) for ms in copies]))
    hx = torch.randn(rows, head.K, generator=g)
    lm = float(np.median([_time_once(lambda: head(hx)) for _ in range(5)]))
    D = c.kv_lora_rank + c.qk_rope_head_dim
    q = torch.randn(c.num_attention_heads, D, generator=g)
    from plm.infer.native_decoder import ATTN_PART
    parts = -(-ctx // ATTN_PART)
    rows = min(ctx, -(-parts // threads) * ATTN_PART)
    cache = torch.randn(rows, D, generator=g).to(torch.bfloat16 if dec.cache_dtype == "bf16" else torch.float32)
    att = float(np.median([_time_once(lambda: nv.attention(q, cache, c.kv_lora_rank, float(c.softmax_scale)))
                           for _ in range(15)]))
    L = c.num_hidden_layers
    return {"matmul_s": L * layer + lm, "attention_s": L * att}


def worker_native(a: dict) -> dict:
    """Our native decoder: a whole step per call into C++."""
    import torch
    torch.set_num_threads(a["threads"])
    t0 = time.perf_counter()
    dec = open_native(a)
    from plm.infer import native as nv
    res = {"engine": a["engine"], "load_s": time.perf_counter() - t0, "weight_bytes": dec.weight_bytes(),
           "rss_after_load": rss_bytes(), "formats": sorted(set(dec.formats.values())), "stages": [],
           "build": f"plm kernels {nv.info().get('isa')}"}
    seq = dec.new_sequence()
    dec.reserve(seq, max(a["contexts"]) + a["decode_tokens"] + 8)
    dense = not OURS[a["engine"]].get("sparse")

    class S(Session):
        def prefill(self, ids):
            return int(dec.prefill(seq, ids, chunk=a.get("chunk", 256)).argmax())

        def step(self, tok):
            return int(dec.step([seq], [tok])[0].argmax())

        def truncate(self, n):  # also where a decode measurement starts: snapshot the counters
            dec.truncate(seq, n)
            mark[:] = [int(v) for v in dec.impl.sparse_stats()]

        def kv_bytes(self):
            return dec.kv_bytes(seq)

    mark = [0, 0, 0]

    def extra(ctx, decode):  # the decode steps' share of active neurons (prefill rows excluded)
        if dense:
            return {}
        rows, active, neurons = (int(v) - m for v, m in zip(dec.impl.sparse_stats(), mark))
        return {"sparse": {"rows": rows, "active_fraction": active / neurons if neurons else float("nan")}}

    measure_stages(a, S(), res, extra)
    if dense:  # after every stage, so that these copies of the weights never count in the RSS above
        mats, head = layer_kernels(dec)
        copies = cold_copies(mats)
        for st in res["stages"]:
            ks = kernel_seconds(copies, head, dec, st["context"], a["threads"])
            warm = warm_steps(st["decode_ms"])
            step = float(np.median(warm)) / 1e3
            st.update(matmul_ms=round(ks["matmul_s"] * 1e3, 3), attention_ms=round(ks["attention_s"] * 1e3, 3),
                      step_ms=round(step * 1e3, 3),
                      overhead_ms=round((step - ks["matmul_s"] - ks["attention_s"]) * 1e3, 3))
    return res


def worker_llama(a: dict) -> dict:
    import llama_cpp

    spec = LLAMA[a["engine"]]
    n_ctx = max(a["contexts"]) + a["decode_tokens"] + 8
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(a["gguf"], n_ctx=n_ctx, n_threads=a["threads"], n_threads_batch=a["threads"],
                          n_batch=512, n_ubatch=512, flash_attn=spec["flash_attn"], verbose=True,
                          logits_all=False)
    n_vocab = llm.n_vocab()
    res = {"engine": a["engine"], "load_s": time.perf_counter() - t0, "rss_after_load": rss_bytes(),
           "n_ctx": n_ctx, "stages": [], "weight_bytes": int(llama_cpp.llama_model_size(llm.model)),  # its tensors' bytes
           "build": llama_build(llama_cpp)}

    def last() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).argmax())

    class S(Session):
        def prefill(self, ids):
            llm.eval(ids)
            return last()

        def step(self, tok):
            llm.eval([tok])
            return last()

        def truncate(self, n):
            llm.n_tokens = n  # eval() drops the KV cells from n_tokens on

        def kv_bytes(self):
            return None  # from llama.cpp's log, in run_worker

    measure_stages(a, S(), res)
    return res


def llama_build(llama_cpp) -> str:
    """Which SIMD the loaded llama.cpp was compiled for (its system info, e.g. `AVX2 = 1 | AVX512 = 0`),
    and where it came from: the record that a `--llama-path` build, not the default one, ran."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    feats = [f.split("=")[0].split()[-1] for f in info.split("|") if f.strip().endswith("= 1")]
    simd = [f for f in feats if f.startswith(("AVX", "F16C", "FMA", "SSE3", "NEON", "AMX"))]
    return (f"llama.cpp {' '.join(simd) or info.strip()[:80]} "
            f"(llama-cpp-python {llama_cpp.__version__}, {Path(llama_cpp.__file__).parent.parent})")


def worker_bandwidth(a: dict) -> dict:
    """STREAM-style read bandwidth over a buffer far larger than the caches, on the benchmark's
    thread count (the memory roofline for batch-1 decode), measured on a quiet machine."""
    nbytes = int(a.get("bytes", 2 << 30))
    r = Quiet(a.get("contention", 0.1), a.get("retries", 3)).measure(
        lambda: {"read_gb_s": read_bandwidth(a["threads"], nbytes)})
    log(f"read bandwidth {r['read_gb_s']:.1f} GB/s ({a['threads']} threads, {nbytes / 2**30:.1f} GiB buffer)")
    return {"buffer_bytes": nbytes, "threads": a["threads"], **r}


def read_bandwidth(threads: int, nbytes: int) -> float:
    """GB/s over an nbytes buffer on `threads` (freed after): see read_speed."""
    import torch
    torch.set_num_threads(threads)
    return read_speed(torch.ones(nbytes // 4, dtype=torch.float32), 3)


def read_speed(x, repeats: int) -> float:
    """GB/s of the fastest of `repeats` passes each of two read kernels over tensor x
    (PyTorch's sum and max: max reads 5-10% faster on the AMD EPYC hosts)."""
    return x.nbytes / min(_time_once(f) for f in (x.sum, x.amax) for _ in range(repeats)) / 1e9


class Prober:
    """Read-bandwidth probes on demand from a helper process (worker_probe), so the measured
    process keeps its own memory and imports (llama.cpp's worker loads no torch, and no probe
    buffer counts in any engine's RSS). Its OpenMP threads sleep between probes (passive wait),
    and `cpu_s`, its CPU time so far, lets Quiet count it as the measurement's own work."""

    def __init__(self, threads: int, nbytes: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
        self.p = subprocess.Popen([sys.executable, "-m", "plm.bench.edge", "--worker", "probe",
                                   json.dumps({"threads": threads, "bytes": nbytes})],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.cpu_s = 0.0
        self._answer()  # its start (imports, the buffer filled) must not overlap a measurement

    def __call__(self) -> float:
        self.p.stdin.write("probe\n")
        self.p.stdin.flush()
        return self._answer()

    def _answer(self) -> float:
        line = self.p.stdout.readline().split()
        if len(line) != 2:
            raise PLMError(f"bandwidth probe process ended (rc {self.p.poll()})")
        self.cpu_s = float(line[1])
        return float(line[0])

    def close(self) -> None:
        self.p.stdin.close()
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()


def worker_probe(a: dict) -> dict:
    """Prober's helper: `0 CPU-seconds` once ready, then for each line on stdin a probe of
    a["bytes"], answered `GB/s CPU-seconds`."""
    import torch
    torch.set_num_threads(a["threads"])
    x = torch.ones(a["bytes"] // 4, dtype=torch.float32)
    t = os.times()
    print(f"0 {t.user + t.system}", flush=True)  # ready
    for _ in sys.stdin:
        gb_s = read_speed(x, 2)
        t = os.times()
        print(f"{gb_s} {t.user + t.system}", flush=True)
    return {}


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker_mlp_sweep(a: dict) -> dict:
    """One MLP of the model's shape: dense kernel vs the sparse down_proj gather (and with a
    predictor, the up_proj row gather) at set activation sparsities. Synthetic activations
    with exactly the given share of zeros; timing only (correctness is in the tests)."""
    import torch
    import torch.nn.functional as F
    from plm.infer.quant import make_linear
    from plm.infer.runtime import RowDown
    from plm.model.checkpoint import load_config

    torch.set_num_threads(a["threads"])
    cfg = load_config(a["ckpt"])
    d, I = cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(0)
    w_up = torch.randn(I, d, generator=g) * 0.02
    w_down = torch.randn(d, I, generator=g) * 0.02
    x = torch.randn(1, d, generator=g).bfloat16()
    rank = a.get("rank", 128)
    A = torch.randn(d, rank, generator=g).bfloat16()
    B = torch.randn(rank, I, generator=g).bfloat16()

    def bench(f, n=30):
        for _ in range(3):
            f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1e3

    out = {"shape": [d, I], "threads": a["threads"], "rows": []}
    quiet = Quiet(a.get("contention", 0.1), a.get("retries", 3))
    for quant in ("none", "int8"):
        up = make_linear(w_up, quant, torch.bfloat16)
        dense_down = make_linear(w_down, quant, torch.bfloat16)
        row_down = RowDown(w_down, quant, torch.bfloat16)
        for sparsity in (0.5, 0.7, 0.8, 0.9, 0.95):
            k = int(round(I * (1 - sparsity)))
            idx = torch.randperm(I, generator=g)[:k].sort().values
            a_full = torch.zeros(1, I, dtype=torch.bfloat16)
            a_full[0, idx] = torch.rand(k, generator=g).bfloat16() + 0.1
            act = a_full != 0

            def sparse_down():
                z = up(x)  # up_proj stays dense
                F.relu(z).square()
                return row_down.gather(a_full, act)

            kp = min(I, int(k * 1.5))  # a predictor computing 1.5x the active rows
            pidx = torch.randperm(I, generator=g)[:kp].sort().values

            def predicted():
                ((x @ A) @ B > 0).any(0).nonzero()
                ap = F.relu(up.rows(pidx, x)).square()
                cols = pidx[:k]
                return row_down.bag(cols, ap[0, :k], torch.tensor([0, k // 2]))

            def timed():
                return {"dense_ms": bench(lambda: dense_down(F.relu(up(x)).square())),
                        "sparse_down_ms": bench(sparse_down), "predictor_ms": bench(predicted)}

            r = quiet.measure(timed)
            out["rows"].append({"quant": quant, "sparsity": sparsity, "predicted_rows": kp, **r})
            dense_ms = r["dense_ms"]
            r = out["rows"][-1]
            log(f"mlp {quant} {sparsity:.2f}: dense {dense_ms:.3f} ms, sparse down {r['sparse_down_ms']:.3f} ms, "
                f"with predictor {r['predictor_ms']:.3f} ms")
    return out


def worker_quality(a: dict) -> dict:
    """Teacher-forced perplexity and mean KL(reference || format) on held-out tokens, for our
    formats (quantised by us, native kernels) and llama.cpp's same formats (its quantiser and
    kernels) on the same weights. Reference: the checkpoint's weights in PyTorch, fp32 math."""
    import torch

    from plm.infer.native_decoder import NativeDecoder
    from plm.model.checkpoint import load_config, load_model

    torch.set_num_threads(a["threads"])
    ids = torch.from_numpy(np.load(a["eval_tokens"]))
    N, T = ids.shape
    with torch.no_grad():
        ref = load_model(a["ckpt"], dtype=torch.float32).eval()
        base = torch.cat([ref(row[None]).logits for row in ids]).float()[..., :load_config(a["ckpt"]).vocab_size]
    del ref
    bl = base[:, :-1].log_softmax(-1)
    out = {"tokens": int(ids.numel()), "sequences": int(N), "reference": "checkpoint weights, PyTorch fp32",
           "rows": []}

    nlls = {}

    def row(name: str, lg: torch.Tensor, **extra):
        logp = lg[:, :-1, :base.shape[-1]].float().log_softmax(-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        nlls[name] = nll
        r = {"weights": name, "perplexity": float(nll.mean().exp()),
             "kl_from_reference": float((bl.exp() * (bl - logp)).sum(-1).mean()),
             "top1_agreement": float((lg[..., :base.shape[-1]].argmax(-1) == base.argmax(-1)).float().mean()), **extra}
        out["rows"].append(r)
        log(f"quality {name}: ppl {r['perplexity']:.4f}, KL {r['kl_from_reference']:.5f}")

    row("reference", base)
    cfg = load_config(a["ckpt"])
    from safetensors.torch import load_file

    from plm.model.checkpoint import weight_map
    sd = {}
    for f in set(weight_map(a["ckpt"]).values()):
        sd.update(load_file(str(f)))
    def steps(dec: NativeDecoder) -> torch.Tensor:
        lg = torch.empty(N, T, cfg.vocab_size)
        for n in range(N):
            s = dec.new_sequence()
            for t in range(T):  # every position's logits: one step each
                lg[n, t] = dec.step([s], [int(ids[n, t])])[0][:cfg.vocab_size]
            dec.free(s)
        return lg

    for fmt in ("bf16", "q8_0", "q4_0", "q4_k", "q4_k_m"):
        dec = NativeDecoder.from_state_dict(cfg, sd.__getitem__, fmt=fmt, capacity=T)
        row(f"ours {fmt}", steps(dec), weight_bytes=dec.weight_bytes())
        del dec
    import llama_cpp
    for kind, path in a.get("ggufs", {}).items():
        llm = llama_cpp.Llama(path, n_ctx=T, n_batch=T, n_ubatch=T, n_threads=a["threads"], logits_all=True,
                              verbose=False)
        lg = torch.empty(N, T, llm.n_vocab())
        for n in range(N):
            llm.reset()
            llm.eval(ids[n].tolist())
            lg[n] = torch.from_numpy(np.asarray(llm.scores[:T], dtype=np.float32))
        row(f"llama.cpp {kind}", lg, gguf_bytes=os.path.getsize(path))
        del llm
        if kind in ("q8_0", "q4_k_m"):  # our kernels on llama.cpp's file: its quantiser, our arithmetic
            row(f"ours on llama.cpp's {kind} file", steps(NativeDecoder.from_gguf(path, capacity=T)))
    from plm.eval.perplexity import paired_perplexity_ratio
    out["paired"] = [{"a": a_, "b": b_, **paired_perplexity_ratio(nlls[a_], nlls[b_])}
                     for a_, b_ in QUALITY_PAIRS if a_ in nlls and b_ in nlls]
    return out


# comparisons reported as paired ratios with their uncertainty: the quality targets' (8-bit against
# bf16 and Q8_0, the Q4_K_M mix against Q4_K_M), plus Q4_0 and 16-bit against llama.cpp's
QUALITY_PAIRS = (("ours q8_0", "ours bf16"), ("ours q8_0", "llama.cpp q8_0"), ("ours q4_0", "llama.cpp q4_0"),
                 ("ours q4_k_m", "llama.cpp q4_k_m"), ("ours bf16", "llama.cpp f16"))


WORKERS = {"ours": worker_native, "torch": worker_torch, "llama": worker_llama, "mlp": worker_mlp_sweep,
           "quality": worker_quality, "bandwidth": worker_bandwidth, "probe": worker_probe}


# ---------------------------------------------------------------------------------------
# driver


def run_worker(kind: str, args: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "plm.bench.edge", "--worker", kind, json.dumps(args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.get("threads", 2)))
    if args.get("isa", "native") != "native":  # our kernels' path, forced (an error if the CPU lacks it)
        env["PLM_NATIVE_ISA"] = args["isa"]
    if args.get("llama_path"):  # another llama_cpp build (e.g. without AVX-512), ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args["llama_path"], env.get("PYTHONPATH")) if p)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        log(f"{kind} {args.get('engine', '')}: timed out after {timeout:.0f}s")
        return {"error": f"timed out after {timeout:.0f}s", **{k: args[k] for k in ("engine",) if k in args}}
    for line in p.stderr.splitlines():
        if line.startswith("[edge"):
            print(line, file=sys.stderr, flush=True)
    if p.returncode != 0:
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        log(f"{kind} {args.get('engine', '')} failed (rc {p.returncode}):\n" + "\n".join(lines[-15:]))
        why = lines[-1].strip() if lines else f"rc {p.returncode}"  # the exception's own message
        return {"error": why[-300:], **{k: args[k] for k in ("engine",) if k in args}}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.time() - t0
    if kind == "llama":  # llama.cpp's own report of its KV cache
        m = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells", p.stderr)
        if m:
            per_cell = float(m.group(1)) * 2**20 / int(m.group(2))
            res["kv_allocated_bytes"] = float(m.group(1)) * 2**20
            res["kv_bytes_per_token"] = per_cell
            for st in res["stages"]:
                st["kv_bytes"] = int(per_cell * st["context"])
        m = re.search(r"K \((\w+)\): .*V \((\w+)\)", p.stderr)
        if m:
            res["kv_types"] = [m.group(1), m.group(2)]
    return res


def ensure_checkpoint(args) -> Path:
    if args.ckpt:
        return Path(args.ckpt)
    from plm.model.checkpoint import init_checkpoint
    if args.sparsity is not None:
        from plm.bench.synthetic import ATTN_SCALE  # in the name: a new construction is a new model
        out = Path(args.workdir) / f"{args.preset}-sparse{args.sparsity:g}-attn{ATTN_SCALE:g}"
    else:
        out = Path(args.workdir) / f"{args.preset}-random"
    if not (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists():
        if args.sparsity is None:
            log(f"creating a random-weight {args.preset} checkpoint (bf16) in {out}")
            init_checkpoint(args.preset, out, seed=0, dtype="bfloat16")
        else:
            from plm.bench.synthetic import sparse_checkpoint
            from plm.data.tokenizer import build_qwen2
            log(f"creating a random-weight {args.preset} checkpoint with {args.sparsity:g} relu² sparsity in {out}")
            ids = source_ids(build_qwen2(), 1024)[:1024]
            sparse_checkpoint(args.preset, args.sparsity, ids, out, seed=0)
    return out


def ensure_gguf(ckpt: Path, kind: str, workdir: Path) -> Path:
    from plm.export.gguf import quantize, write_gguf
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = int(max(p.stat().st_mtime for p in ckpt.glob("*.safetensors")))
    f16 = workdir / f"{ckpt.resolve().name}-{stamp}-f16.gguf"
    if not f16.exists():
        log(f"exporting {f16.name}")
        write_gguf(ckpt, f16, "f16")
    if kind == "f16":
        return f16
    out = workdir / f"{ckpt.resolve().name}-{stamp}-{kind}.gguf"
    if not out.exists():
        log(f"quantising {out.name} with llama.cpp")
        quantize(f16, out, kind)
    return out


def prompt_tokens(ckpt: Path, n: int, path: Path) -> Path:
    """Token ids for the prompts: the tokenizer's own encoding of the package's own sources,
    repeated as needed; ids stay inside the model's vocabulary."""
    from plm.data.tokenizer import Tokenizer
    from plm.model.checkpoint import load_config
    vocab = load_config(ckpt).vocab_size
    ids = [i for i in source_ids(Tokenizer.from_dir(ckpt), 2 * n) if i < vocab]
    while len(ids) < n:
        ids += ids
    np.save(path, np.array(ids[:n], dtype=np.int64))
    return path


def source_ids(tok, n: int) -> list[int]:
    """At least n token ids of the package's own sources (fewer if they are shorter)."""
    ids: list[int] = []
    for p in sorted(PACKAGE.rglob("*.py")):
        ids += tok.encode(p.read_text(errors="ignore"))
        if len(ids) >= n:
            break
    return ids


def eval_tokens(ckpt: Path, sources: list[str] | None, tokens: int, seq_len: int, path: Path,
                text_field: str = "text") -> Path:
    from plm.data.tokenizer import Tokenizer
    from plm.infer.sparsity import sample_sequences
    from plm.model.checkpoint import load_config
    tok = Tokenizer.from_dir(ckpt)
    srcs = sources or [str(p) for p in sorted(PACKAGE.rglob("*.py"))]
    ids = sample_sequences(srcs, tok, tokens, seq_len, text_field, vocab_size=load_config(ckpt).vocab_size)
    np.save(path, ids.numpy())
    return path


def machine_info(threads: int) -> dict:
    import torch
    try:
        import importlib.metadata as md
        llama_v = md.version("llama_cpp_python")
    except Exception:
        llama_v = "not installed"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "memory_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__, "llama_cpp_python": llama_v,
            "loadavg_at_start": os.getloadavg()}


# ---------------------------------------------------------------------------------------
# report


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, s in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {s}"
    return f"{n:.0f} B"


def merge_rounds(rounds: list[dict]) -> dict:
    """One engine's result from its interleaved rounds (every engine ran once per round, in
    turn, so a drift of the host's bandwidth over minutes reaches all engines alike): per
    context the decode steps pooled (each round's first step still a warm-up), prefill time
    summed, the best read bandwidth of the rounds for the roofline, each round's rates kept."""
    ok = [r for r in rounds if "stages" in r]
    if len(ok) < 2:
        return ok[0] if ok else rounds[-1]
    out = dict(ok[0])
    out["stages"] = []
    for st in ok[0]["stages"]:
        same = [st] + [s for s in (_stage(r, st["context"]) for r in ok[1:]) if s]
        warm = [t for s in same for t in warm_steps(s["decode_ms"])]
        pre_s = sum(s["prefill_s"] for s in same)
        windows = [w for s in same for w in s.get("windows", [])]
        merged = dict(st)
        merged.update(
            prefill_s=pre_s, prefill_tok_s=sum(s["prefill_tokens"] for s in same) / pre_s,
            decode_ms=[t for s in same for t in s["decode_ms"]],
            decode_tok_s=1e3 * len(warm) / sum(warm), decode_tok_s_median=1e3 / float(np.median(warm)),
            contended=any(s["contended"] for s in same), rss=max(s["rss"] for s in same),
            read_gb_s=windows_gb_s(windows) if windows else max((s.get("read_gb_s") or 0) for s in same) or None,
            windows=windows,
            rounds=[{"prefill_tok_s": round(s["prefill_tok_s"], 2), "decode_tok_s": round(s["decode_tok_s"], 3)}
                    for s in same])
        out["stages"].append(merged)
    out["peak_rss"] = max(r["peak_rss"] for r in ok)
    out["rounds"] = len(ok)
    return out


def _stage(res: dict, ctx: int) -> dict | None:
    return next((s for s in res.get("stages", []) if s["context"] == ctx), None)


def roofline(results: dict, r: dict, st: dict) -> tuple[float | None, float | None]:
    """(tok/s the measured read bandwidth allows for this engine's bytes per token at this
    context: weights + KV cache, the share of it reached). With probes around the decode
    windows (measure_stages): the medians over the windows of the roofline and of each
    window's tok/s against its own; else the stage's one probe or the run's."""
    if not r.get("weight_bytes"):
        return None, None
    per_token = r["weight_bytes"] + (st.get("kv_bytes") or 0)
    if st.get("windows"):
        roofs = [w["read_gb_s"] * 1e9 / per_token for w in st["windows"]]
        return float(np.median(roofs)), float(np.median([w["tok_s"] / x for w, x in zip(st["windows"], roofs)]))
    bw = st.get("read_gb_s") or (results.get("bandwidth") or {}).get("read_gb_s")
    if not bw:
        return None, None
    roof = bw * 1e9 / per_token
    return roof, st["decode_tok_s"] / roof


def targets(results: dict, contexts: list[int]) -> list[dict]:
    eng = {n: r for n, r in results["engines"].items() if "stages" in r}
    rows = []

    def add(target, measured, met):
        rows.append({"target": target, "measured": measured, "met": bool(met)})

    def ratio(a, b, ctx, key="decode_tok_s"):
        sa, sb = _stage(eng[a], ctx), _stage(eng[b], ctx)
        return (sa[key] / sb[key], sa[key], sb[key]) if sa and sb else None

    near = [c for c in contexts if c <= 1024]
    long = [c for c in contexts if c > 1024]
    for ours, theirs, label in PAIRS:
        if ours not in eng or theirs not in eng:
            continue
        for c in near:
            q = ratio(ours, theirs, c)
            roof, share = roofline(results, eng[ours], _stage(eng[ours], c))
            add(f"{label} decode @{c}: >= 1.0x llama.cpp", f"{q[1]:.2f} vs {q[2]:.2f} tok/s = {q[0]:.2f}x", q[0] >= 1.0)
            if share is not None:
                add(f"{label} decode @{c}: >= 90% of the roofline", f"{100 * share:.0f}% of {roof:.1f} tok/s",
                    share >= 0.9)
        for c in long:
            q = ratio(ours, theirs, c)
            add(f"{label} decode @{c}: >= 1.5x llama.cpp", f"{q[1]:.2f} vs {q[2]:.2f} tok/s = {q[0]:.2f}x", q[0] >= 1.5)
        pc = max((c for c in contexts if c <= 1024), default=None)
        if pc:
            q = ratio(ours, theirs, pc, "prefill_tok_s")
            add(f"{label} prefill @{pc}: >= llama.cpp", f"{q[1]:.1f} vs {q[2]:.1f} tok/s = {q[0]:.2f}x", q[0] >= 1.0)
        sp = ours + "-sparse"
        if sp in eng:
            act = np.mean([s["sparse"]["active_fraction"] for s in eng[sp]["stages"]])
            for c in near:
                q1, q2 = ratio(sp, theirs, c), ratio(sp, ours, c)
                a, b = _stage(eng[sp], c)["greedy"], _stage(eng[ours], c)["greedy"]
                differ = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
                same = differ == 0
                add(f"{label} sparse decode @{c} ({100 * (1 - act):.1f}% zeros): >= 1.35x llama.cpp and >= 1.35x "
                    f"our dense, identical greedy output",
                    f"{q1[0]:.2f}x llama.cpp, {q2[0]:.2f}x dense ({q1[1]:.2f} tok/s); "
                    f"{'argmax at every step' if results.get('teacher_forced') else 'greedy tokens'} identical "
                    f"to dense: {'yes' if same else f'no ({differ} of {max(len(a), len(b))} steps differ)'}",
                    q1[0] >= 1.35 and q2[0] >= 1.35 and same)
    ours_kv = [(n, _stage(eng[n], contexts[-1])) for n in ("ours-bf16", "ours-q8_0") if n in eng]
    llama_kv = [(n, _stage(eng[n], contexts[-1])) for n in LLAMA if n in eng and _stage(eng[n], contexts[-1]).get("kv_bytes")]
    if ours_kv and llama_kv:
        o, t = ours_kv[0], min(llama_kv, key=lambda x: x[1]["kv_bytes"])
        r = o[1]["kv_bytes"] / t[1]["kv_bytes"]
        add(f"KV memory @{contexts[-1]}: <= 1/8 of llama.cpp's",
            f"{o[0]} {_fmt_bytes(o[1]['kv_bytes'])} vs {t[0]} {_fmt_bytes(t[1]['kv_bytes'])} = 1/{1 / r:.2f}", r <= 1 / 8)
    q = {r["weights"]: r for r in (results.get("quality") or {}).get("rows", [])}
    paired = {(p["a"], p["b"]): p for p in (results.get("quality") or {}).get("paired", [])}

    def diff(a: str, b: str) -> str:  # the paired ratio and its 95% interval, where measured
        p = paired.get((a, b))
        return (f"; paired {100 * (p['ratio'] - 1):+.2f}% (95%: {100 * (p['ci95'][0] - 1):+.2f}% to "
                f"{100 * (p['ci95'][1] - 1):+.2f}%, {p['sequences']} sequences)" if p else "")

    if "ours bf16" in q and "ours q8_0" in q:
        b, o8 = q["ours bf16"]["perplexity"], q["ours q8_0"]["perplexity"]
        add("quality: our 8-bit perplexity within 0.5% of bf16",
            f"{o8:.4f} vs {b:.4f} ({100 * (o8 / b - 1):+.2f}%){diff('ours q8_0', 'ours bf16')}", o8 <= b * 1.005)
        if "llama.cpp q8_0" in q:
            l8 = q["llama.cpp q8_0"]["perplexity"]
            add("quality: our 8-bit perplexity <= llama.cpp Q8_0's",
                f"{o8:.4f} vs {l8:.4f}{diff('ours q8_0', 'llama.cpp q8_0')}", o8 <= l8)
    ours4 = "ours q4_k_m" if "ours q4_k_m" in q else "ours q4_k"  # like for like: the same mix of Q4_K and Q6_K
    if ours4 in q and "llama.cpp q4_k_m" in q:
        o4, l4 = q[ours4]["perplexity"], q["llama.cpp q4_k_m"]["perplexity"]
        add(f"quality: our 4-bit ({ours4[5:].upper()}) perplexity <= llama.cpp Q4_K_M's",
            f"{o4:.4f} vs {l4:.4f}{diff(ours4, 'llama.cpp q4_k_m')}", o4 <= l4)
    return rows


def markdown(results: dict) -> str:
    eng = results["engines"]
    ctxs = results["contexts"]
    m = results["machine"]
    L = [f"# Edge benchmark: {results['model']}", ""]
    L.append(f"Command: `{results['command']}`  ")
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; {m['threads']} threads; "
             f"torch {m['torch']}, llama-cpp-python {m['llama_cpp_python']}; load average at start "
             f"{m['loadavg_at_start'][0]:.2f}. Decode: {results['decode_tokens']} "
             + ("teacher-forced steps (the text's next tokens fed, the argmax recorded) "
                if results.get("teacher_forced") else "greedy tokens ")
             + "per context (first one excluded as warm-up); batch 1."
             + (f" Engines ran in {results['rounds']} interleaved rounds (each engine once per round, in turn), "
                "pooled per context: decode steps together, prefill times summed."
                if results.get("rounds", 1) > 1 else ""))
    builds = sorted({r["build"] for r in results["engines"].values() if r.get("build")})
    if builds:  # what each engine's kernels were compiled for / forced to (--isa, --llama-path)
        L.append("")
        L.append("Kernels: " + "; ".join(builds) + ".")
    L.append("")
    bw = results.get("bandwidth") or {}
    if bw.get("read_gb_s"):
        again = " (at the start and end of the run: the best of both)" if bw.get("read_gb_s_at_end") else ""
        windowed = any(s.get("windows") for r in results["engines"].values() for s in r.get("stages", []))
        how = ("the decode is compared with the bandwidth of its moment: "
               f"a {PROBE_BYTES >> 20} MiB probe (from a helper process, the same for every engine) before the "
               f"first step, after every {PROBE_EVERY} steps and after the last, outside the steps' timings; "
               "% = the median over those windows of the window's tok/s / the roofline at the mean of its two "
               "probes; `GB/s` = the median of the windows' bandwidths."
               if windowed else
               f"the bandwidth is probed ({PROBE_BYTES >> 20} MiB) right after each decode measurement; % = decode "
               "tok/s / the roofline at that probe (the `GB/s` columns). (The weights here are small enough to be "
               "read from the caches: the roofline says little.)")
        L.append(f"Read bandwidth (STREAM-style: PyTorch's sum and max over {bw['buffer_bytes'] / 2**30:.0f} GiB, "
                 f"the faster, {bw['threads']} threads, same run{again}): **{bw['read_gb_s']:.1f} GB/s**. Roofline = "
                 "the bandwidth / bytes read per token (weights + KV cache at the context). A shared host's bandwidth "
                 "moves between phases within seconds, so " + how)
        L.append("")
    if results.get("sparsity") is not None:
        L.append(f"Weights: random, built with {results['sparsity']:g} relu² sparsity (plm.bench.synthetic: a constant "
                 "residual channel carries a per-neuron bias calibrated to fire each neuron on the chosen share of "
                 "tokens; active share measured by the sparse engines below).")
        L.append("")
    head = ("| engine | weights | " + " | ".join(f"prefill tok/s @{c}" for c in ctxs) + " | "
            + " | ".join(f"decode tok/s @{c}" for c in ctxs) + " | "
            + " | ".join(f"% roofline @{c}" for c in ctxs) + " | " + " | ".join(f"GB/s @{c}" for c in ctxs)
            + f" | KV bytes @{ctxs[-1]} | RSS |")
    L += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in eng.items():
        if "error" in r:
            L.append(f"| {name} | failed: {r['error'][:80]} |")
            continue

        def cell(c, key, fmt, share_key):
            st = _stage(r, c)
            if not st or st.get(key) is None:
                return "-"
            return format(st[key], fmt) + (" †" if st.get(share_key, 0) > results.get("contention", 0.1) else "")

        def roof(c):
            st = _stage(r, c)
            share = roofline(results, r, st)[1] if st else None
            return "-" if share is None else f"{100 * share:.0f}%"

        kv = (_stage(r, ctxs[-1]) or {}).get("kv_bytes")
        L.append(f"| {name} | {_fmt_bytes(r.get('weight_bytes'))} | "
                 + " | ".join(cell(c, "prefill_tok_s", ".1f", "prefill_other_cpu_share") for c in ctxs) + " | "
                 + " | ".join(cell(c, "decode_tok_s", ".2f", "decode_other_cpu_share") for c in ctxs) + " | "
                 + " | ".join(roof(c) for c in ctxs) + " | "
                 + " | ".join(cell(c, "read_gb_s", ".0f", "decode_other_cpu_share") for c in ctxs)
                 + f" | {_fmt_bytes(kv)} | {_fmt_bytes(r.get('peak_rss'))} |")
    L.append("")
    L.append("† = measured while other processes used more than "
             f"{100 * results.get('contention', 0.1):.0f}% of the CPUs (after {results.get('retries', 3)} attempts); "
             "treat as a lower bound. Decode tok/s = tokens / time over the timed steps.")
    L.append("")
    L.append("Engines: `ours-*` = the native decoder (plm.infer.native_decoder: one C++ call per token, latent KV "
             "cache; `ours-bf16` from the checkpoint, the others from llama.cpp's own GGUF files, the same weights "
             "the `llama-*` row runs; `-sparse` = exact sparse down projection); `torch-*` = the PyTorch edge "
             "runtime (the naive path; `fullkv` = full K/V cache, `sparse` = `--sparse auto`); `llama-*` = "
             "llama.cpp via llama-cpp-python (GGUF from our converter, K-quants from llama.cpp's quantiser; KV "
             "cache f16, its default). Weights = bytes of weights read per token. RSS = the engine process's "
             "resident memory right after its decodes (the largest over contexts).")
    L.append("")
    over = [(n, s) for n, r in eng.items() for s in r.get("stages", []) if "overhead_ms" in s]
    if over:
        L += ["## Per-token overhead of the native decoder", "",
              "The decode step against its kernels timed apart: layer 0's matrices in the same formats, copied past "
              "the last-level cache and timed a layer at a time cycling through the copies (weights come from memory, "
              "as in the step), times the layers, plus the lm_head; the attention kernel, every head over the cached "
              "rows one thread gets (its share of the 256-row parts), times the layers. Overhead = step - matmuls - attention: norms, RoPE, "
              "the residual stream, thread hand-offs and the one call from Python (each kernel is timed with its own "
              "call from Python, so this is a lower bound).",
              "", "| engine | context | step ms | matmuls ms | attention ms | overhead ms |", "|---|---|---|---|---|---|"]
        for n, st in over:
            L.append(f"| {n} | {st['context']} | {st['step_ms']:.2f} | {st['matmul_ms']:.2f} | {st['attention_ms']:.2f} "
                     f"| {st['overhead_ms']:.2f} |")
        L.append("")
    if results.get("targets"):
        L += ["## Targets", ""]
        from plm.model.config import PLMConfig
        big = PLMConfig.from_preset("plm-1.8b")
        if any(results["config"][k] != getattr(big, k) for k in results["config"]):
            L += ["The targets are stated for the PLM-1.8B shape; this model is another shape, so the rows below "
                  "say where it stands, not whether the targets are met (per-token Python overhead dominates "
                  "a model this small).", ""]
        L += ["| target | measured | met |", "|---|---|---|"]
        for t in results["targets"]:
            L.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        L.append("")
    if results.get("budgets"):
        L += ["## Layer-wise loading: decode speed under a memory budget", "",
              f"Context {results['budgets'][0]['stages'][0]['context']}; weights that do not fit are streamed from the "
              "memory-mapped safetensors each token (the file stays in the OS page cache on this machine, so this "
              "measures page-fault and copy cost, not storage speed).", "",
              "| budget | resident layers | resident weights | decode tok/s | peak RSS |", "|---|---|---|---|---|"]
        for b in results["budgets"]:
            if "error" in b:
                L.append(f"| {b.get('budget_label')} | failed: {b['error'][:60]} | | | |")
                continue
            st = b["stages"][0]
            L.append(f"| {b['budget_label']} | {b['resident_layers']}/{b['layers']} | {_fmt_bytes(b['weight_bytes'])} "
                     f"| {st['decode_tok_s']:.2f} | {_fmt_bytes(b['peak_rss'])} |")
        L.append("")
    if results.get("mlp_sweep") and "rows" in results["mlp_sweep"]:
        sw = results["mlp_sweep"]
        L += ["## Sparse MLP kernel against activation sparsity (one MLP, decode, ms)", "",
              f"Shape d={sw['shape'][0]}, I={sw['shape'][1]}, {sw['threads']} threads; synthetic activations with the "
              "given share of exact zeros; the predictor column computes 1.5x the active up_proj rows.", "",
              "| weights | inactive | dense | sparse down_proj | speed-up | + predictor (up rows) | speed-up |",
              "|---|---|---|---|---|---|---|"]
        for r in sw["rows"]:
            L.append(f"| {r['quant']} | {100 * r['sparsity']:.0f}% | {r['dense_ms']:.3f} | {r['sparse_down_ms']:.3f} | "
                     f"{r['dense_ms'] / r['sparse_down_ms']:.2f}x | {r['predictor_ms']:.3f} | "
                     f"{r['dense_ms'] / r['predictor_ms']:.2f}x |")
        L.append("")
    if results.get("quality") and "rows" in results["quality"]:
        q = results["quality"]
        L += ["## Quality at equal bits (teacher-forced)", "",
              f"{q['sequences']} sequences, {q['tokens']} tokens of {results.get('quality_data', 'repository text')}; "
              f"reference: {q['reference']}. `ours` = our quantiser and kernels; `llama.cpp` = its quantiser (K-quants) "
              "and kernels on the same weights.", "",
              "| weights | perplexity | mean KL(reference ‖ weights) | top-1 agreement |", "|---|---|---|---|"]
        for r in q["rows"]:
            L.append(f"| {r['weights']} | {r['perplexity']:.4f} | {r['kl_from_reference']:.5f} | "
                     f"{r['top1_agreement']:.4f} |")
        L.append("")
        if q.get("paired"):
            L += ["Paired on the same tokens (perplexity ratio A / B from the mean per-token log-likelihood "
                  "difference; the interval from its standard error over the sequences):", "",
                  "| A | B | ratio | 95% interval |", "|---|---|---|---|"]
            L += [f"| {p['a']} | {p['b']} | {p['ratio']:.5f} | {p['ci95'][0]:.5f} to {p['ci95'][1]:.5f} |"
                  for p in q["paired"]]
            L.append("")
    return "\n".join(L) + "\n"


def plot(results: dict, out: Path) -> None:
    from plm.bench.plot import png
    n = 3 if results.get("budgets") else 2
    with png(out, n, (5.5 * n, 4.2), f"{results['model']}, {results['machine']['threads']} threads", dpi=110) as axes:
        _draw(results, axes)


def _draw(results: dict, axes) -> None:
    eng = {k: v for k, v in results["engines"].items() if "stages" in v}
    for name, r in eng.items():
        c = [s["context"] for s in r["stages"]]
        ls = "--" if name.startswith("llama") else "-"
        axes[0].plot(c, [s["decode_tok_s"] for s in r["stages"]], ls, marker="o", label=name)
        if r["stages"][0].get("kv_bytes"):
            axes[1].plot(c, [s["kv_bytes"] / 2**20 for s in r["stages"]], ls, marker="o", label=name)
    axes[0].set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s", title="decode speed")
    axes[1].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache (MiB)", title="KV cache")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    if results.get("budgets"):
        bs = [b for b in results["budgets"] if "stages" in b]
        axes[2].plot([b["weight_bytes"] / 2**30 for b in bs], [b["stages"][0]["decode_tok_s"] for b in bs], marker="o")
        for b in bs:
            axes[2].annotate(b["budget_label"], (b["weight_bytes"] / 2**30, b["stages"][0]["decode_tok_s"]),
                             fontsize=7)
        axes[2].set(xlabel="resident weights (GiB)", ylabel="decode tokens/s", title="layer-wise loading")


@dataclass
class EdgeBenchSettings:
    """What one benchmark run measures (benchmarks/edge.py's flags; the pipeline's bench stage)."""

    ckpt: str | None = None  # checkpoint directory; None: random weights of `preset`
    preset: str = "plm-1.8b"
    quick: bool = False  # plm-300m preset, contexts 64/1024, fewer engines: a few minutes on 2 cores
    threads: int = 2
    contexts: str = "64,1024,4000"
    decode_tokens: int = 16
    engines: str | None = None  # comma list (default: DEFAULT_ENGINES, + SPARSE_ENGINES with --sparsity)
    sparsity: float | None = None  # random weights built with this share of relu² zeros (plm.bench.synthetic)
    teacher_force: bool | None = None  # decode feeding the text's next tokens (default: with --sparsity)
    budgets: str = "0.75,0.5,0.3"  # torch-bf16 memory budgets, fractions of the bf16 weights ("" to skip)
    no_sweep: bool = False  # skip the PyTorch sparse-MLP kernel sweep
    no_quality: bool = False  # skip the quality check (it runs on a given --ckpt only)
    data: list[str] | None = None  # text for the quality check
    text_field: str = "text"
    quality_tokens: int = 8192  # 32 sequences of 256: quantisations differ by tenths of a percent
    predictor: str | None = None  # predictor file for the ours-* sparse engines
    workdir: str = "runs/edge"  # random checkpoints and GGUFs are cached here
    out: str | None = None  # output folder (default WORKDIR/bench-MODEL)
    timeout: float = 3600  # seconds per engine
    contention: float = 0.1  # redo a timed section when other processes took more of the CPUs than this
    retries: int = 3  # attempts per timed section
    rounds: int = 1  # interleaved passes over the engines, pooled per engine and context
    isa: str = "native"  # our kernels' path: native (the best this CPU runs), amx, avx512, avx2 or scalar
    llama_path: str | None = None  # a folder holding another llama_cpp build (pip install --target), used instead
    command: str = ""  # how this run was asked for, for the report


def main(argv: list[str] | None = None) -> int:
    """`python -m plm.bench.edge --worker KIND JSON`: one engine's measurement, in its own process."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "--worker" or args[1] not in WORKERS:
        raise SystemExit("usage: python -m plm.bench.edge --worker KIND JSON (run benchmarks/edge.py instead)")
    print(json.dumps(WORKERS[args[1]](json.loads(args[2]))))
    return 0


def run(args: EdgeBenchSettings) -> tuple[dict, str]:
    """Run the benchmark; returns the results and the markdown (both also written to args.out)."""
    args = dataclasses.replace(args)
    command = args.command or "python benchmarks/edge.py"
    if args.quick:
        args.preset = "plm-300m" if not args.ckpt else args.preset
        if args.contexts == "64,1024,4000":
            args.contexts = "64,1024"
        args.decode_tokens = min(args.decode_tokens, 8)
        if args.engines is None:
            args.engines = "ours-bf16,ours-q8_0,ours-q4_k_m,llama-f16,llama-q8_0,llama-q4_k_m"
        if args.budgets == "0.75,0.5,0.3":
            args.budgets = "0.5"
        args.quality_tokens = min(args.quality_tokens, 256)
    contexts = [int(c) for c in args.contexts.split(",")]
    engines = (args.engines.split(",") if args.engines
                else DEFAULT_ENGINES + (SPARSE_ENGINES if args.sparsity is not None else []))
    for e in engines:
        if e not in ALL_ENGINES:
            raise PLMError(f"--engines: unknown engine {e!r}; choose from {', '.join(ALL_ENGINES)}")
    if args.sparsity is not None and args.ckpt:
        raise PLMError("--sparsity builds random weights; it cannot be combined with --ckpt")
    from plm.infer.native import ISAS
    if args.isa not in ("native", *ISAS):
        raise PLMError(f"--isa must be native, {', '.join(ISAS[:-1])} or {ISAS[-1]}, got {args.isa!r}")
    if args.llama_path and not (Path(args.llama_path) / "llama_cpp" / "__init__.py").is_file():
        raise PLMError(f"--llama-path {args.llama_path}: no llama_cpp package there (make one with "
                       "`pip install --target DIR --no-deps <wheel>`, the wheel from scripts/build_llama_wheel.sh)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(args)
    from plm.model.checkpoint import load_config
    cfg = load_config(ckpt)
    if max(contexts) + args.decode_tokens > cfg.max_position_embeddings:
        raise PLMError(f"--contexts: context {max(contexts)} + {args.decode_tokens} exceeds the model's "
                 f"max_position_embeddings {cfg.max_position_embeddings}")
    name = ckpt.resolve().name
    out = Path(args.out or workdir / f"bench-{name}")
    out.mkdir(parents=True, exist_ok=True)
    toks = prompt_tokens(ckpt, max(contexts) + args.decode_tokens, out / "prompt.npy")
    results = {"model": name, "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers",
                                                                         "intermediate_size", "vocab_size",
                                                                         "kv_lora_rank")},
               "command": command, "contexts": contexts, "decode_tokens": args.decode_tokens,
               "sparsity": args.sparsity, "machine": machine_info(args.threads), "engines": {},
               "contention": args.contention, "retries": args.retries, "rounds": args.rounds}
    if args.rounds < 1:
        raise PLMError(f"--rounds must be at least 1, got {args.rounds}")
    results.update(isa=args.isa, llama_path=args.llama_path)
    teacher = args.teacher_force if args.teacher_force is not None else args.sparsity is not None
    results["teacher_forced"] = teacher
    base = {"ckpt": str(ckpt), "tokens": str(toks), "contexts": contexts, "decode_tokens": args.decode_tokens,
            "teacher_force": teacher,
            "threads": args.threads, "contention": args.contention, "retries": args.retries,
            "isa": args.isa, "llama_path": args.llama_path}

    def save():
        results["targets"] = targets(results, contexts)
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        (out / "edge.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "edge.md").write_text(markdown(results))
        try:
            plot(results, out / "edge.png")
        except Exception as e:  # a plot must not lose the numbers
            log(f"plot failed: {e}")

    log("read bandwidth probe")
    results["bandwidth"] = run_worker("bandwidth", {"threads": args.threads, "contention": args.contention,
                                                    "retries": args.retries}, args.timeout)
    measured: dict[str, list[dict]] = {e: [] for e in engines}
    for rnd in range(args.rounds):  # rounds interleave: every engine once per round
        for e in engines:
            log(f"engine {e}" + (f", round {rnd + 1}/{args.rounds}" if args.rounds > 1 else ""))
            if e in TORCH:
                r = run_worker("torch", {**base, "engine": e, "predictor": args.predictor}, args.timeout)
            else:
                kind = ALL_ENGINES[e].get("gguf")
                try:
                    g = ensure_gguf(ckpt, kind, workdir) if kind else None
                except Exception as ex:  # no llama-cpp-python, or its quantiser failed
                    results["engines"][e] = {"engine": e, "error": f"GGUF: {ex}"}
                    continue
                r = run_worker("llama" if e in LLAMA else "ours",
                               {**base, "engine": e, "gguf": str(g) if g else None}, args.timeout)
            measured[e].append(r)
            results["engines"][e] = merge_rounds(measured[e])
            save()
    if args.budgets:
        full = next((r for n, r in results["engines"].items() if n == "torch-bf16" and "weight_bytes" in r), None)
        wbytes = full["weight_bytes"] if full else None
        results["budgets"] = []
        if wbytes:
            results["budgets"].append({**full, "budget_label": "none (all resident)",
                                       "stages": [full["stages"][0]]})
            for frac in [float(f) for f in args.budgets.split(",") if f]:
                label = f"{frac:.0%} ({_fmt_bytes(frac * wbytes)})"
                log(f"budget {label}")
                r = run_worker("torch", {**base, "engine": "torch-bf16", "budget": int(frac * wbytes),
                                        "contexts": [contexts[0]], "decode_tokens": max(4, args.decode_tokens // 2)},
                               args.timeout)
                r["budget_label"] = label
                results["budgets"].append(r)
                save()
    if not args.no_sweep:
        log("sparse MLP kernel sweep")
        results["mlp_sweep"] = run_worker("mlp", {"ckpt": str(ckpt), "threads": args.threads,
                                                  "contention": args.contention, "retries": args.retries},
                                          args.timeout)
        save()
    if not args.no_quality and args.ckpt:  # random weights have no quality to lose
        log("quality at equal bits")
        ev = eval_tokens(ckpt, args.data, args.quality_tokens, min(256, args.quality_tokens), out / "eval.npy",
                         args.text_field)
        ggufs = {}
        for kind in ("f16", "q8_0", "q4_0", "q4_k_m"):
            try:
                ggufs[kind] = str(ensure_gguf(ckpt, kind, workdir))
            except Exception as ex:  # no llama-cpp-python: our rows only
                log(f"quality: no llama.cpp {kind} GGUF ({ex})")
        results["quality_data"] = ", ".join(args.data) if args.data else "the package's sources"
        results["quality"] = run_worker("quality", {"ckpt": str(ckpt), "threads": args.threads,
                                                    "eval_tokens": str(ev), "ggufs": ggufs, "isa": args.isa,
                                                    "llama_path": args.llama_path}, args.timeout)
        save()
    bw = run_worker("bandwidth", {"threads": args.threads, "contention": args.contention, "retries": args.retries},
                    args.timeout)
    if bw.get("read_gb_s"):  # the roofline uses the best the bus gave in this run
        results["bandwidth"]["read_gb_s_at_end"] = bw["read_gb_s"]
        results["bandwidth"]["read_gb_s"] = max(bw["read_gb_s"], results["bandwidth"].get("read_gb_s", 0))
    save()
    log(f"wrote {out / 'edge.json'}, {out / 'edge.md'}, {out / 'edge.png'}")
    return results, markdown(results)


if __name__ == "__main__":
    sys.exit(main())
