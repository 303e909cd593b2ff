"""The native kernels on their own, against the PyTorch operations they replace, in one run.

    python benchmarks/kernels.py                 # PLM-1.8B shapes, 2 threads
    python benchmarks/kernels.py --threads 1 --out runs/bench-kernels

Attention: absorbed MLA over one sequence's latent cache (16 heads, 576-value latents, 512 of
them values) at several cache lengths, one call on one thread: the kernel on a bf16 cache (on
`avx512+bf16` the heads-in-lanes `vdpbf16ps` kernel, on `amx+bf16` the AMX tile kernel, and there
also the `vdpbf16ps` kernel beside it in the same run), on an f32 cache (fp32 FMAs per head), and
PyTorch's softmax(q K^T) V on the same bf16 cache converted to fp32 (the naive path).
Matrices: the up projection's shape (8192 x 2048) for one activation row (decode), 8 (a server's
batched step) and 256 (a prefill chunk), in each format (Q6_K and Q5_K: random blocks; llama.cpp's
Q4_K_M stores its lm_head and half its down projections in Q6_K, its Q5_K_M most matrices in Q5_K), against torch.nn.functional.linear
in bf16 (oneDNN). Rates are multiply-adds per second (G MAC/s). On AVX-512 VNNI hosts the run
first measures what `vpdpbusd` issues on --threads threads (a register-only loop: the compute
roofline of the int8 block formats) and gives each block-format row's share of it.
From memory: decode (one activation row) as the model does it, weights not in any cache: each
matrix copied until the copies fill --memory-mb, the copies called in turn, formats and kernels
interleaved over --rounds rounds (medians): the up projection's shape (8192 x 2048) and the
down projection's (2048 x 8192) dense, and the down projection's exact sparse kernel (the
neuron-major layout) on relu² activations with --sparsity of them zero (PLM-1.8B: about 0.909).
GB/s = the dense matrix's bytes over the time, and its share of a read probe taken before and
after the rounds on the same threads (benchmarks/edge.py's: PyTorch's sum and max over a buffer
past the caches), so each kernel's draw on the bus is set against a plain stream's in one run.
Prints JSON and markdown tables; --out writes both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ab import RANDOM_BLOCKS, copies_past_caches, random_blocks, relu2_row, seconds  # noqa: E402  (benchmarks/ab.py)
from plm.bench.edge import machine_info  # noqa: E402
from plm.infer import native as nv  # noqa: E402


def attention_rows(lengths: list[int]) -> list[dict]:
    H, D, R = 16, 576, 512
    g = torch.Generator().manual_seed(0)
    q = torch.randn(H, D, generator=g)
    scale = D ** -0.5
    rows = []
    torch.set_num_threads(1)
    for S in lengths:
        c16 = torch.randn(S, D, generator=g).to(torch.bfloat16)
        c32 = c16.float()
        macs = H * S * (D + R)
        cases = {"ours, bf16 cache": lambda: nv.attention(q, c16, R, scale),
                 "ours, f32 cache": lambda: nv.attention(q, c32, R, scale),
                 "torch (fp32)": lambda: ((q @ c16.float().T) * scale).softmax(-1) @ c16.float()[:, :R]}
        if torch.ops.plm.isa().startswith("amx"):  # the AMX tile kernel's anchor, in the same run
            cases["ours, bf16 cache, vdpbf16ps (avx512 path)"] = cases["ours, bf16 cache"]
        for name, fn in cases.items():
            if name.endswith("(avx512 path)"):
                path = torch.ops.plm.isa().split("+")[0]
                nv.set_isa("avx512")
                try:
                    t = seconds(fn)
                finally:
                    nv.set_isa(path)
            else:
                t = seconds(fn)
            rows.append({"kernel": "attention", "case": name, "shape": f"16 heads x {S} cached rows",
                         "ms": t * 1e3, "gmac_s": macs / t / 1e9})
    return rows


def matrix_rows(threads: int, rows_m: list[int]) -> list[dict]:
    N, K = 8192, 2048
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(N, K, generator=g) * 0.02
    mats = {f: nv.PackedLinear.from_float(w, f) for f in ("bf16", "q8_0", "q4_0", "q4_k")}
    for f in RANDOM_BLOCKS:  # Q6_K, Q5_K: random blocks (no quantiser)
        mats[f] = nv.PackedLinear(random_blocks(f, N, K, g), nv.format_id(f), N, K)
    wb = w.to(torch.bfloat16)
    out = []
    for M in rows_m:
        x = torch.randn(M, K, generator=g)
        xb = x.to(torch.bfloat16)
        cases = {f"ours {f}": (lambda m=m: m(x)) for f, m in mats.items()}
        cases["torch bf16 linear"] = lambda: F.linear(xb, wb)
        for name, fn in cases.items():
            t = seconds(fn)
            out.append({"kernel": "matrix", "case": name, "shape": f"{N} x {K}, {M} row{'s' if M > 1 else ''}",
                        "ms": t * 1e3, "gmac_s": M * N * K / t / 1e9})
    return out


def memory_rows(threads: int, formats: list[str], sparsity: float, memory_mb: int,
                rounds: int) -> tuple[list[dict], float]:
    """The from-memory rows, and the read probe (GB/s on `threads`) before and after them."""
    from plm.bench.edge import Prober
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(2)
    cases: dict[tuple[str, str, str], tuple[list, torch.Tensor, int]] = {}
    for N, K in ((8192, 2048), (2048, 8192)):
        # the down projection's input: relu² activations, a share `sparsity` of them exactly zero
        x = relu2_row(K, sparsity, g) if K == 8192 else torch.randn(1, K, generator=g)
        for f in formats:
            w = torch.randn(N, K, generator=g) * 0.02
            raw = random_blocks(f, N, K, g) if f in RANDOM_BLOCKS else nv.quantize(w, f)
            sparse_too = K == 8192 and nv.format_id(f) not in nv.NO_SPARSE
            kinds = [("dense", False)] + ([("sparse", True)] if sparse_too else [])
            for kind, sparse in kinds:
                copies = copies_past_caches(nv, nv.PackedLinear(raw, f, N, K, sparse=sparse), memory_mb << 20)
                cases[(f, f"{N} x {K}", kind)] = (copies, x, nv.PackedLinear(raw, f, N, K).nbytes())
    times: dict = {k: [] for k in cases}
    # the read probe of benchmarks/edge.py (PyTorch's sum and max over a buffer past the caches,
    # in a helper process), before and after the rounds: what the bus gives a plain stream on
    # these threads. Not between the cases: with a probe (or a 0.5 s sleep) at the start of every
    # round, the cases right after it ran at 19-58% of the probe on the Intel host (2026-12-07).
    # An untimed round first, so that the timed ones do not start from the probe's pause.
    prober = Prober(threads, max(memory_mb, 1024) << 20)
    probes = [prober()]
    for r in range(rounds + 1):
        for key, (copies, x, _) in cases.items():
            copies[0](x)
            t0 = time.perf_counter()
            for m in copies:
                m(x)
            if r:
                times[key].append((time.perf_counter() - t0) / len(copies))
    probes.append(prober())
    prober.close()
    probe = statistics.median(probes)
    out = []
    for (f, shape, kind), (copies, x, dense_bytes) in cases.items():
        t = statistics.median(times[(f, shape, kind)])
        row = {"format": f, "shape": shape, "kernel": kind, "ms": t * 1e3, "gb_s": dense_bytes / t / 1e9,
               "zeros": float((x == 0).float().mean()) if kind == "sparse" else None}
        row["of_probe"] = row["gb_s"] / probe
        out.append(row)
    for r in out:  # the sparse kernel against the dense one on the same activations
        if r["kernel"] == "sparse":
            dense = next(d for d in out if (d["format"], d["shape"], d["kernel"]) == (r["format"], r["shape"], "dense"))
            r["vs_dense"] = dense["ms"] / r["ms"]
    return out, probe


def pct(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.0f}%"


def memory_line(r: dict) -> str:
    zeros = "" if r["zeros"] is None else f"{r['zeros']:.3f}"
    vs = f"{r['vs_dense']:.2f}x" if "vs_dense" in r else ""
    return (f"| {r['format']} | {r['shape']} | {r['kernel']} | {zeros} | {r['ms']:.3f} | {r['gb_s']:.1f} | "
            f"{pct(r['of_probe'])} | {vs} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for the matrices (attention: one call, 1 thread)")
    ap.add_argument("--lengths", default="256,1024,4096", help="attention cache lengths")
    ap.add_argument("--rows", default="1,8,256", help="activation rows for the matrices")
    ap.add_argument("--formats", default="bf16,q8_0,q4_0,q4_k", help="formats for the from-memory rows")
    ap.add_argument("--sparsity", type=float, default=0.909, help="share of zero activations for the sparse rows")
    ap.add_argument("--memory-mb", type=int, default=256, help="bytes of copies per case (far past the caches)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the from-memory rows")
    ap.add_argument("--out", default=None, help="folder for kernels.json and kernels.md")
    args = ap.parse_args(argv)
    if not nv.load():
        print("the native kernels are not built (plm kernels build)", file=sys.stderr)
        return 2
    info = {**machine_info(args.threads), "isa": torch.ops.plm.isa()}
    vnni = nv.isa_supported("avx512")
    info["vnni_peak_gmac_s"] = torch.ops.plm.vnni_peak(args.threads, 1.0) if vnni else None
    rows = attention_rows([int(s) for s in args.lengths.split(",")])
    rows += matrix_rows(args.threads, [int(m) for m in args.rows.split(",")])
    peak = info["vnni_peak_gmac_s"]
    for r in rows:
        block = r["kernel"] == "matrix" and r["case"].split()[-1] in ("q8_0", "q4_0", "q4_k", "q5_k", "q6_k")
        r["of_peak"] = r["gmac_s"] / peak if peak and block else None
    md = ["# Native kernels\n", f"CPU: {info['cpu']}, {info['cores']} cores; kernel path `{info['isa']}`; "
          f"torch {info['torch']}; attention on 1 thread, matrices on {args.threads}.\n"]
    if peak:
        md += [f"`vpdpbusd` issue rate (register-only loop, {args.threads} threads): **{peak:.0f} G MAC/s**; "
               "% of it per int8 block-format row.\n"]
    md += ["| kernel | case | shape | ms | G MAC/s | % of vpdpbusd |", "|---|---|---|---|---|---|"]
    md += [f"| {r['kernel']} | {r['case']} | {r['shape']} | {r['ms']:.3f} | {r['gmac_s']:.1f} | {pct(r['of_peak'])} |"
           for r in rows]
    mem, probe = (memory_rows(args.threads, args.formats.split(","), args.sparsity, args.memory_mb, args.rounds)
                  if args.rounds else ([], None))
    if mem:
        md += ["", f"## Decode from memory ({args.threads} threads, {args.rounds} interleaved rounds, medians)\n",
               f"Read probe (PyTorch's sum and max over a buffer past the caches, in a helper process, before "
               f"and after the rounds, {args.threads} threads): **{probe:.1f} GB/s**; % of it per row.\n",
               "| format | shape | kernel | zeros | ms | GB/s (dense bytes) | % of probe | vs dense |",
               "|---|---|---|---|---|---|---|---|"]
        md += [memory_line(r) for r in mem]
    text = "\n".join(md) + "\n"
    result = {"machine": info, "rows": rows, "memory": mem, "read_probe_gb_s": probe}
    print(json.dumps(result, indent=1))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps(result, indent=1))
        (out / "kernels.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
