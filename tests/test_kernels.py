"""The native kernels (plm/infer/csrc) against independent float64 references.

Weights are random GGUF blocks (any bytes are valid blocks once the fp16 scales are finite),
decoded by the `gguf` package's numpy dequantiser, which shares no code with ours. Each kernel
runs on every path this CPU supports (the AVX-512 cases skip here and run on AVX-512 hosts or
under scripts/check_avx512_emulated.sh).

Error bounds, and why they hold:
* Block formats quantise the activations per block of bs inputs (32, or 256 for K-quants):
  d = max|x| / 127 and q = round(x / d), so |x - d q| <= d / 2 per input. Against the exact
  product the error is therefore at most sum over blocks of d_b / 2 * sum_{k in b} |w_k|
  (`act_bound`), plus fp32 rounding of the per-block results.
* Against the activation-quantised product computed in float64 (`emulate`), each block's
  integer dot is exact and only the fp32 scale product and the fp32 accumulation over the
  nb blocks round: |error| <= (nb + 2) * 2^-24 * sum |d q| |w|; we allow 1e-5 of that sum.
* BF16 weights take bf16-rounded activations (|x - bf16(x)| <= 2^-9 |x|); float formats
  accumulate K products in fp32 (<= K * 2^-24 * sum |x| |w|).
* Paths (scalar, AVX2, AVX-512) compute the same integers and the same fp32 sequence per
  row for block formats: their outputs are compared bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plm.errors import PLMError
from plm.infer import native as nv

pytestmark = pytest.mark.skipif(not nv.load(), reason="native kernels not built (plm kernels build)")

REPO = Path(__file__).resolve().parents[1]
ISAS = nv.ISAS
BLOCK_FORMATS = (nv.Q8_0, nv.Q4_0, nv.Q4_K, nv.Q5_K, nv.Q6_K)
FLOAT_FORMATS = (nv.F32, nv.F16, nv.BF16)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if not nv.isa_supported(request.param):
        pytest.skip(f"this CPU has no {request.param} path")
    monkeypatch.setenv("PLM_AMX_MIN_BYTES", "0")  # the small test matrices on AMX tiles too
    nv.set_isa(request.param)
    yield request.param
    nv.set_isa("auto")


def random_blocks(fmt: int, N: int, K: int, rng: np.random.Generator) -> torch.Tensor:
    """N rows of random GGUF blocks of `fmt` (uint8 [N, row_bytes])."""
    if fmt in FLOAT_FORMATS:
        w = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32))
        return nv.quantize(w, fmt)
    bs, nbytes = nv.BLOCK[fmt]
    nb = K // bs
    raw = rng.integers(0, 256, size=(N, nb, nbytes), dtype=np.uint8)

    def put_f16(off: int, lo: float, hi: float) -> None:
        raw[:, :, off:off + 2] = rng.uniform(lo, hi, (N, nb)).astype(np.float16).view(np.uint8).reshape(N, nb, 2)

    if fmt in (nv.Q8_0, nv.Q4_0):
        put_f16(0, -0.05, 0.05)
    elif fmt in (nv.Q4_K, nv.Q5_K):
        put_f16(0, 0.0, 0.005)
        put_f16(2, 0.0, 0.005)
    else:  # Q6_K: d last
        put_f16(208, -0.001, 0.001)
    return torch.from_numpy(raw.reshape(N, -1).copy())


def act_block(fmt: int) -> int:
    return 256 if fmt in nv.SUPER_BLOCK else 32


def quant_act(x: torch.Tensor, bs: int) -> torch.Tensor:
    """The activations as the kernels see them (float64), per the definition above."""
    xb = x.double().reshape(x.shape[0], -1, bs)
    d = (xb.abs().amax(-1, keepdim=True).float() / 127.0).double()  # fp32 division, as the kernels
    inv = torch.where(d != 0, (1.0 / d.float()).double(), torch.zeros_like(d))
    q = torch.round((xb.float() * inv.float()).double())  # fp32 product, round half to even
    return (q * d).reshape(x.shape)


def check_block_gemv(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, fmt: int) -> None:
    bs = act_block(fmt)
    xq = quant_act(x, bs)
    emulate = xq @ w.T
    mag = xq.abs() @ w.abs().T
    assert (y.double() - emulate).abs().le(1e-5 * mag + 1e-30).all(), (y.double() - emulate).abs().max()
    exact = x.double() @ w.T
    d = x.double().reshape(x.shape[0], -1, bs).abs().amax(-1) / 127.0  # [M, nb]
    wl1 = w.abs().reshape(w.shape[0], -1, bs).sum(-1)  # [N, nb]
    act_bound = (d / 2) @ wl1.T
    assert (y.double() - exact).abs().le(act_bound + 1e-5 * mag + 1e-30).all()


SHAPES = [(1, 32), (17, 96), (33, 256), (50, 768), (16, 512)]  # N odd, K not a multiple of the unroll


@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=lambda f: nv.FORMAT_NAMES[f])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", (1, 2, 7, 13))  # 13: three calls of 4 rows (two tiles each), then one
def test_block_gemv_against_gguf_dequant(isa, fmt, N, K, M):
    if K % nv.BLOCK[fmt][0]:
        pytest.skip("K not a multiple of the block")
    rng = np.random.default_rng(N * 1000 + K + M + fmt)
    raw = random_blocks(fmt, N, K, rng)
    w = nv.dequantize_blocks(raw, fmt, N, K).double()
    lin = nv.PackedLinear(raw, fmt, N, K)
    assert torch.equal(lin.dequantize().double(), w)  # the repacked layout holds the file's values
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32)) * 3
    x[:, : K // 4] *= 0.01  # blocks of very different scales
    check_block_gemv(lin(x), x, w, fmt)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=lambda f: nv.FORMAT_NAMES[f])
# 13, 17, 40: calls of 4 rows x two tiles (AVX-512; pairs of rows on AVX2), then one row left over
@pytest.mark.parametrize("M", (1, 7, 13, 16, 17, 40))
def test_block_paths_bit_identical(fmt, M):
    rng = np.random.default_rng(fmt)
    N, K = 145, 768  # 10 tiles: two four-stream calls for one row, then the tiles left over
    raw = random_blocks(fmt, N, K, rng)
    lin = nv.PackedLinear(raw, fmt, N, K)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    outs = {}
    for isa in ISAS:
        if nv.isa_supported(isa):
            nv.set_isa(isa)
            outs[isa] = lin(x)
    nv.set_isa("auto")
    assert len(outs) >= 2
    ref = outs.pop("scalar")
    for isa, y in outs.items():
        assert torch.equal(y, ref), f"{isa} differs from scalar by {(y - ref).abs().max()}"


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=lambda f: nv.FORMAT_NAMES[f])
@pytest.mark.parametrize("N,K", [(1, 5), (17, 37), (9, 45), (33, 100), (50, 256), (17, 8200), (70, 512)])
# 7, 9: tiles of 4 (AVX-512 BF16) or 2 (AVX2) activation rows, then one alone; on AMX (K % 32 == 0)
# 16-row tiles: 17 and 40 end in a partial tile, 40 in a pair of tiles and one alone
@pytest.mark.parametrize("M", (1, 2, 7, 9, 17, 40))
def test_float_gemv(isa, fmt, N, K, M):
    rng = np.random.default_rng(N + K + M + fmt)
    raw = random_blocks(fmt, N, K, rng)
    w = nv.dequantize_blocks(raw, fmt, N, K).double()
    lin = nv.PackedLinear(raw, fmt, N, K)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    y = lin(x).double()
    xr = x.to(torch.bfloat16).double() if fmt == nv.BF16 else x.double()
    mag = xr.abs() @ w.abs().T
    assert (y - xr @ w.T).abs().le(K * 2.0 ** -24 * mag + 1e-30).all()
    if fmt == nv.BF16:  # and against unrounded activations, within bf16 rounding of x (8 significant bits: 2^-8)
        assert (y - x.double() @ w.T).abs().le((2.0 ** -8 + K * 2.0 ** -24) * (x.double().abs() @ w.abs().T)).all()
    for i in range(M):  # each row's arithmetic is independent of the batch (tiles, tails, alone)
        assert torch.equal(lin(x[i:i + 1]), y[i:i + 1].float()), i


def test_amx_only_for_large_bf16_matrices(monkeypatch):
    """On the amx path a BF16 matrix runs on AMX tiles from PLM_AMX_MIN_BYTES (1 MiB) on, and on
    vdpbf16ps below it (bit for bit the avx512 path's numbers); never for K % 32 != 0."""
    if not nv.isa_supported("amx"):
        pytest.skip("this CPU has no amx path")
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((5, 512)).astype(np.float32))

    def both(N, K):
        raw = random_blocks(nv.BF16, N, K, rng)
        outs = []
        for isa in ("avx512", "amx"):
            nv.set_isa(isa)
            outs.append(nv.PackedLinear(raw, nv.BF16, N, K)(x[:, :K]))
        nv.set_isa("auto")
        return outs

    small, large = (200, 512), (1030, 512)  # 200 KiB; 1.0 MiB and a partial tile of 6 rows
    assert torch.equal(*both(*small))
    a, b = both(*large)
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("PLM_AMX_MIN_BYTES", "0")
    a, b = both(*small)
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(*both(200, 500))  # K not a multiple of 32


