"""PLM's native CPU kernels (plm/infer/csrc): build, cache, load, and Python wrappers.

The C++ library is a PyTorch extension whose operators are `torch.ops.plm.*`. One build holds
every path (AMX-BF16 tiles for 16-bit weights on the Xeons that have them, AVX-512 with
VNNI/BF16, AVX2, portable scalar); the best one the CPU supports is
chosen when the library loads. It is compiled once, by `plm kernels build`
(`make setup` runs it), into a cache folder keyed by the sources, the torch version and the
compiler flags (`~/.cache/plm/kernels/<key>/`, or `$PLM_KERNEL_CACHE/<key>/`). Normal use
never compiles: `load()` imports the built library if it is there and otherwise returns False
after one line on stderr, and callers use the PyTorch kernels.

Environment:
  PLM_NATIVE=0                      use the PyTorch kernels even if the library is built
  PLM_NATIVE_ISA=amx|avx512|avx2|scalar  force a path (an error if the CPU lacks it)
  PLM_AMX_MIN_BYTES=N               on the amx path, BF16 matrices of at least N bytes (default
                                    1 MiB) use AMX tiles; smaller ones stay on vdpbf16ps
  PLM_HUGE_PAGES=0                  packed weights on 4 KiB pages (default: block-format matrices of
                                    4 MiB and more on 2 MiB transparent huge pages where Linux grants
                                    them)
  PLM_KERNEL_CACHE=DIR              cache folder
  PLM_KERNEL_EMULATE_AVX512=1       (tests only) build the AVX-512 kernels against SIMDe's
                                    portable emulation, to check them on a host without AVX-512

Formats are GGML type ids (`F32`, `F16`, `BF16`, `Q8_0`, `Q4_0`, `Q4_K`, `Q5_K`, `Q6_K`); weights
arrive as GGUF blocks (`quantize` makes them from float weights) and are repacked by `pack`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from plm.errors import PLMError

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ops.cpp", "pack.cpp", "pool.cpp", "decoder.cpp", "kernels_scalar.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp",
           "kernels_avx512bf16.cpp", "kernels_amx.cpp")
HEADERS = ("plm_kernels.h", "plm_native.h", "simde_shim.h", "avx512_sum.h", "avx512_attn.h")
# -ffp-contract=off: the compiler must not fuse a*b+c on its own; the kernels place their
# FMAs explicitly so that every path computes the same fp32 sequence.
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wno-unused-function",
          "-Wno-unknown-pragmas")
# at::parallel_for is an inline template over OpenMP: without -fopenmp it runs serially. The
# libgomp.so.1 this links against is torch's own copy, already loaded under that soname.
LDFLAGS = ("-fopenmp",)
EMULATE_CFLAGS = ("-DPLM_SIMDE", "-DPLM_EMULATED_AVX512")
LIB = "plm_native.so"

# GGML type ids
F32, F16, Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 8, 12, 13, 14, 30
FORMATS = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_k": Q4_K, "q5_k": Q5_K,
           "q6_k": Q6_K}
FORMAT_NAMES = {v: k.upper() for k, v in FORMATS.items()}
BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, 34), Q4_0: (32, 18), Q4_K: (256, 144), Q5_K: (256, 176),
         Q6_K: (256, 210)}
SUPER_BLOCK = (Q4_K, Q5_K, Q6_K)  # K-quants: 256 inputs a block, activations quantised per 256
QUANTISABLE = (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K)  # float -> GGUF blocks (no Q5_K quantiser)
NO_SPARSE = (Q5_K,)  # block formats without the neuron-major sparse layout

_state: dict = {"tried": False, "loaded": False, "reason": None, "path": None}


# ---------------------------------------------------------------------------------------
# build, cache, load


def _emulate() -> bool:
    return os.environ.get("PLM_KERNEL_EMULATE_AVX512", "") not in ("", "0")


def _flags() -> tuple[str, ...]:
    return CFLAGS + (EMULATE_CFLAGS if _emulate() else ())


def cache_root() -> Path:
    return Path(os.environ.get("PLM_KERNEL_CACHE") or Path.home() / ".cache" / "plm" / "kernels")


def build_key() -> str:
    """Hash of the sources, the torch version, the compiler flags and the Python ABI."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    h.update(f"{torch.__version__}|{' '.join(_flags() + LDFLAGS)}|{sys.implementation.cache_tag}|{os.uname().machine}".encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return cache_root() / build_key() / LIB


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return cxx


