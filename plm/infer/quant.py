"""Weight-only quantisation for CPU decode, on PyTorch's own packed kernels.

* int8: symmetric, one scale per output channel, `torch._weight_int8pack_mm` (bf16 activations).
* int4: asymmetric, one scale and zero point per group of `group_size` input channels,
  `torch._weight_int4pack_mm_for_cpu` (the kernel torchao's int4 CPU path uses).

Every projection is one of the `Linear` classes below; `y = lin(x)` takes x [M, K] and returns
[M, N] in the runtime dtype. Row access (`rows(idx)`), which the sparse MLP uses to compute only
the predicted-active neurons of up_proj, exists for dense and int8 weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plm.errors import PLMError

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 64


class Linear:
    """y = x @ W^T for W [N, K]."""

    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def rows(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x @ W[idx]^T: only output channels idx (reads only those rows of W)."""
        raise NotImplementedError(f"{type(self).__name__} has no row access")


class DenseLinear(Linear):
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.out_features, self.in_features = w.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1:  # decode: matrix-vector (about 2x F.linear's speed)
            return torch.mv(self.w, x[0])[None]
        return F.linear(x, self.w)

    def rows(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self(x) if idx.numel() == self.out_features else DenseLinear(self.w.index_select(0, idx))(x)

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous bf16 rows [M, K]: the int8 / int4 CPU kernels refuse a strided input, and
    the runtime hands o_proj a transposed view when several rows attend at once."""
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~ q * scale[:, None]; q in [-127, 127]."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(Linear):
    """int8 weights [N, K] with a bf16 scale per output channel."""

    def __init__(self, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> None:
        q, scale = quantize_int8(w)
        self.q, self.scale = q, scale.to(torch.bfloat16)
        self.out_features, self.in_features = q.shape
        self.out_dtype = out_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        y = torch._weight_int8pack_mm(x2, self.q, self.scale).to(self.out_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def rows(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(_rows(x), self.q.index_select(0, idx),
                                         self.scale.index_select(0, idx)).to(self.out_dtype)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


def int4_supported(w: torch.Tensor, group_size: int = INT4_GROUP) -> bool:
    n, k = w.shape
    return k % group_size == 0 and k % 32 == 0 and n % 16 == 0  # the CPU kernel's tiling


class Int4Linear(Linear):
    """Asymmetric int4 with a (scale, zero) pair per group of input channels.

    Stored as the CPU kernel's packed layout (uint8 [N, K/2]) plus bf16 scales/zeros
    [K/group, N, 2]; the kernel dequantises w = (q - 8) * scale + zero.
    """

    def __init__(self, w: torch.Tensor, group_size: int = INT4_GROUP,
                 out_dtype: torch.dtype = torch.bfloat16) -> None:
        if not int4_supported(w, group_size):
            raise PLMError(f"int4 needs in_features divisible by {group_size} and out_features by 16, "
                           f"got {tuple(w.shape)}")
        n, k = w.shape
        wg = w.float().view(n, k // group_size, group_size)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((wg - lo) / scale).clamp(0, 15).to(torch.int32).view(n, k)
        zero = lo + 8 * scale
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.sz = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1) \
            .contiguous().to(torch.bfloat16)
        self.group_size = group_size
        self.out_features, self.in_features = n, k
        self.out_dtype = out_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.sz).to(self.out_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.packed.numel() + self.sz.numel() * 2


def make_linear(w: torch.Tensor, quant: str = "none", dtype: torch.dtype = torch.bfloat16) -> Linear:
    """A projection in the requested format; int4 falls back to int8 where its kernel cannot tile."""
    if quant == "none":
        return DenseLinear(w.to(dtype).contiguous())
    if quant == "int8":
        return Int8Linear(w, out_dtype=dtype)
    if quant == "int4":
        return Int4Linear(w, out_dtype=dtype) if int4_supported(w) else Int8Linear(w, out_dtype=dtype)
    raise PLMError(f"unknown quantisation {quant!r}; choose from {', '.join(QUANT_MODES)}")


class QuantEmbedding:
    """Tied embedding / lm_head in int8 rows: lookup dequantises only the rows it needs."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype) -> None:
        self.lin = Int8Linear(w, out_dtype=dtype)
        self.dtype = dtype

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        q = F.embedding(ids, self.lin.q).to(self.dtype)
        return q * F.embedding(ids, self.lin.scale[:, None]).to(self.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def nbytes(self) -> int:
        return self.lin.nbytes()


class DenseEmbedding:
    def __init__(self, w: torch.Tensor, dtype: torch.dtype) -> None:
        self.w = w.to(dtype).contiguous()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1:
            return torch.mv(self.w, x[0])[None]
        return F.linear(x, self.w)

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()
