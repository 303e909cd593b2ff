"""Weighted mixtures of prepared token sources, with exact resume and rank sharding.

Each source is a shard directory written by `plm.data.prepare`, read as one contiguous token
stream cut into non-overlapping windows of seq_len + 1 tokens. Per epoch of a source its
windows are visited in a seeded permutation. For global step k the loader draws the
source of each of the `batch_size * world_size` sequences from a generator seeded by
(seed, k), so the draw needs no carried RNG state. Every rank walks the whole global batch
(advancing every source's cursor identically) and reads only its own slice: rank r gets
rows [r*B, (r+1)*B), ranks never overlap, their union is what one process with batch
B*world_size sees, and the state is the same on every rank.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from plm.data.prepare import Manifest, load_shards
from plm.errors import PLMError

STATE_VERSION = 1


@dataclass
class _Source:
    name: str
    path: Path
    weight: float
    shards: list[np.memmap]
    starts: np.ndarray  # token offset of each shard in the stream, plus the total at the end
    n_windows: int
    key: int  # stable per-name seed component: adding a source does not reshuffle the others


def _open_source(name: str, path: str | Path, weight: float, window: int) -> tuple[_Source, str]:
    try:
        shards = load_shards(path)
        fingerprint = Manifest.load(path).tokenizer_fingerprint
    except PLMError as e:
        raise PLMError(f"mixture source {name!r}: {e}") from None
    starts = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
    n_windows = int(starts[-1]) // window
    if n_windows == 0:
        raise PLMError(f"mixture source {name!r} ({path}): {int(starts[-1])} tokens, fewer than "
                       f"seq_len + 1 = {window}")
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    return _Source(name, Path(path), weight, shards, starts, n_windows, key), fingerprint


class MixtureLoader:
    """Infinite iterator of (x, y) LongTensors [batch_size, seq_len], y = x shifted by one."""

    def __init__(self, sources: Mapping[str, tuple[str | Path, float]], seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not sources:
            raise PLMError("mixture: no sources given")
        if seq_len < 1 or batch_size < 1:
            raise PLMError(f"mixture: seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise PLMError(f"mixture: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if not isinstance(seed, int) or seed < 0:
            raise PLMError(f"mixture: seed must be a non-negative integer, got {seed!r}")
        for name, spec in sources.items():
            if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
                raise PLMError(f"mixture source {name!r}: expected (directory, weight), got {spec!r}")
            w = spec[1]
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise PLMError(f"mixture source {name!r}: weight must be a finite number >= 0, got {w!r}")
        total = float(sum(spec[1] for spec in sources.values()))
        if total <= 0:
            raise PLMError("mixture: all source weights are zero")

        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.window = seq_len + 1
        # Sorted by name: the same mixture gives the same stream whatever the dict order.
        self.sources: list[_Source] = []
        fingerprints: dict[str, str] = {}
        for name in sorted(sources):
            path, weight = sources[name]
            src, fingerprints[name] = _open_source(name, path, float(weight), self.window)
            self.sources.append(src)
        if len(set(fingerprints.values())) > 1:
            raise PLMError(f"mixture: sources were tokenised with different tokenizers: {fingerprints}")
        self.probs = np.array([s.weight for s in self.sources]) / total
        self.step = 0
        self.epoch = [0] * len(self.sources)
        self.pos = [0] * len(self.sources)
        self.tokens = [0] * len(self.sources)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    # ---- iteration ----------------------------------------------------------------
    def __iter__(self) -> "MixtureLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        draw = np.random.default_rng([self.seed, self.step]).choice(
            len(self.sources), size=self.global_batch, p=self.probs)
        picks = [(int(i), self._next_window(int(i))) for i in draw]  # all ranks advance alike
        for i in draw:
            self.tokens[i] += self.window
        self.step += 1
        lo = self.rank * self.batch_size
        rows = np.stack([self._read(i, w) for i, w in picks[lo:lo + self.batch_size]])
        seq = torch.from_numpy(rows.astype(np.int64))
        return seq[:, :-1], seq[:, 1:]

    def _perm(self, i: int) -> np.ndarray:
        epoch = self.epoch[i]
        cached = self._perms.get(i)
        if cached is None or cached[0] != epoch:
            src = self.sources[i]
            cached = (epoch, np.random.default_rng([self.seed, src.key, epoch]).permutation(src.n_windows))
            self._perms[i] = cached
        return cached[1]

    def _next_window(self, i: int) -> int:
        if self.pos[i] == self.sources[i].n_windows:
            self.epoch[i] += 1
            self.pos[i] = 0
        w = int(self._perm(i)[self.pos[i]])
        self.pos[i] += 1
        return w

    def _read(self, i: int, w: int) -> np.ndarray:
        """Window w of source i; it may span shard boundaries."""
        src = self.sources[i]
        begin, end = w * self.window, (w + 1) * self.window
        k = int(np.searchsorted(src.starts, begin, side="right")) - 1
        parts = []
        while begin < end:
            stop = min(end, int(src.starts[k + 1]))
            parts.append(src.shards[k][begin - src.starts[k]:stop - src.starts[k]])
            begin, k = stop, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ---- bookkeeping ----------------------------------------------------------------
    def realised_proportions(self) -> dict[str, float]:
        """Fraction of all tokens drawn so far (over all ranks) that came from each source."""
        total = sum(self.tokens)
        return {s.name: (t / total if total else 0.0) for s, t in zip(self.sources, self.tokens)}

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state; identical on every rank, so any rank's copy resumes all of them."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "step": self.step,
            "sources": {
                s.name: {"weight": s.weight, "n_windows": s.n_windows, "epoch": self.epoch[i],
                         "pos": self.pos[i], "tokens": self.tokens[i]}
                for i, s in enumerate(self.sources)
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume exactly; also across a change of world_size that keeps the global batch."""
        mine = self.state_dict()
        for key in ("version", "seed", "seq_len", "global_batch"):
            if state.get(key) != mine[key]:
                raise PLMError(f"mixture state: {key} is {state.get(key)!r}, this loader has {mine[key]!r}")
        theirs = state.get("sources", {})
        if set(theirs) != set(mine["sources"]):
            raise PLMError(f"mixture state: sources {sorted(theirs)} differ from {sorted(mine['sources'])}")
        for i, s in enumerate(self.sources):
            st = theirs[s.name]
            for key in ("weight", "n_windows"):
                if st[key] != mine["sources"][s.name][key]:
                    raise PLMError(f"mixture state: source {s.name!r} {key} was {st[key]!r}, "
                                   f"now {mine['sources'][s.name][key]!r}")
            self.epoch[i], self.pos[i], self.tokens[i] = int(st["epoch"]), int(st["pos"]), int(st["tokens"])
        self.step = int(state["step"])
        self._perms.clear()


@dataclass
class MixturePhase:
    """A training phase: sources with weights and a token budget."""
    name: str
    sources: dict[str, tuple[str, float]]
    token_budget: int

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise PLMError(f"phase {self.name!r}: token_budget must be >= 1, got {self.token_budget}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MixturePhase":
        """{name, token_budget, sources: {src: {dir, weight}} or {src: [dir, weight]}}."""
        name = d.get("name", "phase")
        try:
            sources = {k: ((v["dir"], v["weight"]) if isinstance(v, Mapping) else (v[0], v[1]))
                       for k, v in d["sources"].items()}
            return cls(name, sources, int(d["token_budget"]))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise PLMError(f"phase {name!r}: needs token_budget and sources {{name: {{dir, weight}}}} ({e})") from None

    def steps(self, seq_len: int, global_batch: int) -> int:
        """Optimiser steps to spend the budget (rounded up)."""
        return math.ceil(self.token_budget / (seq_len * global_batch))

    def loader(self, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
               world_size: int = 1) -> MixtureLoader:
        return MixtureLoader(self.sources, seq_len, batch_size, seed, rank, world_size)