def build(verbose: bool = False) -> Path:
    """Compile the library into the cache (a no-op when this key is built) and return its path.
    Built in a temporary folder and renamed into place, so a half-finished build is never used."""
    from torch.utils.cpp_extension import load as cpp_load

    final = cache_root() / build_key()
    if (final / LIB).exists():
        return final / LIB
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.time()
    try:
        cpp_load(name="plm_native", sources=[str(CSRC / s) for s in SOURCES], extra_cflags=list(_flags()),
                 extra_ldflags=list(LDFLAGS), build_directory=str(tmp), is_python_module=False, verbose=verbose)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {"build_seconds": round(time.time() - t0, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__, "compiler": _compiler(), "flags": list(_flags()), "key": final.name,
            "threads": os.cpu_count()}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for junk in tmp.iterdir():  # keep the library and its record, not the objects
        if junk.name not in (LIB, "meta.json"):
            shutil.rmtree(junk) if junk.is_dir() else junk.unlink()
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same key first
        shutil.rmtree(tmp, ignore_errors=True)
    _state.update(tried=True, loaded=True, reason=None, path=str(final / LIB))
    return final / LIB


def _notice(reason: str) -> None:
    print(f"plm: native kernels unavailable ({reason}); using PyTorch kernels", file=sys.stderr)


def load() -> bool:
    """Import the built library (once per process). False, after one line on stderr, when it is
    disabled, not built or cannot load; never compiles and never raises, except for a
    PLM_NATIVE_ISA the CPU cannot run."""
    if _state["tried"]:
        return _state["loaded"]
    _state["tried"] = True
    if os.environ.get("PLM_NATIVE", "1") == "0":
        _state["reason"] = "PLM_NATIVE=0"
    else:
        path = library_path()
        if not path.exists():
            _state["reason"] = "not built; run `plm kernels build`"
        else:
            try:
                torch.ops.load_library(str(path))
                _state.update(loaded=True, path=str(path))
            except Exception as e:  # a broken or foreign build: fall back, say why
                _state["reason"] = f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if not _state["loaded"]:
        _notice(_state["reason"])
        return False
    isa = os.environ.get("PLM_NATIVE_ISA")
    if isa:
        try:
            torch.ops.plm.set_isa(isa)
        except RuntimeError as e:
            raise PLMError(f"PLM_NATIVE_ISA={isa}: {_first_line(e)}") from None
    return True


def available() -> bool:
    return load()


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def require() -> None:
    if not load():
        raise PLMError(f"native kernels unavailable ({_state['reason']})")


ISAS = ("amx", "avx512", "avx2", "scalar")  # the paths set_isa and PLM_NATIVE_ISA can force ('auto': the best one)


def set_isa(name: str) -> None:
    """Switch the kernel path at run time ('auto' or one of ISAS)."""
    require()
    try:
        torch.ops.plm.set_isa(name)
    except RuntimeError as e:
        raise PLMError(_first_line(e)) from None


def info() -> dict:
    """Which path runs, where the library is, and how it was built."""
    ok = load()
    out = {"available": ok, "reason": _state["reason"], "library": _state["path"] or str(library_path()),
           "key": build_key(), "cache": str(cache_root()), "torch": torch.__version__}
    meta = Path(out["library"]).parent / "meta.json"
    if meta.exists():
        out.update({k: v for k, v in json.loads(meta.read_text()).items() if k in ("build_seconds", "built_at", "compiler")})
    if ok:
        out["isa"] = torch.ops.plm.isa()
        out["cpu_features"] = torch.ops.plm.cpu_features()
    return out


def isa_supported(name: str) -> bool:
    """Whether this CPU can run the given path (for tests)."""
    require()
    current = torch.ops.plm.isa().split("+")[0]
    try:
        torch.ops.plm.set_isa(name)
        return True
    except RuntimeError:
        return False
    finally:
        torch.ops.plm.set_isa(current)


# ---------------------------------------------------------------------------------------
# formats


def format_id(fmt: str | int) -> int:
    if isinstance(fmt, int):
        if fmt not in BLOCK:
            raise PLMError(f"unsupported weight type {fmt}")
        return fmt
    if fmt.lower() not in FORMATS:
        raise PLMError(f"unknown weight format {fmt!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[fmt.lower()]


def row_bytes(fmt: int, K: int) -> int:
    bs, nbytes = BLOCK[fmt]
    if K % bs:
        raise PLMError(f"{FORMAT_NAMES[fmt]} needs rows of a multiple of {bs} values, got {K}")
    return K // bs * nbytes


def quantize(w: torch.Tensor, fmt: str | int) -> torch.Tensor:
    """float [N, K] -> GGUF blocks uint8 [N, row_bytes] (Q8_0, Q4_0, Q4_K, Q6_K as ggml's reference
    quantisers; F32/F16/BF16 casts). Native when loaded, else through the `gguf` package."""
    fmt = format_id(fmt)
    if fmt not in QUANTISABLE:
        raise PLMError(f"no quantiser for {FORMAT_NAMES[fmt]}")
    row_bytes(fmt, w.shape[1])
    if load():
        return torch.ops.plm.quantize(w.float().contiguous(), fmt)
    if fmt == BF16:
        return w.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(w.shape[0], -1)
    import gguf

    if fmt in SUPER_BLOCK:
        raise PLMError(f"{FORMAT_NAMES[fmt]} quantisation needs the native kernels (`plm kernels build`)")
    arr = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType(fmt))
    return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).reshape(w.shape[0], -1))


