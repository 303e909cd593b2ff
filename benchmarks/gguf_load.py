"""How long a GGUF takes to load into the native decoder with its tokenizer, side by side in one run:

* before: the gguf package's own reader (`gguf.GGUFReader`), the file parsed twice, once for
  the weights and once for the tokenizer (what `plm serve` / `plm generate` did before);
* now: `plm.infer.native_decoder.load_gguf`: one parse, through a plain ndarray view of the
  file's map (numpy's memmap subclass runs Python hooks on every slice, and a Qwen2
  vocabulary's ~300,000 token and merge strings are each sliced).

Both build the same decoder and tokenizer (checked: the same greedy tokens). The two paths
alternate, so a slow phase of the host reaches both.

    python benchmarks/gguf_load.py FILE.gguf [FILE.gguf ...] [--repeats 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _before(path: str):
    import gguf

    from plm.infer.native_decoder import NativeDecoder, tokenizer_from_gguf
    return NativeDecoder.from_gguf(path, reader=gguf.GGUFReader(path)), tokenizer_from_gguf(gguf.GGUFReader(path))


def _now(path: str):
    from plm.infer.native_decoder import load_gguf
    return load_gguf(path)


def _seconds(fn, path: str) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    dec, tok = fn(path)
    dt = time.perf_counter() - t0
    return dt, dec.greedy(tok.encode("The latent cache"), 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="plm GGUF files")
    ap.add_argument("--repeats", type=int, default=3, help="loads per path and file (median)")
    ap.add_argument("--out", default="runs/bench-gguf-load")
    args = ap.parse_args(argv)
    from plm.bench.edge import machine_info
    from plm.bench.report import save, table
    from plm.infer import native as nv

    if not nv.load():
        print("the native kernels are not built (plm kernels build)", file=sys.stderr)
        return 2
    rows = []
    for f in args.files:
        before, now = [], []
        for _ in range(args.repeats):
            b, gb = _seconds(_before, f)
            n, gn = _seconds(_now, f)
            if gb != gn:
                raise SystemExit(f"{f}: the two loads decode differently ({gb} vs {gn})")
            before.append(b)
            now.append(n)
        b, n = statistics.median(before), statistics.median(now)
        rows.append({"file": Path(f).name, "bytes": Path(f).stat().st_size, "before_s": round(b, 2),
                     "now_s": round(n, 2), "speedup": round(b / n, 1)})
    import torch
    info = machine_info(torch.get_num_threads())
    report = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "machine": info, "repeats": args.repeats, "rows": rows}
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, torch threads {info['threads']}; median of "
             f"{args.repeats} loads per path, alternating; weights repacked and tokenizer built in both.", ""]
    lines += table(["file", "MiB", "gguf reader, parsed twice (s)", "load_gguf (s)", "speed-up"],
                   [[r["file"], f"{r['bytes'] / 2**20:.0f}", r["before_s"], r["now_s"], f"{r['speedup']}x"]
                    for r in rows])
    save(args.out, "gguf_load", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