@pytest.mark.parametrize("fmt", (nv.Q8_0, nv.Q4_K, nv.BF16), ids=lambda f: nv.FORMAT_NAMES[f])
def test_grouped_gemv(isa, fmt):
    """groups: each block of rows takes its own activation rows (absorbed MLA per head)."""
    rng = np.random.default_rng(7)
    G, ng, K, M = 3, 20, 256, 2
    raw = random_blocks(fmt, G * ng, K, rng)
    lin = nv.PackedLinear(raw, fmt, G * ng, K, groups=G)
    x = torch.from_numpy(rng.standard_normal((G * M, K)).astype(np.float32))
    y = lin(x)
    for g in range(G):
        part = nv.PackedLinear(raw[g * ng:(g + 1) * ng], fmt, ng, K)
        assert torch.equal(y[:, g * ng:(g + 1) * ng], part(x[g * M:(g + 1) * M]))


def relu2_acts(rng: np.random.Generator, M: int, K: int, zero_share: float) -> torch.Tensor:
    a = rng.standard_normal((M, K)).astype(np.float32)
    a = np.where(rng.random((M, K)) < zero_share, 0.0, np.abs(a)) ** 2
    return torch.from_numpy(a.astype(np.float32))


@pytest.mark.parametrize("fmt", (nv.Q8_0, nv.Q4_0, nv.Q4_K, nv.Q6_K, nv.F32, nv.F16, nv.BF16),
                         ids=lambda f: nv.FORMAT_NAMES[f])
