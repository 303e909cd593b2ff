"""Memory-mapped safetensors and layer-wise weight streaming under a memory budget.

`MappedCheckpoint` maps every safetensors file of a checkpoint (MAP_PRIVATE, never written)
and hands out zero-copy tensor views. A tensor's pages enter the process's resident set only
when read, and `release()` hands them back (madvise DONTNEED), so a layer that is streamed
costs resident memory only while it is being computed.

`LayerStore` decides which decoder layers stay resident: with a budget, the embedding, norms
and as many leading layers as fit are kept; every other layer is read from the mapping each
time it is needed (prefetched one layer ahead by a helper thread) and released after use.
On a device whose RAM is smaller than the model, the kernel's page cache cannot hold the file
either, and a streamed layer's speed is that of the storage it is read from; on a machine
with RAM to spare (as in our benchmarks) the file stays in the page cache and streaming costs
page faults and memory bandwidth only. docs/edge.md says which one a figure measures.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
from pathlib import Path
from typing import Callable

import torch

from plm.errors import CheckpointError
from plm.model.checkpoint import safetensors_header, weight_map
from plm.utils import parse_size

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault pages in ahead of use (ignored where unknown)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class _MappedFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        header = safetensors_header(path)  # checked against the file size
        try:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map the file ({e})") from None
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, (shape, dtype, start, end) in header.items():
            if dtype not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            self.entries[name] = (_ST_DTYPES[dtype], shape, start, end)


class MappedCheckpoint:
    """Zero-copy, read-only views of a checkpoint's tensors through mmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.wmap = weight_map(self.path)
        self.files = {f: _MappedFile(f) for f in sorted(set(self.wmap.values()))}

    def keys(self) -> list[str]:
        return list(self.wmap)

    def _entry(self, name: str):
        if name not in self.wmap:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing from the checkpoint")
        f = self.files[self.wmap[name]]
        if name not in f.entries:
            raise CheckpointError(f"{f.path}: index lists {name!r} but the file does not hold it")
        return f, f.entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1][1]

    def view(self, name: str) -> torch.Tensor:
        f, (dtype, shape, start, end) = self._entry(name)
        n = (end - start) // torch.empty((), dtype=dtype).element_size()
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(f.map, dtype=dtype, count=n, offset=start).view(shape)

    def nbytes(self, name: str) -> int:
        _, (_, _, s, e) = self._entry(name)
        return e - s

    def _advise(self, names: list[str], advice: int) -> None:
        for name in names:
            f, (_, _, s, e) = self._entry(name)
            a = s - s % PAGE
            length = e - a
            if advice == mmap.MADV_DONTNEED:  # only whole pages this tensor owns
                a = -(-s // PAGE) * PAGE
                length = (e // PAGE) * PAGE - a
            if length > 0:
                # through libc so the GIL is released while the kernel faults pages in; a
                # failure (an old kernel without MADV_POPULATE_READ) only loses the optimisation
                _libc.madvise(ctypes.c_void_p(f.addr + a), ctypes.c_size_t(length), advice)

    def release(self, names: list[str]) -> None:
        """Drop these tensors' pages from the resident set (re-read from the file on next use)."""
        self._advise(names, mmap.MADV_DONTNEED)

    def prefetch(self, names: list[str]) -> None:
        self._advise(names, MADV_POPULATE_READ)


def parse_budget(budget: int | str | None) -> int | None:
    """A memory budget in bytes ('2GB', '1.5GiB', 2_000_000_000); None or 0 = no budget."""
    if budget is None or budget == "" or budget == 0:
        return None
    return parse_size(budget, "memory budget")


class LayerStore:
    """Decoder layers, resident or streamed.

    build(i, get) prepares layer i from a tensor getter (name suffix -> tensor); `names(i)` lists
    the checkpoint tensors of layer i. With budget None every layer is prepared once.
    """

    def __init__(self, n_layers: int, names: Callable[[int], list[str]], build_resident: Callable[[int], object],
                 build_streamed: Callable[[int], object] | None = None, ckpt: MappedCheckpoint | None = None,
                 resident: int | None = None) -> None:
        self.n = n_layers
        self.names = names
        self.ckpt = ckpt
        self.n_resident = n_layers if resident is None else max(0, min(resident, n_layers))
        self.resident = [build_resident(i) for i in range(self.n_resident)]
        self.build_streamed = build_streamed
        self._prefetch_thread: threading.Thread | None = None
        self.streamed_reads = 0

    @property
    def streaming(self) -> bool:
        return self.n_resident < self.n

    def _prefetch(self, i: int) -> None:
        if self.ckpt is None or i >= self.n or i < self.n_resident:
            return
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()
        names = self.names(i)
        self._prefetch_thread = threading.Thread(target=self.ckpt.prefetch, args=(names,), daemon=True)
        self._prefetch_thread.start()

    def get(self, i: int):
        if i < self.n_resident:
            if i == self.n_resident - 1 and self.streaming:
                self._prefetch(self.n_resident)  # warm the first streamed layer
            return self.resident[i]
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()
            self._prefetch_thread = None
        layer = self.build_streamed(i)
        self.streamed_reads += 1
        nxt = i + 1 if i + 1 < self.n else self.n_resident
        self._prefetch(nxt)
        return layer

    def done(self, i: int) -> None:
        if i >= self.n_resident and self.ckpt is not None:
            self.ckpt.release(self.names(i))

    def close(self) -> None:
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()
            self._prefetch_thread = None
