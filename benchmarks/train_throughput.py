"""Training throughput (tokens/s), MFU and peak memory for a preset on this machine, with a
baseline path measured in the same run on the same model and data.

    python benchmarks/train_throughput.py --preset plm-tiny --seq-len 256 --batch 16
    python benchmarks/train_throughput.py --device cuda --preset plm-1.8b --seq-len 4096 --batch 2

The optimized path is what the trainer runs with the matching settings (plm.train.trainer's
compile_model, plm.model.loss's chunked loss, plm.model.modeling's attention kernels, fused
AdamW, bf16 autocast over fp32 weights and optimizer state). Defaults by device:

| | optimized path | baseline |
|---|---|---|
| CPU | SDPA, fused AdamW (--compile: whole model) | "naive": eager attention, unfused AdamW, no compile |
| CUDA | V padded for flash attention, per-block compile, chunked loss (4096 tokens), fused AdamW | "eager": plain PyTorch step: SDPA, fused AdamW, full logits, no compile |

FLOPs per token (plm.train.trainer.flops_per_token): 6 N + 6 L H (seq / 2) (d_qk + d_v), with
N every weight matrix once (the tied embedding counted once, as the lm_head matmul; the
embedding lookup and norms are no matmul) and attention's QK^T and PV over the causal half
(seq / 2 keys per query on average), times 3 for forward + backward. MFU = tokens/s x FLOPs
per token / peak: the device's published dense bf16 figure (H100/H200: 989 TFLOP/s) for known
GPUs, else the matmul rate measured here; on CUDA the MFU against the measured matmul rate is
reported too. On CUDA, an attention micro-benchmark (forward + backward at the run's shape)
times each SDPA backend that accepts q/k 192 with v 128, padded or not.

Prints JSON and a markdown table; --out DIR also writes both there (--tag names the files).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from plm import PLMConfig, PLMForCausalLM
from plm.bench import report
from plm.model.loss import chunked_lm_loss, lm_loss_sum
from plm.model.modeling import attention_backend, sdpa_backend
from plm.train.trainer import compile_model, device_peak_flops, flops_per_token, use_bf16


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


def next_token_labels(x: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the inputs (position t predicts x[t + 1]; the last predicts nothing),
    the trainer's batch layout."""
    y = torch.full_like(x, -100)
    y[:, :-1] = x[:, 1:]
    return y


