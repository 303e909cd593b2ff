"""Decode throughput of the static-cache decoder (plm.infer.static_decode) against the HBM
roofline, with the reference model's eager decode as the baseline, in one run.

    python benchmarks/decode_throughput.py --device cuda --preset plm-1.8b --batch 1,8,32 --ctx 1024,4000

For each context length and batch size: a random prompt of `ctx` tokens per row is prefilled,
then `--steps` greedy steps run on the device (argmax fed back without a host round trip; on
CUDA each step is one graph replay) and are timed with one synchronisation at the end.

Roofline: a decode step reads every weight once, whatever the batch (PLM-1.8B in bf16: 3.65 GB,
the lm_head included), so the ceiling is bandwidth / weight bytes steps per second.
hbm_roofline_fraction = weight bytes per step x steps/s / bandwidth (at batch 1, weight bytes
per token x tok/s / bandwidth); the fraction with the cache also counts the latent cache read
each step (the whole preallocated capacity). Bandwidth: --bandwidth, default 4.8e12 B/s, the
H200's datasheet HBM3e figure (H100 SXM: 3.35e12).

Also measured: the same decoder driven through its StepFn as `plm generate` drives it (host
loop, logits copied to the host each step), and a greedy check: the static decoder's tokens
against the reference model's, exact in float32 on a small model, and the agreement in the
benchmark's dtype on the benchmarked model. Prints JSON and markdown; --out DIR writes both.
"""
from __future__ import annotations