@pytest.mark.parametrize("N", (64, 70, 130, 1100))
def test_sparse_down_equals_dense(isa, fmt, N):
    """Neuron-major down projection: the same numbers as the dense kernel on the same
    activations (bit for bit for block formats), reading only active neurons' rows. N = 1100 on
    one thread: one call covers every output, in two passes of the kernel's accumulators (1,024
    outputs at most per pass), the second ending in a partial chunk."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if N > 1024 else threads)
    try:
        _check_sparse_down(fmt, N)
    finally:
        torch.set_num_threads(threads)


def _check_sparse_down(fmt, N):
    rng = np.random.default_rng(N + fmt)
    K = 512
    raw = random_blocks(fmt, N, K, rng)
    dense = nv.PackedLinear(raw, fmt, N, K)
    sparse = nv.PackedLinear(raw, fmt, N, K, sparse=True)
    assert torch.equal(sparse.dequantize(), nv.dequantize_blocks(raw, fmt, N, K))
    a = relu2_acts(rng, 3, K, 0.9)
    a[1] = 0  # a row with nothing active
    a[2, :40] = 1.0  # and one with a dense head
    y_sparse, y_dense = sparse(a), dense(a)
    if fmt in BLOCK_FORMATS:
        assert torch.equal(y_sparse, y_dense)
    else:
        ar = a.to(torch.bfloat16).double() if fmt == nv.BF16 else a.double()
        w = nv.dequantize_blocks(raw, fmt, N, K).double()
        tol = 2 * K * 2.0 ** -24 * (ar.abs() @ w.abs().T)
        assert (y_sparse.double() - y_dense.double()).abs().le(tol + 1e-30).all()
    assert torch.equal(y_sparse[1], torch.zeros(N))

    # inactive neurons' rows are never read: scribbling over them changes nothing
    if fmt in BLOCK_FORMATS:
        np_ = (N + 63) // 64 * 64
        row = np_ if fmt in (nv.Q8_0, nv.Q6_K) else np_ // 2
        inactive = (a[0] == 0) & (a[2] == 0)
        poisoned = sparse.data.clone().view(-1)
        qrows = poisoned[: K * row].view(K, row)
        qrows[inactive] = torch.randint(0, 256, (int(inactive.sum()), row), dtype=torch.uint8)
        y2 = torch.ops.plm.sparse_gemv(poisoned, fmt, N, K, a)
        assert torch.equal(y2, y_sparse)


@pytest.mark.parametrize("fmt", (nv.Q8_0, nv.Q4_0, nv.Q4_K, nv.Q6_K), ids=lambda f: nv.FORMAT_NAMES[f])
@pytest.mark.parametrize("N", (64, 70, 1100))
def test_sparse_down_of_many_rows_equals_dense(isa, fmt, N):
    """From 6 activation rows on, the AVX-512 path multiplies the neuron-major layout as a
    dense product (the rows transposed in registers, shared by every activation
    row, only nonzero groups of 4 activations multiplied): bit for bit the dense kernel's
    numbers, on every path, for row counts from 6 to past one pass (256 rows), with negative
    activations (Q8_0's weights, not its inputs, are made unsigned) and with a row that has
    nothing active. A block of 32 neurons inactive in every row is never read."""
    rng = np.random.default_rng(7 * N + fmt)
    K = 1024
    raw = random_blocks(fmt, N, K, rng)
    dense = nv.PackedLinear(raw, fmt, N, K)
    sparse = nv.PackedLinear(raw, fmt, N, K, sparse=True)
    for M in (6, 7, 17, 300):  # 300: two passes of at most 256 rows
        a = relu2_acts(rng, M, K, 0.9)
        a[1] = 0
        a[2, :40] = 1.0
        a[3] = -a[3]
        a[:, 64:96] = 0  # block 2: inactive in every row
        y_sparse = sparse(a)
        assert torch.equal(y_sparse, dense(a)), M
        assert torch.equal(y_sparse[1], torch.zeros(N))
        np_ = (N + 63) // 64 * 64
        row = np_ if fmt in (nv.Q8_0, nv.Q6_K) else np_ // 2
        poisoned = sparse.data.clone().view(-1)
        poisoned[: K * row].view(K, row)[64:96] = torch.randint(0, 256, (32, row), dtype=torch.uint8)
        assert torch.equal(torch.ops.plm.sparse_gemv(poisoned, fmt, N, K, a), y_sparse)


def test_q5_k_has_no_sparse_layout():
    raw = random_blocks(nv.Q5_K, 64, 256, np.random.default_rng(0))
    with pytest.raises(PLMError, match="Q5_K has no sparse layout"):
        nv.PackedLinear(raw, nv.Q5_K, 64, 256, sparse=True)
    with pytest.raises(RuntimeError, match="no sparse layout for Q5_K"):
        torch.ops.plm.pack_sparse(raw.reshape(-1), nv.Q5_K, 64, 256)


@pytest.mark.parametrize("fmt", (nv.Q8_0, nv.Q4_0))
def test_quantisers_match_gguf(fmt):
    """Our Q8_0/Q4_0 quantisers write the same bytes as gguf-py's (ggml's reference)."""
    import gguf

    rng = np.random.default_rng(fmt)
    w = rng.standard_normal((40, 256)).astype(np.float32)
    w[3] = 0.0  # an all-zero row
    ours = nv.quantize(torch.from_numpy(w), fmt).numpy()
    theirs = np.ascontiguousarray(gguf.quants.quantize(w, gguf.GGMLQuantizationType(fmt))).view(np.uint8).reshape(40, -1)
    assert (ours != theirs).mean() < 1e-3  # exact .5 ties may round differently in rare cases
    deq = nv.dequantize_blocks(torch.from_numpy(ours), fmt, 40, 256).numpy()
    assert np.abs(deq - w).max() <= np.abs(w).max() / (127 if fmt == nv.Q8_0 else 7)


@pytest.mark.parametrize("fmt", (nv.Q4_K, nv.Q6_K), ids=("Q4_K", "Q6_K"))
def test_k_quantisers_match_ggml_bytes(fmt):
    """Our Q4_K and Q6_K quantisers write the bytes of ggml's own (`ggml_quantize_chunk` in the
    libggml-base that llama-cpp-python ships, no importance matrix): an all-zero row, a row a
    thousand times smaller than the rest, random rows."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so*"))
    if not libs:
        pytest.skip("llama-cpp-python without libggml-base")
    lib = ctypes.CDLL(libs[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rng = np.random.default_rng(fmt)
    w = rng.standard_normal((48, 1024)).astype(np.float32)
    w[3] = 0.0
    w[5] *= 1e-3
    w[7, :256] = 0.0  # one all-zero super-block
    theirs = np.zeros((48, nv.row_bytes(fmt, 1024)), np.uint8)
    assert lib.ggml_quantize_chunk(fmt, w.ctypes.data, theirs.ctypes.data, 0, 48, 1024, None) == theirs.size
    ours = nv.quantize(torch.from_numpy(w), fmt).numpy()
    assert np.array_equal(ours, theirs), (ours != theirs).mean()


def test_q4_k_quantiser_error():
    """Q4_K (scales and mins per 32, 6-bit) beats Q4_0 on the same weights and stays within
    its worst case of half a step per value."""
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.standard_normal((64, 1024)).astype(np.float32))
    errs = {}
    for fmt in (nv.Q4_K, nv.Q4_0):
        deq = nv.dequantize_blocks(nv.quantize(w, fmt), fmt, 64, 1024)
        errs[fmt] = float((deq - w).norm() / w.norm())
    assert errs[nv.Q4_K] < errs[nv.Q4_0] < 0.15, errs
    assert errs[nv.Q4_K] < 0.1


@pytest.mark.parametrize("H,D,rank", [(3, 40, 32), (3, 576, 512), (20, 42, 34), (2, 41, 33), (20, 64, 48)])
@pytest.mark.parametrize("S", (1, 5, 64, 65, 200, 600))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("f32", "bf16"))
def test_attention_kernel(isa, H, D, rank, S, dtype):
    """Against float64 softmax attention. Shapes: heads beyond one 16-lane group, pairs with a
    partial last vector (42/34), odd sizes (41/33: the bf16 path needs pairs, so the fp32
    kernel runs), cache lengths across the 64-row blocks; on AMX (D % 32 == 0, rank % 16 == 0:
    576/512, 64/48) a last partial tile of 16 rows and, at 600, chunks of 256 rows merged."""
    rng = np.random.default_rng(S + D)
    q = torch.from_numpy(rng.standard_normal((H, D)).astype(np.float32))
    cache = torch.from_numpy(rng.standard_normal((S, D)).astype(np.float32)).to(dtype)
    scale = D ** -0.5
    out = nv.attention(q, cache, rank, scale).double()
    c = cache.double()
    vmax = float(c[:, :rank].abs().max())
    bf16_dots = dtype == torch.bfloat16 and torch.ops.plm.isa().endswith("+bf16") and D % 2 == 0 and rank % 2 == 0
    # vdpbf16ps path: the query is rounded to bf16 (so is the reference's), and so is each
    # probability (relative error <= 2^-9): the weights of the convex combination move by at
    # most 2 * 2^-9 of themselves, the output by at most 2^-8 of the largest value
    qd = q.to(torch.bfloat16).double() if bf16_dots else q.double()
    p = ((qd @ c.T) * scale).softmax(-1)
    ref = p @ c[:, :rank]
    err = float((out - ref).abs().max())
    if bf16_dots:
        assert err <= 2 ** -8 * vmax + 1e-5 * vmax, err
    else:  # fp32 scores (D products) and exp (~1e-7): well under 1e-5 of the values' scale
        assert err <= 1e-5 * vmax * max(1.0, float(p.max() * S) ** 0.5), err


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=REPO, timeout=300)


