"""KV caches: one protocol, two layouts, shared by the reference model and the edge runtime.

* `FullCache`: decompressed K and V per layer, what the released runtimes (HF, llama.cpp) keep:
  num_heads * (qk_head_dim + v_head_dim) = 5120 values per token per layer for PLM-1.8B.
* `LatentCache`: MLA's latent cache, the normalised latent c (kv_lora_rank values) and the
  roped shared key (qk_rope_head_dim values): 576 values per token per layer, 8.9x less; the
  edge runtime attends against it with kv_b_proj absorbed.

Protocol, per forward pass of T new tokens: `reserve(length + T)`, then for every layer
`write(layer, ...)` (stores the new positions after `length`, returns the whole cached prefix
including them), then `advance(T)`. Buffers are preallocated and grow geometrically; only
written positions are ever touched. `select(index)` keeps batch rows (finished sequences
leave a batch); `nbytes()` counts the positions in use.
"""
from __future__ import annotations

from typing import Protocol

import torch

from plm.model.config import PLMConfig


class KVCacheProtocol(Protocol):
    kind: str
    length: int

    def reserve(self, n: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def select(self, index: torch.Tensor) -> None: ...
    def nbytes(self) -> int: ...


class _Buffers:
    """Per-layer buffers [layers, batch, ..., capacity (dim -2), width] allocated on first write."""

    kind = ""

    def __init__(self, config: PLMConfig, batch: int | None = None, capacity: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        self.config = config
        self.layers = config.num_hidden_layers
        self.batch, self.dtype, self.device = batch, dtype, device
        self.bufs: list[torch.Tensor] = []
        self.length = 0
        self._capacity = capacity
        if batch is not None and dtype is not None and capacity:
            self._allocate(capacity)

    def _shapes(self, capacity: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def _allocate(self, capacity: int) -> None:
        new = [torch.empty(s, dtype=self.dtype, device=self.device) for s in self._shapes(capacity)]
        for old, buf in zip(self.bufs, new):
            buf[..., :self.length, :] = old[..., :self.length, :]
        self.bufs = new
        self._capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    def reserve(self, n: int) -> None:
        if n > self.capacity and self.bufs:  # grow geometrically (a copy; rare when sized up front)
            self._allocate(max(n, 2 * self.capacity))
        elif not self.bufs:
            self._capacity = max(self._capacity, n)

    def _first_write(self, t: torch.Tensor) -> None:
        if not self.bufs:
            self.batch = t.shape[0] if self.batch is None else self.batch
            self.dtype = self.dtype or t.dtype
            self.device = t.device
            self._allocate(max(self._capacity, self.length + t.shape[-2]))

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, index: torch.Tensor) -> None:
        self.bufs = [b[:, index.to(b.device)] for b in self.bufs]
        self.batch = int(index.numel())

    def nbytes(self) -> int:
        """Bytes of the positions in use (batch x length x values per token x layers)."""
        if not self.bufs:
            return 0
        per_pos = sum(b[0, ..., 0, :].numel() for b in self.bufs) * self.layers
        return self.length * per_pos * self.bufs[0].element_size()

    def allocated_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs)


class FullCache(_Buffers):
    """Decompressed K [layers, B, H, capacity, qk_head_dim] and V [layers, B, H, capacity, v_head_dim]."""

    kind = "full"

    def _shapes(self, capacity: int) -> list[tuple[int, ...]]:
        c = self.config
        H = c.num_attention_heads
        return [(self.layers, self.batch, H, capacity, c.qk_head_dim), (self.layers, self.batch, H, capacity, c.v_head_dim)]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k [B, H, T, qk], v [B, H, T, v] after the cached positions; returns K, V [B, H, length+T, .]."""
        self._first_write(k)
        s, e = self.length, self.length + k.shape[2]
        self.reserve(e)
        K, V = self.bufs
        K[layer, :, :, s:e] = k
        V[layer, :, :, s:e] = v
        return K[layer, :, :, :e], V[layer, :, :, :e]

    def values_per_token(self) -> int:
        c = self.config
        return c.full_cache_dim * self.layers


class LatentCache(_Buffers):
    """The latent cache [layers, B, capacity, kv_lora_rank + qk_rope_head_dim]."""

    kind = "latent"

    def _shapes(self, capacity: int) -> list[tuple[int, ...]]:
        return [(self.layers, self.batch, capacity, self.config.latent_cache_dim)]

    def write(self, layer: int, c: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """c [B, T, rank] and k_rope [B, T, rope] after the cached positions; returns [B, length+T, 576]."""
        self._first_write(c)
        s, e = self.length, self.length + c.shape[1]
        self.reserve(e)
        buf = self.bufs[0]
        rank = self.config.kv_lora_rank
        buf[layer, :, s:e, :rank] = c
        buf[layer, :, s:e, rank:] = k_rope
        return buf[layer, :, :e]

    def values_per_token(self) -> int:
        return self.config.latent_cache_dim * self.layers
