"""Training throughput (tokens/s) and MFU for a preset on this machine, with the naive path
(eager attention, no fused optimizer, no compile) measured in the same run.

    python benchmarks/train_throughput.py --preset plm-tiny --seq-len 256 --batch 16
    python benchmarks/train_throughput.py --preset plm-1.8b --seq-len 4096 --batch 4   # on a GPU

MFU = achieved model FLOP/s / peak. The peak is the device's published dense bf16 figure
for known GPUs, else the matmul FLOP/s measured here in the same dtype (labelled "measured").
Prints JSON and a markdown table; --out DIR also writes both there.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from plm import PLMConfig, PLMForCausalLM
from plm.train.trainer import device_peak_flops, flops_per_token, use_bf16


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_path(name: str, cfg: PLMConfig, device: torch.device, seq: int, batch: int, steps: int, warmup: int,
             bf16: bool, fused: bool, compile_: bool, eager_attn: bool) -> dict:
    torch.manual_seed(0)
    try:
        model = PLMForCausalLM(cfg, attn_impl="eager" if eager_attn else "sdpa").to(device).train()
        kw = {"fused": True} if fused else {"foreach": False}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)
        fwd = torch.compile(model) if compile_ else model
        x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
        times, losses = [], []
        for i in range(warmup + steps):
            sync(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = fwd(x, labels=x).loss
            loss.backward()
            losses.append(float(loss))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
        tps = batch * seq * len(times) / sum(times)
        peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return {"path": name, "tokens_per_s": tps, "step_s": sum(times) / len(times), "losses": losses,
                "flops_per_token": flops_per_token(model, seq), "peak_gpu_mem_bytes": peak_mem}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="plm-tiny")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: 4096 for small presets, 151936 for plm-1.8b")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the optimized path")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    vocab = args.vocab_size or (151936 if args.preset == "plm-1.8b" else 4096)
    cfg = PLMConfig.from_preset(args.preset, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    bf16 = use_bf16(args.precision, device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    published = device_peak_flops(device, None)
    peak = published or measured_matmul_peak(device, dtype)
    common = dict(cfg=cfg, device=device, seq=args.seq_len, batch=args.batch, steps=args.steps,
                  warmup=args.warmup, bf16=bf16)
    rows = [run_path("optimized (SDPA, fused AdamW" + (", compile" if args.compile else "") + ")", **common,
                     fused=True, compile_=args.compile, eager_attn=False),
            run_path("naive (eager attention, unfused AdamW, no compile)", **common,
                     fused=False, compile_=False, eager_attn=True)]
    for r in rows:
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"preset": args.preset, "vocab_size": vocab, "device": dev_name, "precision": "bf16" if bf16 else "fp32",
              "seq_len": args.seq_len, "batch": args.batch, "peak_flops": peak,
              "peak_source": "published dense bf16" if published else f"measured {dtype} matmul",
              "torch": torch.__version__, "rows": rows}
    with torch.device("meta"):
        result["parameters"] = PLMForCausalLM(cfg).num_parameters()
    speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    result["speedup_vs_naive"] = speedup
    md = [f"### Training throughput: {args.preset} ({result['parameters'] / 1e6:.1f}M params), seq {args.seq_len}, "
          f"batch {args.batch}, {result['precision']}, {dev_name}", "",
          "| path | tokens/s | step (s) | MFU |", "|---|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['path']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['mfu']:.1%} |")
    md += ["", f"Optimized / naive: {speedup:.2f}x. Peak {peak / 1e12:.1f} TFLOP/s ({result['peak_source']})."]
    print(json.dumps(result, indent=2))
    print("\n".join(md))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"train_throughput-{args.preset}-{device.type}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (out / f"{stem}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
