"""Per-sequence decoding for the scheduler: a small interface and its implementations.

A backend holds any number of independent sequences, each with its own KV cache:

    n = be.admit(seq, total_tokens, prompt)   # a new sequence that will hold at most total_tokens;
                                       # n: the prompt's first tokens already in its cache
    logits = be.prefill(seq, ids)      # append prompt tokens (in chunks); fp32 [V] of the last
    logits = be.step([s1, s2], [t1, t2])   # one token for each of several sequences: [B, V]
    be.free(seq)
    logits = be.run([(s1, [t1]), (s3, ids)])   # optional (NativeBackend): mixed segments, [S, V]

`TorchBackend` runs on the edge runtime (plm.infer.runtime) or the reference model. Their
forward takes one cache whose positions the batch shares, so the running set lives in one
batched cache, left-padded with a mask: a sequence prefills alone into a private cache
(exactly the computation of a request served alone), and when the set of decoding sequences
changes the batched cache is rebuilt once: every row right-aligned to the longest, the
columns nobody uses dropped. Positions come from the mask, so padding does not shift RoPE, and
masked positions get exactly zero attention. Between changes a step is one forward over the
batch.

`NativeBackend` runs plm.infer.native_decoder's C++ decoder, whose sequences have true
per-sequence latent caches and whose step is batched natively; its `run` puts decode rows and
prompt chunks of different sequences in one forward. It also keeps the caches of the last few
finished sequences (the prompt cache): a new prompt that begins with what one of them holds
(the next turn of a chat resends the conversation so far) takes that cache, cut to the common
prefix, and only the rest of the prompt runs. Its rows are independent of each other and of
where a prompt was cut, so a reused prefix gives the same logits, bit for bit, as prefilling it
again.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from plm.errors import PLMError
from plm.model.config import PLMConfig


class Backend(Protocol):
    kind: str  # "edge" | "reference" | "native"
    config: PLMConfig

    def admit(self, seq: int, total_tokens: int, prompt: Sequence[int] = ()) -> int: ...
    def prefill(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor: ...
    def step(self, seqs: Sequence[int], ids: Sequence[int]) -> torch.Tensor: ...
    def free(self, seq: int) -> None: ...
    def cache_bytes(self) -> int: ...


# ---------------------------------------------------------------------------------------
# PyTorch runtimes: one batched cache, rebuilt when the running set changes


# (ids [B, T], mask, cache, all_logits=False) -> logits [B, V] of the last token ([B, T, V]: all)
ForwardFn = Callable[..., torch.Tensor]
CacheFn = Callable[[int, int], object]


@dataclass
class _Seq:
    total: int  # most tokens this sequence will ever hold (prompt + max new tokens)
    length: int = 0  # tokens in its cache
    cache: object | None = None  # the private cache while prefilling; None once in the batch


class TorchBackend:
    """Continuous batching over `forward(ids [B, T], mask [B, past+T] | None, cache) -> [B, V]`.

    new_cache(batch, capacity) makes an empty cache of the runtime's layout (latent or full);
    both follow plm.model.cache's protocol, with buffers [layers, batch, ..., capacity, width].
    """

    def __init__(self, kind: str, config: PLMConfig, forward: ForwardFn, new_cache: CacheFn) -> None:
        self.kind, self.config = kind, config
        self._forward, self._new_cache = forward, new_cache
        self.seqs: dict[int, _Seq] = {}
        self.rows: list[int | None] = []  # sequence of each row of the batched cache (None: freed)
        self.cache = None  # the batched cache of `rows`
        self.mask: torch.Tensor | None = None  # [B, length]: 1 where a row has a real token
        self.rebuilds = 0  # how often the batched cache was re-laid (tests, metrics)

    @classmethod
    def edge(cls, runtime) -> "TorchBackend":
        return cls("edge", runtime.config, runtime.forward, runtime.new_cache)

    @classmethod
    def reference(cls, model) -> "TorchBackend":
        from plm.model.cache import FullCache
        dev = model.device
        dtype = next(model.parameters()).dtype

        @torch.no_grad()
        def forward(ids, mask, cache, all_logits=False):
            mask = None if mask is None else mask.to(dev)
            out = model(ids.to(dev), attention_mask=mask, cache=cache, logits_to_keep=0 if all_logits else 1).logits
            return (out if all_logits else out[:, -1]).float().cpu()

        return cls("reference", model.config, forward,
                   lambda b, cap: FullCache(model.config, b, cap, dtype, dev))

    # ---- sequences ---------------------------------------------------------------------
    def admit(self, seq: int, total_tokens: int, prompt: Sequence[int] = ()) -> int:
        """A new sequence; 0 prompt tokens cached (no prompt cache on the PyTorch runtimes)."""
        if seq in self.seqs:
            raise PLMError(f"sequence {seq} is already admitted")
        self.seqs[seq] = _Seq(total=total_tokens)
        return 0

    def prefill(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Logits of the last token [V] (all_logits: of every token, [T, V])."""
        s = self._get(seq)
        if seq in self.rows:
            raise PLMError(f"sequence {seq} is decoding; prefill comes first")
        if not ids:
            raise PLMError("prefill needs at least one token")
        if s.cache is None:
            s.cache = self._new_cache(1, max(s.total, len(ids)))
        # alone and unpadded: exactly what this request costs and computes when served alone
        logits = self._forward(torch.tensor([list(ids)], dtype=torch.long), None, s.cache, all_logits=all_logits)
        s.length += len(ids)
        return logits[0]

    def step(self, seqs: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
        seqs = list(seqs)
        if len(set(seqs)) != len(seqs) or not seqs:
            raise PLMError("step needs distinct sequences")
        if seqs != self.rows:
            self._rebuild(seqs)
        new = torch.tensor(list(ids), dtype=torch.long)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(new)], dim=1)
        logits = self._forward(new, self.mask, self.cache)
        for q in seqs:
            self.seqs[q].length += 1
        return logits

    def free(self, seq: int) -> None:
        s = self.seqs.pop(seq, None)
        if s is not None:
            s.cache = None
        if seq in self.rows:  # a dead row until the next step re-lays the batch without it
            self.rows = [q if q != seq else None for q in self.rows]
            if not any(q is not None for q in self.rows):
                self.cache, self.mask, self.rows = None, None, []

    def cache_bytes(self) -> int:
        """Bytes of KV cache allocated (batched + private prefill caches)."""
        caches = [self.cache] + [s.cache for s in self.seqs.values()]
        return sum(c.allocated_bytes() for c in caches if c is not None)

    def _get(self, seq: int) -> _Seq:
        try:
            return self.seqs[seq]
        except KeyError:
            raise PLMError(f"no sequence {seq}") from None

    # ---- the batched cache -------------------------------------------------------------
    def _rebuild(self, seqs: list[int]) -> None:
        """Lay out the batched cache for `seqs` (in that order): each row right-aligned to the
        longest sequence, its real tokens copied from the old batched cache or its private one."""
        old_row = {q: r for r, q in enumerate(self.rows) if q is not None}
        states = [self._get(q) for q in seqs]
        for q, s in zip(seqs, states):
            if q not in old_row and s.cache is None:
                raise PLMError(f"sequence {q} has no prompt yet; prefill it before stepping")
        L = max(s.length for s in states)
        room = max(s.total - s.length for s in states)  # every row advances with the longest
        if len(seqs) == 1 and states[0].cache is not None:  # a request alone: adopt its own cache
            new = states[0].cache
        else:
            new = self._new_cache(len(seqs), L + max(room, 1))  # allocated (untouched pages are free)
            for j, (q, s) in enumerate(zip(seqs, states)):
                for dst, (src, start) in zip(new.bufs, self._sources(q, old_row)):
                    dst[:, j, ..., L - s.length:L, :] = src[..., start:start + s.length, :]
                    # padding gets zero attention weight, but 0 * NaN is NaN: never leave garbage there
                    dst[:, j, ..., :L - s.length, :] = 0
            new.length = L
        self.mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for j, s in enumerate(states):
            self.mask[j, L - s.length:] = 1
            s.cache = None  # its tokens now live in the batched cache
        self.cache, self.rows = new, seqs
        self.rebuilds += 1

    def _sources(self, q: int, old_row: dict[int, int]) -> list[tuple[torch.Tensor, int]]:
        """Per buffer: (the tensor [layers, ..., positions, width] holding q's tokens, first position)."""
        s = self.seqs[q]
        if s.cache is not None:
            return [(b[:, 0], 0) for b in s.cache.bufs]
        r = old_row[q]
        return [(b[:, r], self.cache.length - s.length) for b in self.cache.bufs]