import argparse
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
from plm.infer.generate import left_pad, model_step_fn
from plm.infer.static_decode import StaticDecoder

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(cfg: PLMConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> PLMForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        return PLMForCausalLM(cfg).to(dtype).eval()


def greedy(step, prompts: list[list[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n greedy steps through a StepFn: tokens [n, B] and their logits [n, B, V]."""
    ids, mask = left_pad(prompts, 0)
    new, toks, logits = ids, [], []
    for _ in range(n):
        lg = step(new, mask)[:, -1].float().cpu()
        logits.append(lg)
        nxt = lg.argmax(-1)
        toks.append(nxt)
        new = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(new)], 1)
    return torch.stack(toks), torch.stack(logits)


def greedy_check(model: PLMForCausalLM, steps: int, compile_: bool, graph: bool) -> dict:
    """Static decoder vs the reference model (decompressed cache, eager), greedy, on a batch of
    prompts of different lengths (left-padded)."""
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (37, 5, 20, 1)]
    with torch.no_grad():
        ref, ref_lg = greedy(model_step_fn(model), prompts, steps)
    dec = StaticDecoder(model, batch=len(prompts), capacity=64 + steps, compile=compile_, cuda_graph=graph)
    got, got_lg = greedy(dec, prompts, steps)
    same = (got == ref).all(1)  # per step: every row's token equal
    first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else None
    upto = steps if first_diff is None else first_diff + 1  # logits on the same inputs
    return {"dtype": str(model.dtype).removeprefix("torch."), "layers": model.config.num_hidden_layers,
            "steps": steps, "batch": len(prompts), "equal": first_diff is None, "first_differing_step": first_diff,
            "token_agreement": float((got == ref).float().mean()),
            "logits_max_abs_diff": float((got_lg[:upto] - ref_lg[:upto]).abs().max()),
            "logits_max_abs": float(ref_lg[:upto].abs().max())}


def reference_decode(model: PLMForCausalLM, batch: int, ctx: int, steps: int) -> dict:
    """The reference model's eager decode loop (decompressed cache), the issue's baseline."""
    dev = model.device
    step = model_step_fn(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=dev)
    mask = torch.ones(batch, ctx, dtype=torch.long, device=dev)
    with torch.no_grad():
        nxt = step(ids, mask)[:, -1].argmax(-1)
        for i in range(steps + 2):
            if i == 2:
                sync(dev)
                t = time.perf_counter()
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device=dev)], 1)
            nxt = step(nxt[:, None], mask)[:, -1].argmax(-1)
        sync(dev)
    el = time.perf_counter() - t
    return {"path": "reference eager decode", "batch": batch, "ctx": ctx, "steps": steps,
            "tokens_per_s": batch * steps / el, "ms_per_step": el / steps * 1e3}


def bench_static(model: PLMForCausalLM, batch: int, ctx: int, steps: int, warmup: int, compile_: bool,
                 graph: bool, bandwidth: float, host_steps: int) -> dict:
    dev = model.device
    row = {"path": "static decoder" + (" (compiled" if compile_ else " (eager") + (", CUDA graph)" if graph else ")"),
           "batch": batch, "ctx": ctx, "steps": steps}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    dec = None
    try:
        dec = StaticDecoder(model, batch, capacity=ctx + warmup + steps + host_steps + 1, compile=compile_,
                            cuda_graph=graph)
        ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=dev)
        sync(dev)
        t = time.perf_counter()
        logits = dec.prefill(ids, None)
        sync(dev)
        row["prefill_s"] = time.perf_counter() - t
        dec.start_greedy(logits)
        t = time.perf_counter()
        with torch.no_grad():
            dec.prepare()  # compile + capture
            for _ in range(warmup):
                dec.advance_greedy(dec.decode())
        sync(dev)
        row["compile_and_warmup_s"] = time.perf_counter() - t
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(steps):
                dec.advance_greedy(dec.decode())
            sync(dev)
        el = time.perf_counter() - t
        wb, cb = dec.weight_bytes(), dec.cache_bytes_read()
        row.update({"tokens_per_s": batch * steps / el, "ms_per_step": el / steps * 1e3,
                    "weight_bytes_per_step": wb, "cache_bytes_per_step": cb, "bandwidth": bandwidth,
                    "hbm_roofline_fraction": wb * steps / el / bandwidth,
                    "hbm_fraction_with_cache": (wb + cb) * steps / el / bandwidth})
        # as plm generate drives it: the StepFn, ids and mask from the host, logits back to it
        mask = torch.ones(batch, dec.length, dtype=torch.long)
        nxt = dec.inputs[:batch].cpu()
        t = time.perf_counter()
        for _ in range(host_steps):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)
            nxt = dec(nxt[:, None], mask)[:, -1].float().cpu().argmax(-1)
        el = time.perf_counter() - t
        row["host_loop_tokens_per_s"] = batch * host_steps / el if host_steps else None
        row["peak_gpu_mem_bytes"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # a compile failure must not lose the other rows
        if dev.type != "cuda":
            raise
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    finally:
        del dec
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="plm-1.8b")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: 151936 for plm-1.8b, else 4096")
    ap.add_argument("--batch", type=ints, default=[1, 8, 32], help="comma-separated batch sizes")
    ap.add_argument("--ctx", type=ints, default=[1024, 4000], help="comma-separated prompt lengths")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps (ctx 4000 + all steps fit 4096)")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--host-steps", type=int, default=16, help="steps through the StepFn (plm generate's loop)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="HBM bytes/s (default: H200 datasheet 4.8 TB/s)")
    ap.add_argument("--no-compile", action="store_true", help="decode_layer eager (default: compiled on CUDA)")
    ap.add_argument("--no-graph", action="store_true", help="no CUDA graph capture")
    ap.add_argument("--check-steps", type=int, default=32, help="greedy check length (0 = skip)")
    ap.add_argument("--baseline-steps", type=int, default=16, help="reference eager decode steps (0 = skip)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    compile_ = cuda and not args.no_compile
    graph = cuda and not args.no_graph
    dtype = DTYPES[args.dtype]
    vocab = args.vocab_size or (151936 if args.preset == "plm-1.8b" else 4096)
    cfg = PLMConfig.from_preset(args.preset, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    max_ctx = max(args.ctx) + args.warmup + args.steps + args.host_steps + 1
    if max_ctx > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=max_ctx)  # random weights: RoPE runs at any position
    t0 = time.perf_counter()
    result = {"preset": args.preset, "vocab_size": vocab, "dtype": args.dtype, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if cuda else
              f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "bandwidth": args.bandwidth, "compile": compile_, "cuda_graph": graph, "rows": [], "partial": True}
    stem = f"decode_throughput-{args.preset}-{device.type}"
    checks: dict[str, dict] = {}

    def check(name: str, model: PLMForCausalLM) -> None:
        try:
            checks[name] = greedy_check(model, args.check_steps, compile_, graph)
        except Exception as e:  # reported, and the throughput rows still run
            if not cuda:
                raise
            traceback.print_exc()
            checks[name] = {"error": f"{type(e).__name__}: {str(e).strip()[:200]}", "equal": None}
        result["greedy_check"] = {"equal": checks.get("float32_small", {}).get("equal"), **checks}
        write(result, args.out, stem)

    model = build_model(cfg, device, dtype)
    result["parameters"] = model.num_parameters()
    # the throughput rows first: a run stopped by its time limit keeps the figures; the checks'
    # other shapes and dtypes would otherwise also make the rows' compiled kernels shape-generic
    for ctx in args.ctx:
        for b in args.batch:
            row = bench_static(model, b, ctx, args.steps, args.warmup, compile_, graph, args.bandwidth, args.host_steps)
            if "error" in row and compile_ and "out of memory" not in row["error"]:
                print(f"compiled decode failed ({row['error']}); the remaining rows run decode_layer eagerly", flush=True)
                result["rows"].append(row)
                compile_ = result["compile"] = False
                row = bench_static(model, b, ctx, args.steps, args.warmup, compile_, graph, args.bandwidth,
                                   args.host_steps)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            write(result, args.out, stem)
    if args.baseline_steps:
        result["baseline"] = reference_decode(model, 1, args.ctx[0], args.baseline_steps)
        write(result, args.out, stem)
    if args.check_steps:
        torch._dynamo.reset()  # the checks compile for their own shapes, static
        check(f"{args.dtype}_benchmarked_model", model)
        del model
        # exact: float32 on a small model of the same family (plm-tiny's shape, this vocabulary)
        small = build_model(PLMConfig.from_preset("plm-tiny", vocab_size=vocab, bos_token_id=0, eos_token_id=0,
                                                  initializer_range=0.06), device, torch.float32, seed=1)
        torch._dynamo.reset()
        check("float32_small", small)
    result["seconds"] = time.perf_counter() - t0
    # the issue's targets
    by = {(r["batch"], r["ctx"]): r for r in result["rows"] if "tokens_per_s" in r}
    targets = {}
    if (1, 1024) in by:
        f = by[(1, 1024)]["hbm_roofline_fraction"]
        targets["batch1_ctx1024_roofline>=50%"] = {"value": f, "met": f >= 0.5}
    for ctx in args.ctx:
        if (1, ctx) in by and (32, ctx) in by:
            x = by[(32, ctx)]["tokens_per_s"] / by[(1, ctx)]["tokens_per_s"]
            targets[f"batch32/batch1_ctx{ctx}>=10x"] = {"value": x, "met": x >= 10}
    result["targets"] = targets
    result["partial"] = False
    print(json.dumps(result, indent=2))
    print("\n".join(render(result)))
    write(result, args.out, stem)


def render(result: dict) -> list[str]:
    """The markdown of a result."""
    rows = result["rows"]
    params = f"{result['parameters'] / 1e6:.0f}M params" if "parameters" in result else ""
    md = [f"### Decode: {result['preset']} ({params}), {result['dtype']}, {result['device']}, static latent cache "
          f"+ absorbed MLA{', compiled' if result['compile'] else ''}{', CUDA graph' if result['cuda_graph'] else ''}",
          "", "| path | batch | ctx | tokens/s | ms/step | HBM roofline (weights) | with cache reads | via StepFn tok/s "
          "| prefill s | compile+warm-up s | peak memory |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['path']} | {r['batch']} | {r['ctx']} | {r['error']} | | | | | | | |")
            continue
        mem = f"{r['peak_gpu_mem_bytes'] / 2**30:.1f} GiB" if r.get("peak_gpu_mem_bytes") else "-"
        host = f"{r['host_loop_tokens_per_s']:,.0f}" if r.get("host_loop_tokens_per_s") else "-"
        md.append(f"| {r['path']} | {r['batch']} | {r['ctx']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
                  f"{r['hbm_roofline_fraction']:.1%} | {r['hbm_fraction_with_cache']:.1%} | {host} | "
                  f"{r['prefill_s']:.2f} | {r['compile_and_warmup_s']:.1f} | {mem} |")
    wb = next((r["weight_bytes_per_step"] for r in rows if "weight_bytes_per_step" in r), 0)
    bw = result["bandwidth"]
    md += ["", f"Weight bytes per step {wb / 1e9:.2f} GB; bandwidth {bw / 1e12:.2f} TB/s "
               f"(roofline {bw / wb if wb else 0:,.0f} steps/s)."]
    if "baseline" in result:
        bl = result["baseline"]
        md.append(f"Baseline, reference model's eager decode (batch 1, ctx {bl['ctx']}): {bl['tokens_per_s']:,.1f} tok/s.")
    for name, c in (result.get("greedy_check") or {}).items():
        if not isinstance(c, dict):
            continue
        if "error" in c:
            md.append(f"Greedy check {name}: failed to run ({c['error']}).")
            continue
        md.append(f"Greedy check {name} ({c['steps']} steps, batch {c['batch']}, mixed prompt lengths): "
                  + ("tokens equal to the reference" if c["equal"] else
                     f"first differing step {c['first_differing_step']}, token agreement {c['token_agreement']:.1%}")
                  + f"; logits max |diff| {c['logits_max_abs_diff']:.2e} (max |logit| {c['logits_max_abs']:.2e}).")
    for name, t in result.get("targets", {}).items():
        md.append(f"Target {name}: {t['value']:.3g} -> {'met' if t['met'] else 'NOT met'}.")
    if result.get("partial"):
        md += ["", "(partial: the run was stopped before it finished)"]
    return md


def write(result: dict, out: str | None, stem: str) -> None:
    report.write(out, stem, result, render(result))

if __name__ == "__main__":
    main()
