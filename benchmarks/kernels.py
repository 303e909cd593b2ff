"""The native kernels on their own, against the PyTorch operations they replace, in one run.

    python benchmarks/kernels.py                 # PLM-1.8B shapes, 2 threads
    python benchmarks/kernels.py --threads 1 --out runs/bench-kernels

Attention: absorbed MLA over one sequence's latent cache (16 heads, 576-value latents, 512 of
them values) at several cache lengths, one call on one thread: the kernel on a bf16 cache (on
`avx512+bf16` the heads-in-lanes `vdpbf16ps` kernel), on an f32 cache (fp32 FMAs per head), and
PyTorch's softmax(q K^T) V on the same bf16 cache converted to fp32 (the naive path).
Matrices: the up projection's shape (8192 x 2048) for one activation row (decode) and for 256
(a prefill chunk), in each format, against torch.nn.functional.linear in bf16 (oneDNN).
Rates are multiply-adds per second (G MAC/s). Prints JSON and a markdown table; --out writes both.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from plm.bench.edge import machine_info  # noqa: E402
from plm.infer import native as nv  # noqa: E402


def seconds(fn, min_time: float = 0.5) -> float:
    """Median of repeated calls, after a warm-up, running for about min_time seconds."""
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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
        for name, fn in cases.items():
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for the matrices (attention: one call, 1 thread)")
    ap.add_argument("--lengths", default="256,1024,4096", help="attention cache lengths")
    ap.add_argument("--rows", default="1,256", help="activation rows for the matrices")
    ap.add_argument("--out", default=None, help="folder for kernels.json and kernels.md")
    args = ap.parse_args(argv)
    if not nv.load():
        print("the native kernels are not built (plm kernels build)", file=sys.stderr)
        return 2
    info = {**machine_info(args.threads), "isa": torch.ops.plm.isa()}
    rows = attention_rows([int(s) for s in args.lengths.split(",")])
    rows += matrix_rows(args.threads, [int(m) for m in args.rows.split(",")])
    md = ["# Native kernels\n", f"CPU: {info['cpu']}, {info['cores']} cores; kernel path `{info['isa']}`; "
          f"torch {info['torch']}; attention on 1 thread, matrices on {args.threads}.\n",
          "| kernel | case | shape | ms | G MAC/s |", "|---|---|---|---|---|"]
    md += [f"| {r['kernel']} | {r['case']} | {r['shape']} | {r['ms']:.3f} | {r['gmac_s']:.1f} |" for r in rows]
    text = "\n".join(md) + "\n"
    result = {"machine": info, "rows": rows}
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