# ---------------------------------------------------------------------------------------
# the native decoder: true per-sequence latent caches


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class NativeBackend:
    """plm.infer.native_decoder.NativeDecoder behind the Backend interface, with a prompt cache
    of the `keep` most recently finished sequences (0: none), and prefix sharing: a new prompt
    that begins as a running sequence's tokens do starts from a copy of that cache."""

    kind = "native"
    shares_prefixes = True  # the scheduler may hold a prompt until a running one has computed its start

    def __init__(self, decoder, prefill_chunk: int = 256, keep: int = 4) -> None:
        if keep < 0:
            raise PLMError(f"the prompt cache keeps 0 or more sequences, got {keep}")
        self.dec, self.config = decoder, decoder.config
        self.chunk, self.keep = prefill_chunk, keep
        self.handles: dict[int, int] = {}
        self.fed: dict[int, list[int]] = {}  # seq -> the ids in its cache
        self.idle: OrderedDict[int, list[int]] = OrderedDict()  # finished handles -> their ids, oldest first

    def admit(self, seq: int, total_tokens: int, prompt: Sequence[int] = ()) -> int:
        """A new sequence; returns how many of the prompt's first ids its cache already holds:
        taken from the finished sequence, or copied from the running one, that shares the longest
        prefix with the prompt (a finished one on a tie: taking costs no copy)."""
        if seq in self.handles:
            raise PLMError(f"sequence {seq} is already admitted")
        want = prompt[:len(prompt) - 1]  # the last prompt id always runs: its logits give the first new token
        best, n, running = None, 0, False
        for h, ids in self.idle.items():
            k = common_prefix(ids, want)
            if k > n:
                best, n = h, k
        for q, h in self.handles.items():
            k = common_prefix(self.fed[q], want)
            if k > n:
                best, n, running = h, k, True
        if best is None or running:
            h = self.dec.new_sequence()
            if best is not None:
                self.dec.copy_prefix(h, best, n)
        else:
            h = best
            del self.idle[h]
            self.dec.truncate(h, n)
        self.handles[seq], self.fed[seq] = h, list(prompt[:n])
        # one allocation instead of doublings for the usual sizes; a request that may run to the
        # end of the window grows when it gets there rather than holding it all from the start
        self.dec.reserve(h, min(total_tokens, 1024))
        return n

    def prefill(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        ids = [int(t) for t in ids]  # plain ints: the prompt cache compares them
        h = self.handles[seq]
        out = self.dec.prefill_all(h, ids) if all_logits else self.dec.prefill(h, ids, self.chunk)
        self.fed[seq] += ids
        return out

    def step(self, seqs: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
        ids = [int(t) for t in ids]
        out = self.dec.step([self.handles[q] for q in seqs], ids)
        for q, t in zip(seqs, ids):
            self.fed[q].append(t)
        return out

    def run(self, segments: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """Prompt chunks and decode tokens of distinct sequences in one forward: [S, V]."""
        segments = [(q, [int(t) for t in ids]) for q, ids in segments]
        out = self.dec.run([(self.handles[q], ids) for q, ids in segments])
        for q, ids in segments:
            self.fed[q] += ids
        return out

    def free(self, seq: int) -> None:
        """End a sequence; its cache joins the prompt cache (the oldest there is dropped past
        `keep`) when it holds exactly the ids recorded (a forward that failed midway may not)."""
        h = self.handles.pop(seq, None)
        ids = self.fed.pop(seq, [])
        if h is None:
            return
        if self.keep and ids and self.dec.length(h) == len(ids):
            self.idle[h] = ids
            while len(self.idle) > self.keep:
                self.dec.free(self.idle.popitem(last=False)[0])
        else:
            self.dec.free(h)

    def cache_bytes(self) -> int:
        """Latent cache in use: running sequences and the prompt cache."""
        return sum(self.dec.kv_bytes(h) for h in [*self.handles.values(), *self.idle])


def native_unavailable() -> str | None:
    """Why the native decoder cannot run here (None when it can)."""
    try:
        from plm.infer import native as nv
        import plm.infer.native_decoder  # noqa: F401
    except ImportError as e:
        return f"plm.infer.native_decoder does not import ({e})"
    if not nv.load():
        return f"native kernels unavailable ({nv._state.get('reason')})"
    return None


NATIVE_FORMATS = {"none": "bf16", "int8": "q8_0", "int4": "q4_0"}


def load_native(path: str | Path, quant: str = "none", dtype: str | None = None, sparse: bool = False,
                keep: int = 4):
    """(NativeBackend, tokenizer) from a checkpoint folder or hub id (weights converted at load:
    none -> BF16, or F32 with dtype float32; int8 -> Q8_0; int4 -> Q4_0) or a `plm` GGUF file
    (its own formats and tokenizer); `keep`: finished sequences held for the prompt cache."""
    why = native_unavailable()
    if why:
        raise PLMError(f"the native runtime: {why}")
    from plm.infer.native_decoder import NativeDecoder, load_gguf

    f32 = dtype in ("float32", "fp32")
    cache = "f32" if f32 else "bf16"
    if str(path).endswith(".gguf"):
        dec, tok = load_gguf(Path(path), sparse=sparse, cache_dtype=cache)
        return NativeBackend(dec, keep=keep), tok
    from plm.data.tokenizer import Tokenizer
    from plm.infer.layerwise import MappedCheckpoint
    from plm.model.checkpoint import load_config, read_headers, validate_checkpoint
    from plm.model.hub import resolve_model

    if quant not in NATIVE_FORMATS:
        raise PLMError(f"unknown quant {quant!r}; choose from {', '.join(NATIVE_FORMATS)}")
    path = resolve_model(path)
    config = load_config(path)
    tok = Tokenizer.from_dir(path)
    if tok.vocab_size > config.vocab_size:
        raise PLMError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary has "
                       f"{config.vocab_size} rows; they do not belong together")
    validate_checkpoint(path, config, read_headers(path))
    fmt = "f32" if f32 and quant == "none" else NATIVE_FORMATS[quant]
    dec = NativeDecoder.from_state_dict(config, MappedCheckpoint(path).view, fmt=fmt, sparse=sparse, cache_dtype=cache)
    return NativeBackend(dec, keep=keep), tok