FALLBACK_SCRIPT = """
import numpy as np, torch, sys
sys.path.insert(0, {tests!r})
from test_kernels import random_blocks
from plm.errors import PLMError
from plm.infer import native as nv
out = {{}}
for fmt in (nv.Q8_0, nv.Q4_0, nv.Q6_K, nv.BF16, nv.F16):
    rng = np.random.default_rng(fmt)
    N, K = 33, 512
    raw = random_blocks(fmt, N, K, rng)
    x = torch.from_numpy(rng.standard_normal((2, K)).astype(np.float32))
    out[f"y{{fmt}}"] = nv.PackedLinear(raw, fmt, N, K)(x)
    out[f"s{{fmt}}"] = nv.PackedLinear(raw, fmt, N, K, sparse=True)(x.abs())
    out[f"w{{fmt}}"] = nv.PackedLinear(raw, fmt, N, K).dequantize()
q = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32))
c = torch.from_numpy(np.random.default_rng(1).standard_normal((70, 40)).astype(np.float32))
out["attn"] = nv.attention(q, c, 32, 0.2)
out["native"] = torch.tensor(nv.load())
torch.save(out, {path!r})
"""


def test_forced_fallback_gives_the_same_results(tmp_path):
    """PLM_NATIVE=0 runs the PyTorch emulation of the same arithmetic: one notice line on
    stderr and results equal to the native kernels within fp32 rounding."""
    results = {}
    for native_on in ("1", "0"):
        path = tmp_path / f"out{native_on}.pt"
        proc = _run(FALLBACK_SCRIPT.format(tests=str(REPO / "tests"), path=str(path)), PLM_NATIVE=native_on)
        assert proc.returncode == 0, proc.stderr
        results[native_on] = torch.load(path)
        notices = [ln for ln in proc.stderr.splitlines() if "native kernels unavailable" in ln]
        assert len(notices) == (1 if native_on == "0" else 0), proc.stderr
    nat, fb = results["1"], results["0"]
    assert bool(nat.pop("native")) and not bool(fb.pop("native"))
    for k in nat:
        scale = float(nat[k].abs().max())
        assert torch.allclose(nat[k], fb[k], rtol=0, atol=2e-5 * scale), (k, (nat[k] - fb[k]).abs().max(), scale)