def dequantize_blocks(raw: torch.Tensor | np.ndarray, fmt: int, N: int, K: int) -> torch.Tensor:
    """GGUF blocks -> float32 [N, K] through the `gguf` package (an independent decoder)."""
    import gguf

    arr = np.ascontiguousarray(raw.numpy() if isinstance(raw, torch.Tensor) else raw).view(np.uint8).reshape(N, -1)
    if fmt == BF16:
        return torch.from_numpy(arr.copy()).view(torch.bfloat16).float().reshape(N, K)
    out = gguf.quants.dequantize(arr, gguf.GGMLQuantizationType(fmt))
    return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(N, K).copy())


# ---------------------------------------------------------------------------------------
# PyTorch fallback of the kernels' arithmetic (used when the library is not loaded)


def _quant_act(x: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As the kernels: per block d = max|x| / 127, q = round-half-even(x * (1 / d))."""
    M, K = x.shape
    xb = x.float().reshape(M, K // bs, bs)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None])
    return q.reshape(M, K), d


def _fallback_linear(raw: torch.Tensor, fmt: int, N: int, K: int, x: torch.Tensor,
                     cache: dict) -> torch.Tensor:
    """y = x W^T emulating the native arithmetic: block formats quantise the activations as the
    kernels do and sum per block (exact integers in float64), then scale."""
    if "w" not in cache:
        cache["w"] = dequantize_blocks(raw, fmt, N, K).double()
    w = cache["w"]
    x = x.float()
    if fmt in (F32, F16):
        return (x.double() @ w.T).float()
    if fmt == BF16:
        return (x.to(torch.bfloat16).double() @ w.T).float()
    bs = 256 if fmt in SUPER_BLOCK else 32
    q, d = _quant_act(x, bs)
    # integer dots per activation block against the exactly dequantised weights: the same
    # numbers as the kernels up to the order of fp32 rounding
    xq = (q.double().reshape(-1, K // bs, bs) * d.double()[..., None]).reshape(-1, K)
    return (xq @ w.T).float()


# ---------------------------------------------------------------------------------------
# matrices


class PackedLinear:
    """One weight matrix W [N, K] kept in a GGUF format; `y = lin(x)` for x [M, K] returns fp32
    [M, N]. `groups` > 1 splits the rows into groups that each take their own activation rows
    (x [groups * M, K], group-major). `sparse=True` stores the neuron-major layout of the sparse
    relu² down projection (`lin(a)` then skips zero activations; same numbers as dense).

    Native kernels when loaded, else the PyTorch emulation of the same arithmetic."""

    def __init__(self, raw: torch.Tensor, fmt: int, N: int, K: int, groups: int = 1, sparse: bool = False,
                 name: str = "matrix") -> None:
        self.fmt, self.N, self.K, self.groups, self.sparse, self.name = format_id(fmt), N, K, groups, sparse, name
        expect = N * row_bytes(self.fmt, K)
        if raw.numel() != expect:
            raise PLMError(f"{name}: {FORMAT_NAMES[self.fmt]} [{N}, {K}] needs {expect} bytes, got {raw.numel()}")
        if groups < 1 or N % groups:
            raise PLMError(f"{name}: {N} rows do not split into {groups} groups")
        if sparse and self.fmt in NO_SPARSE:
            raise PLMError(f"{name}: {FORMAT_NAMES[self.fmt]} has no sparse layout; quantise the matrix to Q8_0 for it")
        self.raw = raw.contiguous().view(torch.uint8).reshape(N, -1)
        self.native = load()
        self.data: torch.Tensor | None = None
        self._cache: dict = {}
        if self.native:
            ops = torch.ops.plm
            self.data = ops.pack_sparse(self.raw, self.fmt, N, K) if sparse else ops.pack(self.raw, self.fmt, N, K, groups)

    @classmethod
    def from_packed(cls, data: torch.Tensor, fmt: int, N: int, K: int, groups: int = 1, sparse: bool = False,
                    name: str = "matrix") -> "PackedLinear":
        """A matrix already in the kernels' packed layout (as `NativeDecoder.matrices` returns
        them); needs the native kernels."""
        require()
        self = cls.__new__(cls)
        self.fmt, self.N, self.K, self.groups, self.sparse, self.name = format_id(fmt), N, K, groups, sparse, name
        self.raw, self.native, self.data, self._cache = None, True, data, {}
        return self

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: str | int, **kw) -> "PackedLinear":
        fmt = format_id(fmt)
        return cls(quantize(w, fmt), fmt, w.shape[0], w.shape[1], **kw)

    def nbytes(self) -> int:
        return (self.data if self.data is not None else self.raw).numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.K:
            raise PLMError(f"{self.name}: expected activations [M, {self.K}], got {tuple(x.shape)}")
        if self.native:
            if self.sparse:
                return torch.ops.plm.sparse_gemv(self.data, self.fmt, self.N, self.K, x)
            return torch.ops.plm.gemv(self.data, self.fmt, self.N, self.K, x, self.groups)
        if self.groups == 1:
            return _fallback_linear(self.raw, self.fmt, self.N, self.K, x, self._cache)
        M, G, ng = x.shape[0] // self.groups, self.groups, self.N // self.groups
        outs = [_fallback_linear(self.raw[g * ng:(g + 1) * ng], self.fmt, ng, self.K, x[g * M:(g + 1) * M],
                                 self._cache.setdefault(g, {})) for g in range(G)]
        return torch.cat(outs, dim=1)

    def dequantize(self) -> torch.Tensor:
        """The weights as float32 [N, K] (from the packed layout when native: checks packing)."""
        if self.native:
            return torch.ops.plm.dequantize(self.data, self.fmt, self.N, self.K, self.groups, self.sparse)
        return dequantize_blocks(self.raw, self.fmt, self.N, self.K)


def attention(q: torch.Tensor, cache: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """Absorbed-MLA attention of query heads q [H, D] over latent cache rows [S, D]; returns the
    attended latents [H, rank] (the first `rank` columns of the cache are the values)."""
    if load():
        return torch.ops.plm.attention(q, cache, rank, scale)
    p = ((q.float() @ cache.float().T) * scale).softmax(-1)
    return p @ cache.float()[:, :rank]