def run_path(name: str, cfg: PLMConfig, device: torch.device, seq: int, batch: int, steps: int, warmup: int,
             bf16: bool, fused: bool, compile_: str, attn: str, loss_chunk: int = 0,
             checkpointing: bool = False) -> dict:
    row = {"path": name, "attention": attn, "compile": compile_, "loss_chunk": loss_chunk,
           "fused_adamw": fused, "activation_checkpointing": checkpointing}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = opt = None
    try:
        torch.manual_seed(0)
        if device.type == "cuda":
            with torch.device(device):  # initialised on the GPU: seconds, not a minute on the host
                model = PLMForCausalLM(cfg, attn_impl=attn).train()
        else:
            model = PLMForCausalLM(cfg, attn_impl=attn).to(device).train()
        model.model.gradient_checkpointing = checkpointing
        kw = {"fused": True} if fused else {"foreach": False}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)
        fwd = compile_model(model, {"none": False, "model": True, "block": "block"}[compile_])
        loss_fn = chunked_lm_loss(loss_chunk) if loss_chunk else lm_loss_sum
        x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
        data = {"input_ids": x, "labels": next_token_labels(x)}
        times, losses = [], []
        t_first = time.perf_counter()
        for i in range(warmup + steps):
            sync(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss_sum, n = loss_fn(fwd, data)
                loss = loss_sum / n
            loss.backward()
            losses.append(float(loss))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i == warmup - 1:
                row["warmup_s"] = time.perf_counter() - t_first  # compile time included
            if i >= warmup:
                times.append(time.perf_counter() - t)
        tps = batch * seq * len(times) / sum(times)
        row.update({"tokens_per_s": tps, "step_s": sum(times) / len(times), "losses": losses,
                    "flops_per_token": flops_per_token(model, seq),
                    "attention_backend": attention_backend(cfg, attn, seq, device, torch.bfloat16 if bf16 else torch.float32),
                    "peak_gpu_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None})
    except torch.cuda.OutOfMemoryError as e:  # a row that does not fit is a result, not a crash
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        row["peak_gpu_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    except Exception as e:  # one failing path (a compile error, say) must not lose the others
        if device.type != "cuda":
            raise
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    finally:
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def attention_microbench(cfg: PLMConfig, device: torch.device, seq: int, batch: int, reps: int = 10) -> list[dict]:
    """Forward + backward of causal attention at the model's head dims, per SDPA backend that
    accepts them: model FLOPs (3 x forward, the causal half) over the median time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, qk, vd = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    flops = 3 * 2 * batch * H * (seq * seq / 2) * (qk + vd)
    out = []
    cases = [("sdpa (default choice), v 128", None, vd), ("flash, v padded to 192", SDPBackend.FLASH_ATTENTION, qk),
             ("cudnn, v 128", getattr(SDPBackend, "CUDNN_ATTENTION", None), vd),
             ("cudnn, v padded to 192", getattr(SDPBackend, "CUDNN_ATTENTION", None), qk),
             ("memory-efficient, v 128", SDPBackend.EFFICIENT_ATTENTION, vd)]
    for name, backend, v_dim in cases:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, H, seq, qk, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(batch, H, seq, qk, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(batch, H, seq, v_dim, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        row = {"case": name}
        try:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                row["backend"] = sdpa_backend(q, k, v, is_causal=True) if backend is None else str(backend).split(".")[-1]
                times = []
                for i in range(reps + 2):
                    sync(device)
                    t = time.perf_counter()
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                    sync(device)
                    if i >= 2:
                        times.append(time.perf_counter() - t)
            times.sort()
            med = times[len(times) // 2]
            row.update({"ms": med * 1e3, "tflops": flops / med / 1e12})
        except RuntimeError as e:
            row["error"] = str(e).splitlines()[0][:160]
        out.append(row)
    return out


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
    ap.add_argument("--compile", nargs="?", const="model", default=None, choices=["none", "model", "block"],
                    help="torch.compile of the optimized path: --compile alone = the whole model; "
                         "default: block on CUDA, none on CPU")
    ap.add_argument("--attn", default=None, choices=["sdpa", "flash", "eager"],
                    help="attention of the optimized path (default: flash on CUDA, sdpa on CPU)")
    ap.add_argument("--loss-chunk", type=int, default=None,
                    help="chunked linear + cross entropy, tokens per chunk; 0 = full logits "
                         "(default: 4096 on CUDA, 0 on CPU)")
    ap.add_argument("--baseline", default=None, choices=["naive", "eager", "none"],
                    help="naive: eager attention, unfused AdamW; eager: SDPA, fused AdamW, full logits; "
                         "both uncompiled (default: eager on CUDA, naive on CPU)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default=None, help="added to the output file names")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    cuda = device.type == "cuda"
    compile_ = args.compile or ("block" if cuda else "none")
    attn = args.attn or ("flash" if cuda else "sdpa")
    chunk = args.loss_chunk if args.loss_chunk is not None else (4096 if cuda else 0)
    baseline = args.baseline or ("eager" if cuda else "naive")
    vocab = args.vocab_size or (151936 if args.preset == "plm-1.8b" else 4096)
    cfg = PLMConfig.from_preset(args.preset, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    bf16 = use_bf16(args.precision, device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    published = device_peak_flops(device, None)
    measured = measured_matmul_peak(device, dtype, n=8192 if cuda else 2048)
    peak = published or measured
    common = dict(cfg=cfg, device=device, seq=args.seq_len, batch=args.batch, steps=args.steps,
                  warmup=args.warmup, bf16=bf16, checkpointing=args.activation_checkpointing)
    what = [attn if attn != "sdpa" else "SDPA", "fused AdamW"]
    if compile_ != "none":
        what.append("compile" if compile_ == "model" else "per-block compile")
    if chunk:
        what.append(f"chunked loss {chunk}")
    if args.activation_checkpointing:
        what.append("activation checkpointing")
    dev_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"preset": args.preset, "vocab_size": vocab, "device": dev_name, "precision": "bf16" if bf16 else "fp32",
              "seq_len": args.seq_len, "batch": args.batch, "tokens_per_step": args.seq_len * args.batch,
              "peak_flops": peak, "peak_source": "published dense bf16" if published else f"measured {dtype} matmul",
              "measured_matmul_flops": measured,
              "flops_formula": "6 N + 6 L H (seq/2) (d_qk + d_v); N = every weight matrix once (tied embedding once)",
              "torch": torch.__version__, "rows": [], "partial": True}
    with torch.device("meta"):
        result["parameters"] = PLMForCausalLM(cfg).num_parameters()
    stem = f"train_throughput-{args.preset}-{device.type}" + (f"-{args.tag}" if args.tag else "")

    def add(row: dict) -> None:
        """Record a row and write what there is so far (a run stopped by a time limit keeps it)."""
        if "tokens_per_s" in row:
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
            row["mfu_vs_measured_matmul"] = row["tokens_per_s"] * row["flops_per_token"] / measured
        result["rows"].append(row)
        write(result, args.out, stem)

    add(run_path(f"optimized ({', '.join(what)})", **common, fused=True, compile_=compile_, attn=attn, loss_chunk=chunk))
    if "error" in result["rows"][0] and compile_ != "none" and "out of memory" not in result["rows"][0]["error"]:
        what[what.index("per-block compile" if compile_ == "block" else "compile")] = "no compile (compile failed)"
        add(run_path(f"optimized ({', '.join(what)})", **common, fused=True, compile_="none", attn=attn,
                     loss_chunk=chunk))
    if baseline == "naive":
        add(run_path("naive (eager attention, unfused AdamW, no compile)", **common,
                     fused=False, compile_="none", attn="eager"))
    elif baseline == "eager":
        add(run_path("eager baseline (SDPA, fused AdamW, full logits, no compile)", **common,
                     fused=True, compile_="none", attn="sdpa"))
    rows = result["rows"]
    ok = [r for r in rows if "tokens_per_s" in r]
    if len(ok) >= 2 and "tokens_per_s" in rows[-1]:
        result["speedup_vs_baseline"] = ok[0]["tokens_per_s"] / rows[-1]["tokens_per_s"]
        result["speedup_vs_naive"] = result["speedup_vs_baseline"]  # the name earlier runs used
    if cuda:
        write(result, args.out, stem)
        result["attention_microbench"] = attention_microbench(cfg, device, args.seq_len, args.batch)
    result["partial"] = False
    print(json.dumps(result, indent=2))
    print("\n".join(render(result)))
    write(result, args.out, stem)


def render(result: dict) -> list[str]:
    """The markdown table of a result."""
    rows = result["rows"]
    md = [f"### Training throughput: {result['preset']} ({result['parameters'] / 1e6:.1f}M params), "
          f"seq {result['seq_len']}, batch {result['batch']}, {result['precision']}, {result['device']}", "",
          "| path | attention kernel | tokens/s | step (s) | MFU | MFU vs measured matmul | peak memory |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['peak_gpu_mem_bytes'] / 2**30:.1f} GiB" if r.get("peak_gpu_mem_bytes") else "-"
        if "error" in r:
            md.append(f"| {r['path']} | - | {r['error']} | - | - | - | {mem} |")
        else:
            md.append(f"| {r['path']} | {r['attention_backend']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
                      f"{r['mfu']:.1%} | {r['mfu_vs_measured_matmul']:.1%} | {mem} |")
    fpt = next((r["flops_per_token"] for r in rows if "flops_per_token" in r), 0)
    md += ["", f"FLOPs/token {fpt / 1e9:.2f} G = {result['flops_formula']}. "
               f"Peak {result['peak_flops'] / 1e12:.1f} TFLOP/s ({result['peak_source']}); measured "
               f"{result['precision']} matmul {result['measured_matmul_flops'] / 1e12:.1f} TFLOP/s."]
    if "speedup_vs_baseline" in result:
        md[-1] += f" Optimized / baseline: {result['speedup_vs_baseline']:.2f}x."
    if result.get("attention_microbench"):
        md += ["", "Attention forward + backward at this shape (causal, bf16):", "",
               "| case | backend | ms | TFLOP/s |", "|---|---|---:|---:|"]
        for a in result["attention_microbench"]:
            md.append(f"| {a['case']} | {a.get('backend', '-')} | " +
                      (f"{a['ms']:.2f} | {a['tflops']:.0f} |" if "ms" in a else f"{a.get('error', '')} | - |"))
    if result.get("partial"):
        md += ["", "(partial: the run was stopped before it finished)"]
    return md


def write(result: dict, out: str | None, stem: str) -> None:
    report.write(out, stem, result, render(result))

if __name__ == "__main__":
    main()