def test_load_without_a_build_falls_back_with_one_line(tmp_path):
    proc = _run("from plm.infer import native as nv; print(nv.load()); print(nv.info()['available'])",
                PLM_KERNEL_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    assert proc.stderr.strip().splitlines() == [
        "plm: native kernels unavailable (not built; run `plm kernels build`); using PyTorch kernels"]


def test_forcing_an_isa():
    proc = _run("from plm.infer import native as nv; nv.load(); print(nv.info()['isa'])", PLM_NATIVE_ISA="scalar")
    assert proc.returncode == 0 and proc.stdout.strip() == "scalar", proc.stderr
    proc = _run("from plm.infer import native as nv; nv.load()", PLM_NATIVE_ISA="neon")
    assert proc.returncode != 0 and "PLM_NATIVE_ISA=neon" in proc.stderr
    if not nv.isa_supported("avx512"):
        proc = _run("from plm.infer import native as nv; nv.load()", PLM_NATIVE_ISA="avx512")
        assert proc.returncode != 0 and "cannot run the avx512 kernels" in proc.stderr


def test_info_names_the_path():
    i = nv.info()
    assert i["available"] and i["isa"].split("+")[0] in ISAS and Path(i["library"]).exists()
    assert isinstance(i.get("build_seconds"), (int, float))


def test_kernels_benchmark_runs(tmp_path):
    """benchmarks/kernels.py at toy sizes: every case of both tables, rates from real timings."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/kernels.py"), "--threads", "1", "--lengths", "64",
                           "--rows", "1,5", "--formats", "q8_0,bf16,q5_k", "--memory-mb", "48", "--rounds", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "kernels.json").read_text())
    cases = {(r["kernel"], r["case"], r["shape"]) for r in res["rows"]}
    amx = torch.ops.plm.isa().startswith("amx")  # there the vdpbf16ps attention runs beside the tiles
    assert len(cases) == 3 + amx + 2 * 7 and all(r["ms"] > 0 and r["gmac_s"] > 0 for r in res["rows"])
    assert res["machine"]["isa"] == torch.ops.plm.isa()
    assert "| attention | ours, bf16 cache |" in (tmp_path / "kernels.md").read_text()
    assert ("| attention | ours, bf16 cache, vdpbf16ps (avx512 path) |" in (tmp_path / "kernels.md").read_text()) == amx
    # the vpdpbusd roofline: measured on AVX-512 VNNI hosts, each block-format row's share of it
    peak = res["machine"]["vnni_peak_gmac_s"]
    block = [r for r in res["rows"] if r["case"] in ("ours q8_0", "ours q4_0", "ours q4_k", "ours q5_k", "ours q6_k")]
    assert len(block) == 2 * 5
    if nv.isa_supported("avx512"):
        assert peak > 0 and all(r["of_peak"] == pytest.approx(r["gmac_s"] / peak) for r in block)
        assert "`vpdpbusd` issue rate" in (tmp_path / "kernels.md").read_text()
    else:
        assert peak is None and all(r["of_peak"] is None for r in res["rows"])
    # decode from memory: both shapes dense, the down shape sparse too (not Q5_K: no sparse
    # layout), against its own dense row
    mem = {(r["format"], r["shape"], r["kernel"]): r for r in res["memory"]}
    assert set(mem) == {(f, sh, k) for f in ("q8_0", "bf16") for sh, k in
                        (("8192 x 2048", "dense"), ("2048 x 8192", "dense"), ("2048 x 8192", "sparse"))} | \
        {("q5_k", "8192 x 2048", "dense"), ("q5_k", "2048 x 8192", "dense")}
    for f in ("q8_0", "bf16"):
        sp, dn = mem[(f, "2048 x 8192", "sparse")], mem[(f, "2048 x 8192", "dense")]
        assert abs(sp["zeros"] - 0.909) < 0.02 and sp["vs_dense"] == pytest.approx(dn["ms"] / sp["ms"])
        assert all(r["ms"] > 0 and r["gb_s"] > 0 for r in (sp, dn))
    assert "## Decode from memory" in (tmp_path / "kernels.md").read_text()
    # each row against the read probe of the same rounds
    probe = res["read_probe_gb_s"]
    assert probe > 0 and all(r["of_probe"] == pytest.approx(r["gb_s"] / probe) for r in res["memory"])
    assert f"**{probe:.1f} GB/s**" in (tmp_path / "kernels.md").read_text()


def test_ab_benchmark_alternates_two_paths(tmp_path, qwen2_micro_dir):
    """benchmarks/ab.py with HEAD's plm (exported by `git archive`) on the AVX2 path against this
    checkout's scalar path: each side's process imports its own plm and runs the path asked for;
    every case measured in every round (the decoder's load time among them); the summary is the
    rounds' medians."""
    from plm.export.gguf import export_gguf
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    gguf = export_gguf(qwen2_micro_dir, tmp_path / "micro-q8_0.gguf", "q8_0")
    base = "avx2" if nv.isa_supported("avx2") else "scalar"
    cases = "matrix:q8_0:2,matrix:q6_k:1,matrix:q5_k:1,load,step:2,decode:8,prefill:16,sparse:q4_0:0.9"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/ab.py"), "--base", f"HEAD@{base}", "--head", ".@scalar",
                           "--cases", cases, "--rounds", "2", "--prompt", "8", "--gguf", str(gguf), "--threads", "1",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "out/ab.json").read_text())
    assert res["base_isa"].split("+")[0] == base and res["head_isa"] == "scalar"
    assert res["base_commit"] == head.stdout.strip() and res["head_commit"].startswith(f"working tree at {head.stdout.strip()}")
    assert f"/plm-ab/{head.stdout.strip()};" in proc.stderr  # the base side ran from the exported tree
    rows = {r["case"]: r for r in res["rows"]}
    assert list(rows) == cases.split(",")
    for r in rows.values():
        assert len(r["base_rounds"]) == len(r["head_rounds"]) == 2 and min(r["base_rounds"] + r["head_rounds"]) > 0
        assert r["base"] == pytest.approx(sum(r["base_rounds"]) / 2)  # median of two
        higher = r["unit"] not in ("ms", "s")
        assert r["speedup"] == pytest.approx(r["head"] / r["base"] if higher else r["base"] / r["head"])
    assert rows["step:2"]["unit"] == rows["sparse:q4_0:0.9"]["unit"] == "ms" and rows["prefill:16"]["unit"] == "tok/s"
    assert rows["load"]["unit"] == "s" and max(rows["load"]["base_rounds"] + rows["load"]["head_rounds"]) < 60
    # the scalar path is the slow reference: the SIMD path beats it on the block matrices
    assert rows["matrix:q8_0:2"]["speedup"] < 1
    assert "| matrix:q8_0:2 | G MAC/s |" in (tmp_path / "out/ab.md").read_text()
    assert res["base_down"] == res["head_down"] == "Q8_0"
    # --sparse: both sides' decoders hold the down projection in the neuron-major layout
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/ab.py"), "--base", f"HEAD@{base}", "--head", ".@scalar",
                           "--sparse", "--cases", "decode:8", "--rounds", "1", "--prompt", "8", "--gguf", str(gguf),
                           "--threads", "1", "--out", str(tmp_path / "sparse")], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "sparse/ab.json").read_text())
    assert res["sparse"] and res["base_down"] == res["head_down"] == "Q8_0 sparse"
    assert res["rows"][0]["case"] == "decode:8" and min(res["rows"][0]["base_rounds"] + res["rows"][0]["head_rounds"]) > 0


