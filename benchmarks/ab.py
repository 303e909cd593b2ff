"""Two builds of the native kernels (two commits, or two kernel paths), alternated in one run.

    python benchmarks/ab.py --base f079e8f                       # that commit against the checkout
    python benchmarks/ab.py --base HEAD@avx2 --head HEAD@avx512  # two paths of one build
    python benchmarks/ab.py --base f079e8f --cases matrix:q8_0:8,step:8 --rounds 7 --out runs/ab

Why: a kernel change is worth a few percent to a few tens of percent, and this project's hosts
drift by more than that (memory bandwidth moves 30-60 GB/s from minute to minute on the AMD
EPYC machines). Two runs minutes apart cannot tell such a change from the drift; alternating the
two builds round by round, each round a fresh process per side (order A B, then B A, ...),
can: the table gives each side's median, the ratio, and in how many rounds the head won.

A side is `REF[@ISA]`: REF a git commit (its `plm/` is exported to a temporary folder and its
kernel library built into the usual cache, keyed by its sources, so a second run builds
nothing) or `.` for the working tree as it is; ISA forces a kernel path (`amx`, `avx512`, `avx2`,
`scalar`; PLM_NATIVE_ISA). Each process imports that side's `plm`, so its Python wrappers match
its library.

Cases (comma-separated):
  matrix:FMT:M      an 8192 x 2048 matrix (PLM-1.8B's up projection) in FMT (bf16, q8_0, q4_0,
                    q4_k, q5_k, q6_k: random blocks) against M activation rows: G multiply-adds/s
                    (at 4-8 bits it can stay in a 32 MiB L3: a kernel rate, not a memory rate)
  step:B            the native decoder's batched decode step over B sequences, each prefilled
                    with --prompt tokens: ms (lower is better)
  prefill:T         one sequence's prefill of T tokens in chunks of 512: tokens/s
  decode:T          one sequence's decode step after a T-token prefill: ms
  sparse:FMT[:Z]    the down projection's shape (2048 x 8192) in FMT (q8_0, q4_0, q4_k, q6_k,
                    bf16), the exact sparse kernel on one row of relu² activations with a share Z
                    of them zero (default 0.909, PLM-1.8B's), the weights from memory (copies
                    past the caches, called in turn): ms per call (lower is better)
  load              NativeDecoder.from_gguf of --gguf, once, in the side's fresh process (the
                    file in the page cache after the first round): s (lower is better)
The decoder cases load --gguf (default: PLM-1.8B's shape with random weights as Q8_0, made in
runs/edge like benchmarks/serve.py's, created when missing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 24  # timed decode steps at most per case (each adds a token to the caches)
DEFAULT_CASES = "matrix:q8_0:8,matrix:q4_0:8,matrix:q4_k:8,matrix:q6_k:8,step:8,decode:64"


def log(msg: str) -> None:
    print(f"[ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- worker: one side, every case, one process ----------------------------------------------

def seconds(fn, min_time: float = 0.5, max_calls: int = 1 << 30) -> float:
    """Median of repeated calls after a warm-up, for about min_time seconds (at least 5 calls,
    at most max_calls: a decode step grows its sequences' caches)."""
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while (time.perf_counter() < t_end and len(times) < max_calls) or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# the K-quants we have no quantiser for: bytes per 256 values, (offset, low, high) of each fp16 scale
RANDOM_BLOCKS = {"q6_k": (210, [(208, -0.001, 0.001)]), "q5_k": (176, [(0, 0.0, 0.002), (2, 0.0, 0.002)])}


def random_blocks(fmt: str, N: int, K: int, g):
    """N rows of random Q6_K / Q5_K blocks, the fp16 scales set small: we have no quantiser for
    either. Here, not in plm/, because an older commit's plm may lack any helper."""
    import torch
    nbytes, scales = RANDOM_BLOCKS[fmt]
    raw = torch.randint(0, 256, (N, K // 256, nbytes), generator=g, dtype=torch.uint8)
    for off, lo, hi in scales:
        d = (torch.rand(N, K // 256, generator=g) * (hi - lo) + lo).to(torch.float16)
        raw[:, :, off:off + 2] = d.view(torch.uint8).reshape(N, K // 256, 2)
    return raw.reshape(N, -1)


def random_matrix(nv, fmt: str, N: int, K: int, g):
    import torch
    if fmt in RANDOM_BLOCKS:
        return nv.PackedLinear(random_blocks(fmt, N, K, g), nv.format_id(fmt), N, K)
    return nv.PackedLinear.from_float(torch.randn(N, K, generator=g) * 0.02, fmt)


def relu2_row(K: int, zeros: float, g):
    """One row of relu² activations, a share `zeros` of them exactly zero."""
    import torch
    x = (torch.randn(1, K, generator=g).abs() + 0.05) ** 2
    x[torch.rand(1, K, generator=g) < zeros] = 0
    return x


def copies_past_caches(nv, m, memory: int) -> list:
    """m and copies of its packed weights filling `memory` bytes: called in turn, each call
    reads its weights from memory, as a decode step does."""
    return [m] + [nv.PackedLinear.from_packed(m.data.clone(), m.fmt, m.N, m.K, sparse=m.sparse)
                  for _ in range(max(1, memory // m.nbytes()) - 1)]


def sparse_seconds(nv, fmt: str, zeros: float, g, memory: int = 256 << 20) -> float:
    """Seconds per call of the exact sparse down projection (2048 x 8192, neuron-major) on one
    row of relu² activations, a share `zeros` of them exactly zero, the weights from memory."""
    import torch
    N, K = 2048, 8192
    x = relu2_row(K, zeros, g)
    if fmt in RANDOM_BLOCKS:
        raw = random_blocks(fmt, N, K, g)
    else:
        raw = nv.quantize(torch.randn(N, K, generator=g) * 0.02, fmt)
    copies = copies_past_caches(nv, nv.PackedLinear(raw, fmt, N, K, sparse=True), memory)

    def cycle() -> None:
        for c in copies:
            c(x)
    return seconds(cycle) / len(copies)


def worker(cases: list[str], gguf: str | None, prompt: int, threads: int, sparse: bool = False) -> dict:
    import torch

    import plm
    from plm.infer import native as nv
    torch.set_num_threads(threads)
    if not nv.load():
        raise SystemExit(f"native kernels unavailable: {nv.info()['reason']}")
    out: dict = {"plm": str(Path(plm.__file__).parent), "isa": nv.info()["isa"], "library": nv.info()["library"],
                 "cases": {}}
    g = torch.Generator().manual_seed(0)
    dec = None
    for case in cases:
        kind, *arg = case.split(":")
        if kind == "matrix":
            fmt, M = arg[0], int(arg[1])
            N, K = 8192, 2048
            m = random_matrix(nv, fmt, N, K, g)
            x = torch.randn(M, K, generator=g)
            out["cases"][case] = M * N * K / seconds(lambda: m(x)) / 1e9
            continue
        if kind == "sparse":
            out["cases"][case] = 1e3 * sparse_seconds(nv, arg[0], float(arg[1]) if len(arg) > 1 else 0.909, g)
            continue
        if dec is None:
            from plm.infer.native_decoder import NativeDecoder
            lengths = [prompt] + [int(c.split(":")[1]) for c in cases if c.split(":")[0] in ("prefill", "decode")]
            t0 = time.perf_counter()
            dec = NativeDecoder.from_gguf(gguf, capacity=max(lengths) + STEPS + 8, sparse=sparse)
            load_s = time.perf_counter() - t0
            out["down"] = dec.formats.get("0.down")  # its layout, e.g. "Q8_0 sparse"
        if kind == "load":  # the one load above: a second in this process would find the first's pages
            out["cases"][case] = load_s
            continue
        ids = lambda n: torch.randint(0, 1000, (n,), generator=g).tolist()  # noqa: E731
        if kind == "step":
            seqs = [dec.new_sequence() for _ in range(int(arg[0]))]
            for s in seqs:
                dec.prefill(s, ids(prompt), chunk=512)
            out["cases"][case] = 1e3 * seconds(lambda: dec.step(seqs, [5] * len(seqs)), 1.0, STEPS)
        elif kind == "decode":
            seqs = [dec.new_sequence()]
            dec.prefill(seqs[0], ids(int(arg[0])), chunk=512)
            out["cases"][case] = 1e3 * seconds(lambda: dec.step(seqs, [5]), 1.0, STEPS)
        elif kind == "prefill":
            T = int(arg[0])
            seqs = [dec.new_sequence()]
            tokens = ids(T)

            def once() -> None:
                dec.free(seqs[0])
                seqs[0] = dec.new_sequence()
                dec.prefill(seqs[0], tokens, chunk=512)
            out["cases"][case] = T / seconds(once, 1.0)
        else:
            raise SystemExit(f"unknown case {case!r} (matrix:FMT:M, step:B, prefill:T, decode:T, sparse:FMT[:Z], load)")
        for s in seqs:
            dec.free(s)
    return out


# ---- driver ------------------------------------------------------------------------------------

UNITS = {"matrix": ("G MAC/s", True), "step": ("ms", False), "decode": ("ms", False), "prefill": ("tok/s", True),
         "sparse": ("ms", False), "load": ("s", False)}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def side_commit(ref: str) -> str:
    """What a side ran, in words a later reader can check out: REF's commit, or for the working
    tree the commit it sits on and whether plm/ differs from it."""
    if ref != ".":
        return git("rev-parse", "--short=12", f"{ref}^{{commit}}")
    dirty = bool(git("status", "--porcelain", "--", "plm"))
    return f"working tree at {git('rev-parse', '--short=12', 'HEAD')}" + (" with plm/ changed" if dirty else "")


def side_root(ref: str, tmp: Path) -> Path:
    """The folder whose plm/ a side imports: the working tree for '.', else REF's plm/ exported."""
    if ref == ".":
        return REPO
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--base/--head: {ref!r} is not a commit of {REPO} ({sha.stderr.strip()})")
    root = tmp / sha.stdout.strip()[:12]
    if not root.exists():
        root.mkdir(parents=True)
        arch = subprocess.run(["git", "-C", str(REPO), "archive", sha.stdout.strip(), "plm"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=arch.stdout, check=True)
    return root


def side_env(root: Path, isa: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("PLM_NATIVE", None)
    if isa:
        env["PLM_NATIVE_ISA"] = isa
    else:
        env.pop("PLM_NATIVE_ISA", None)
    return env


def build_side(root: Path, env: dict) -> str:
    code = "from plm.infer import native; print(native.build())"
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"building the kernels of {root} failed:\n{p.stderr[-2000:]}")
    return p.stdout.strip().splitlines()[-1]


def run_side(root: Path, env: dict, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--cases", args.cases,
           "--threads", str(args.threads), "--prompt", str(args.prompt)] + (["--gguf", str(args.gguf)] if args.gguf else []) \
        + (["--sparse"] if args.sparse else [])
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"worker for {root} failed:\n{p.stderr[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if Path(res["plm"]).resolve() != (root / "plm").resolve():  # the side must import its own plm
        raise SystemExit(f"worker imported {res['plm']}, expected {root / 'plm'}")
    return res


def default_gguf() -> Path:
    """PLM-1.8B's shape, random weights, Q8_0: benchmarks/serve.py's file (made there if missing)."""
    from types import SimpleNamespace

    import serve  # benchmarks/serve.py: one place for the random checkpoint and its GGUF's name
    workdir = REPO / "runs/edge"
    return serve.gguf_q8(serve.checkpoint("plm-1.8b", SimpleNamespace(ckpt=None, workdir=workdir)), workdir)


def summarise(cases: list[str], rounds: list[dict]) -> list[dict]:
    rows = []
    for case in cases:
        unit, higher = UNITS[case.split(":")[0]]
        a = [r["base"]["cases"][case] for r in rounds]
        b = [r["head"]["cases"][case] for r in rounds]
        ma, mb = statistics.median(a), statistics.median(b)
        wins = sum((y > x) if higher else (y < x) for x, y in zip(a, b))
        rows.append({"case": case, "unit": unit, "base": ma, "head": mb, "base_rounds": a, "head_rounds": b,
                     "speedup": (mb / ma) if higher else (ma / mb), "head_wins": wins, "rounds": len(rounds)})
    return rows


def markdown(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ",
             f"Machine: {res['cpu']}, {res['cores']} cores, {res['threads']} threads; base = `{res['base']}` "
             f"({res['base_commit']}, {res['base_isa']}), head = `{res['head']}` ({res['head_commit']}, "
             f"{res['head_isa']}); {res['rounds']} rounds, "
             "sides alternating (A B, B A, ...), a fresh process per side and round.", "",
             "| case | unit | base (median) | head (median) | head speed-up | head better in | base rounds | head rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        fmt = lambda v: f"{v:.1f}" if v >= 10 else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['case']} | {r['unit']} | {fmt(r['base'])} | {fmt(r['head'])} | {r['speedup']:.3f}x | "
                     f"{r['head_wins']} of {r['rounds']} | {' '.join(fmt(v) for v in r['base_rounds'])} | "
                     f"{' '.join(fmt(v) for v in r['head_rounds'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="REF[@ISA] measured first in round 1 (default HEAD)")
    ap.add_argument("--head", default=".", help="REF[@ISA] (default '.': the working tree)")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated cases (default {DEFAULT_CASES})")
    ap.add_argument("--rounds", type=int, default=5, help="alternations (each: a process per side)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=65, help="prompt tokens per sequence of the step cases")
    ap.add_argument("--gguf", default=None, help="model for the decoder cases (default: PLM-1.8B shape, random, Q8_0)")
    ap.add_argument("--sparse", action="store_true",
                    help="the decoder cases with the exact sparse down projection (a model built with "
                         "benchmarks/edge.py --sparsity gives it a real share of zeros)")
    ap.add_argument("--out", default=None, help="folder for ab.json and ab.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if args.worker:
        print(json.dumps(worker(cases, args.gguf, args.prompt, args.threads, args.sparse)))
        return 0
    bad = [c for c in cases if c.split(":")[0] not in UNITS]
    if bad:
        ap.error(f"unknown case(s) {bad}: matrix:FMT:M, step:B, prefill:T, decode:T, sparse:FMT[:Z], load")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    sys.path.insert(0, str(REPO))
    from plm.bench.edge import machine_info
    if args.gguf is None and any(c.split(":")[0] not in ("matrix", "sparse") for c in cases):
        args.gguf = str(default_gguf())
    if args.gguf and not Path(args.gguf).is_file():
        ap.error(f"--gguf {args.gguf}: no such file")
    if args.gguf:
        args.gguf = str(Path(args.gguf).resolve())  # the workers run in their side's folder
    tmp = Path(tempfile.gettempdir()) / "plm-ab"
    sides = {}
    for name, spec in (("base", args.base), ("head", args.head)):
        ref, _, isa = spec.partition("@")
        root = side_root(ref, tmp)
        env = side_env(root, isa or None)
        log(f"{name} = {spec}: {root}; kernels {build_side(root, env)}")
        sides[name] = (root, env)
    rounds = []
    for i in range(args.rounds):
        order = ("base", "head") if i % 2 == 0 else ("head", "base")
        r = {}
        for name in order:
            r[name] = run_side(*sides[name], args)
        rounds.append(r)
        log(f"round {i + 1}/{args.rounds}: " + ", ".join(
            f"{c} {r['base']['cases'][c]:.3g} -> {r['head']['cases'][c]:.3g}" for c in cases))
    info = machine_info(args.threads)
    res = {"command": "python benchmarks/ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cpu": info["cpu"], "cores": info["cores"], "threads": args.threads, "torch": info["torch"],
           "base": args.base, "head": args.head, "base_commit": side_commit(args.base.partition("@")[0]),
           "head_commit": side_commit(args.head.partition("@")[0]), "base_isa": rounds[0]["base"]["isa"], "head_isa": rounds[0]["head"]["isa"],
           "base_down": rounds[0]["base"].get("down"), "head_down": rounds[0]["head"].get("down"),
           "rounds": args.rounds, "gguf": args.gguf, "sparse": args.sparse, "prompt": args.prompt, "rows": summarise(cases, rounds),
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    md = markdown(res)
    print(json.dumps(res, indent=1))
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ab.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "ab.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