def test_ab_benchmark_rejects_bad_input(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "benchmarks/ab.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120, cwd=REPO)
    p = run("--base", "no-such-ref", "--cases", "matrix:q8_0:1")
    assert p.returncode != 0 and "'no-such-ref' is not a commit" in p.stderr
    p = run("--cases", "matrix:q8_0:1,warp:3")
    assert p.returncode != 0 and "unknown case(s) ['warp:3']" in p.stderr
    p = run("--cases", "step:2", "--gguf", str(tmp_path / "missing.gguf"))
    assert p.returncode != 0 and "missing.gguf: no such file" in p.stderr


HUGE_SCRIPT = """
import json, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from test_kernels import random_blocks
from plm.infer import native as nv
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((3, 2048)).astype(np.float32))
out = {{}}
for name, fmt, N, sparse in (("q8_0", nv.Q8_0, 3000, False), ("q4_0", nv.Q4_0, 4000, False),
                             ("q6_k", nv.Q6_K, 3000, False), ("q8_0-sparse", nv.Q8_0, 3000, True),
                             ("bf16", nv.BF16, 1500, False)):
    raw = random_blocks(fmt, N, 2048, rng)
    lin = nv.PackedLinear(raw, fmt, N, 2048, sparse=sparse)
    ptr, size = lin.data.data_ptr(), lin.data.numel()
    huge = 0
    for line in open("/proc/self/smaps"):
        f = line.split()
        if "-" in f[0] and len(f) >= 5 and not f[0].endswith(":"):
            lo, hi = (int(v, 16) for v in f[0].split("-"))
            inside = lo <= ptr < hi
        elif inside and f[0] == "AnonHugePages:":
            huge = int(f[1]) * 1024
    y = lin(x[:1]) if sparse else lin(x)
    ref = lin.dequantize().double()
    xs = x[:1 if sparse else 3].double()
    out[name] = {{"aligned": ptr % (2 << 20) == 0, "size": size, "huge": huge,
                 "err": float((y.double() - xs @ ref.T).abs().max() / (xs.abs() @ ref.abs().T).max())}}
print(json.dumps(out))
"""


def test_packed_weights_on_huge_pages():
    """Packed block-format weights of 4 MiB and more (tile and sparse layouts) lie on 2 MiB
    transparent huge pages where Linux grants them (THP 'madvise' or 'always', read back from
    /proc/self/smaps): whole huge pages only, the tail on 4 KiB pages; BF16 (a plain copy) is
    checked for its products only.
    The products as with PLM_HUGE_PAGES=0, bit for bit, and within int8 rounding of float64
    over the file's values."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("no transparent huge pages on this system")
    runs = {}
    for flag in ("1", "0"):
        proc = _run(HUGE_SCRIPT.format(tests=str(REPO / "tests")), PLM_HUGE_PAGES=flag)
        assert proc.returncode == 0, proc.stderr
        runs[flag] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in runs["1"].items():
        # float weights stay a plain copy (faster to load, no faster to decode)
        if name != "bf16":
            assert r["size"] >= 4 << 20 and r["aligned"], (name, r)
            assert r["huge"] == r["size"] // (2 << 20) * (2 << 20), (name, r)  # whole 2 MiB pages, no tail page
        assert r["err"] < 1e-2, (name, r)  # against float64 over the file's values (int8 activations: ~1/254)
        assert r["err"] == runs["0"][name]["err"], name  # the same products, bit for bit
    # Not checked: which pages the allocator's buffers (BF16, and everything with PLM_HUGE_PAGES=0)
    # get. numpy advises huge pages for its large arrays and the allocator may hand that memory
    # on, and the allocator may itself return a page-aligned mapping of its own, so neither the
    # pages nor the mapping tell our buffers from its.
