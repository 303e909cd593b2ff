"""Token generation for any model behind a step function: the sampling rules (temperature,
top-k, top-p, repetition, presence and frequency penalties, logit bias, stop ids), the batched loop over left-padded prompts, and the
step function of the reference model. It lives with the model so `PLMForCausalLM.generate` can
use it; text-level generation (tokenizer, stop strings, streaming) is plm.infer.generate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from plm.errors import PLMError

@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # 0 = off; tokens below min_p x the best token's probability are dropped
    repetition_penalty: float = 1.0  # CTRL's, over prompt and reply (Hugging Face's semantics)
    presence_penalty: float = 0.0  # OpenAI's, over the reply: minus this once a token appeared
    frequency_penalty: float = 0.0  # OpenAI's, over the reply: minus this per earlier occurrence
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    grammar: object | None = None  # plm.model.grammar.Grammar: every reply stays inside it

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise PLMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise PLMError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise PLMError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise PLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise PLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise PLMError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise PLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for t, b in self.logit_bias.items():
            if not isinstance(t, int) or t < 0 or not math.isfinite(b):
                raise PLMError(f"logit_bias maps token ids (>= 0) to finite numbers, got {t!r}: {b!r}")
        if any(not s for s in self.stop_strings):
            raise PLMError("a stop string must not be empty (it would stop before the first token)")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive / multiply negative logits of tokens already seen.

    logits [B, V]; seen [B, V] bool.
    """
    if penalty == 1.0:
        return logits
    return torch.where(seen, _repeated(logits, penalty), logits)


# The penalty rules on the logits they apply to: `penalize` passes whole rows (with masks),
# `SequencePenalties` only the seen tokens' logits, so both compute the same numbers.
def _repeated(v: torch.Tensor, penalty: float) -> torch.Tensor:
    return torch.where(v > 0, v / penalty, v * penalty)


def _reoccurring(v: torch.Tensor, counts: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    counts = counts.to(v.dtype)
    return v - cfg.frequency_penalty * counts - cfg.presence_penalty * (counts > 0).to(v.dtype)


def penalize(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None = None,
             counts: torch.Tensor | None = None) -> torch.Tensor:
    """Every logit adjustment of `cfg` before sampling, for logits [B, V]: the repetition
    penalty over `seen` [B, V] bool (prompt and reply tokens), presence and frequency penalties
    over `counts` [B, V] (each token's occurrences in the reply), then the logit bias."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if counts is not None and needs_counts(cfg):
        logits = _reoccurring(logits, counts, cfg)
    return _add_logit_bias(logits, cfg)


def _add_logit_bias(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    if not cfg.logit_bias:
        return logits
    ids = torch.tensor(list(cfg.logit_bias), dtype=torch.long)
    keep = ids < logits.shape[-1]
    logits = logits.clone()
    logits[:, ids[keep]] += torch.tensor(list(cfg.logit_bias.values()), dtype=logits.dtype)[keep]
    return logits


def needs_counts(cfg: GenerationConfig) -> bool:
    return bool(cfg.presence_penalty or cfg.frequency_penalty)


class _DistinctIds:
    """Distinct token ids in order of first appearance, as a growing tensor (amortised O(1) a
    token), with a count per id."""

    def __init__(self) -> None:
        self.slot: dict[int, int] = {}
        self.ids = torch.empty(64, dtype=torch.long)
        self.counts = torch.zeros(64)

    def add(self, t: int) -> None:
        j = self.slot.get(t)
        if j is None:
            j = self.slot[t] = len(self.slot)
            if j == len(self.ids):
                self.ids = torch.cat([self.ids, torch.empty_like(self.ids)])
                self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.ids[j] = t
        self.counts[j] += 1

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.slot)
        return self.ids[:n], self.counts[:n]


class SequencePenalties:
    """`penalize` for one sequence whose reply grows a step at a time (a server's request): the
    tokens seen are recorded as they come and only the distinct ones are touched, so a step costs
    O(new tokens + distinct tokens), not O(prompt + reply + vocabulary) (rebuilding the dense
    [V] masks each step cost milliseconds a request at a few thousand tokens). Equal to
    `penalize` bit for bit: the same operations on the same elements; the rest are unchanged."""

    def __init__(self, cfg: GenerationConfig, prompt: Sequence[int]) -> None:
        self.cfg = cfg
        self.seen = _DistinctIds() if cfg.repetition_penalty != 1.0 else None
        self.reply = _DistinctIds() if needs_counts(cfg) else None
        self.n = 0  # reply tokens recorded
        if self.seen is not None:
            for t in prompt:
                self.seen.add(int(t))

    def __call__(self, logits: torch.Tensor, reply: Sequence[int]) -> torch.Tensor:
        """Adjusted logits [1, V] for the reply so far (the list given last time, grown)."""
        for t in reply[self.n:]:
            if self.seen is not None:
                self.seen.add(int(t))
            if self.reply is not None:
                self.reply.add(int(t))
        self.n = len(reply)
        cfg = self.cfg
        if self.seen is not None or self.reply is not None:
            logits = logits.clone()
        if self.seen is not None:
            ids, _ = self.seen.view()
            logits[:, ids] = _repeated(logits[:, ids], cfg.repetition_penalty)
        if self.reply is not None:
            ids, counts = self.reply.view()
            logits[:, ids] = _reoccurring(logits[:, ids], counts[None], cfg)
        return _add_logit_bias(logits, cfg)


NUCLEUS_CANDIDATES = 64  # top-p first looks among this many best tokens


def sample_next(logits: torch.Tensor, cfg: GenerationConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token per row of logits [B, V] under temperature / top-k / top-p / min-p.
    min-p keeps the tokens whose probability is at least min_p x the best one's, applied last
    (as transformers orders its warpers): a ratio, so the same tokens whatever was renormalised."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    floor = logits.amax(-1, keepdim=True) + math.log(cfg.min_p) if cfg.min_p > 0 else None
    if cfg.top_p < 1.0:
        # the nucleus usually lies in the few best tokens: sort only those (a full-vocabulary
        # sort dominates batched sampling); the same token set, so the same distribution
        k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
        top, idx = logits.topk(k, dim=-1)
        probs = (top - logits.logsumexp(-1, keepdim=True)).exp()
        if k < logits.shape[-1] and not bool((probs.sum(-1) >= cfg.top_p).all()):
            top, idx = logits.sort(dim=-1, descending=True)  # some row's nucleus is wider
            probs = top.softmax(-1)
        # drop tokens whose preceding cumulative mass already reaches top_p (keeps >= 1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        if floor is not None:
            drop |= top < floor
        pick = torch.multinomial(top.masked_fill(drop, float("-inf")).softmax(-1), 1, generator=generator)
        return idx.gather(-1, pick).squeeze(-1)
    if floor is not None:
        logits = logits.masked_fill(logits < floor, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class IncrementalText:
    """decode(ids) of a token list that only grows, at the cost of a few tokens per call.

    Streaming re-decoded the whole reply for every token: O(n) per token, 0.21-0.25 ms at 4096
    tokens of prose with the Qwen2 tokenizer, paid on the server's scheduler thread for every
    stream (benchmarks/stream_overhead.py; this: 2-3 us at any length). Here the
    text of ids[:k] is kept once k ends on a whole character, and each call decodes only
    ids[p:] against ids[p:k] (p: the commit before k), keeping what the longer window adds, the
    way vLLM detokenises; the window starts a few tokens back so decoders that treat the first
    token differently (a leading space dropped) see the same start both times. A decoder whose
    shorter window is not a prefix of the longer falls back to decoding everything.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.done = ""  # decode(ids[:k])
        self.p = self.k = 0
        self.window: list[int] = []  # ids[p:k]
        self.head = ""  # decode(ids[p:k])

    def __call__(self, ids: Sequence[int]) -> str:
        """decode(ids), where ids extends every list passed before."""
        n = len(ids)
        if n < self.k or list(ids[self.p:self.k]) != self.window:  # the committed window only: O(1)
            raise PLMError("IncrementalText: the token list must only grow")
        tail = list(ids[self.p:])
        text = self.decode(tail)
        if not text.startswith(self.head):
            return self.decode(list(ids))
        text = self.done + text[len(self.head):]
        if n > self.k and not text.endswith("\ufffd"):  # a whole character: commit
            self.p, self.k, self.done, self.window = self.k, n, text, tail[self.k - self.p:]
            self.head = self.decode(self.window)
        return text


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every row's next token is at the same column."""
    if not batch or any(len(s) == 0 for s in batch):
        raise PLMError("every prompt must have at least one token")
    n = max(len(s) for s in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, n - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, n - len(s):] = 1
    return ids, mask


def generate_tokens(step: StepFn, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                    pad_id: int = 0, vocab_size: int | None = None,
                    decode: Callable[[list[int]], str] | None = None) -> Iterator[tuple[int, int]]:
    """Yield (row, token) as tokens are produced; `step` is called with the whole left-padded
    prompt batch first, then with one new token per row.

    Stop strings need `decode`; a row stops when its decoded continuation contains one.
    """
    cfg.validate()
    ids, mask = left_pad(prompts, pad_id)
    B = ids.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    # rows[j] = the prompt that batch position j generates for; a step with `select(index)` drops
    # finished rows from its cache, so a batch costs what its unfinished rows cost
    rows = torch.arange(B)
    shrink = callable(getattr(step, "select", None))
    done = torch.zeros(B, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(B)]
    seen = counts = None
    stop_ids = torch.tensor(sorted(set(cfg.stop_token_ids)), dtype=torch.long)
    new, new_mask = ids, mask
    matchers = [cfg.grammar.matcher() for _ in range(B)] if cfg.grammar is not None else None
    texts = [IncrementalText(decode) for _ in range(B)] if cfg.stop_strings and decode is not None else None
    for _ in range(cfg.max_new_tokens):
        logits = step(new, new_mask)[:, -1].float().cpu()
        if cfg.repetition_penalty != 1.0 and seen is None:
            seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool)
            seen.scatter_(1, ids, mask.bool())
        if needs_counts(cfg) and counts is None:
            counts = torch.zeros(B, logits.shape[-1])
        logits = penalize(logits, cfg, seen, counts)
        if vocab_size is not None:  # padded embedding rows are never real tokens
            logits[:, vocab_size:] = float("-inf")
        if matchers is not None:
            logits = torch.stack([logits[j] if done[j] else matchers[r].mask(logits[j])  # finished rows: pads
                                  for j, r in enumerate(rows.tolist())])
        nxt = sample_next(logits, cfg, gen)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        is_stop = torch.isin(nxt, stop_ids) & ~done
        for j, r in enumerate(rows.tolist()):
            if done[j]:
                continue
            if is_stop[j]:
                done[j] = True
                continue
            t = int(nxt[j])
            out[r].append(t)
            yield r, t
            if matchers is not None:
                matchers[r].advance(t)
                if matchers[r].stopped:  # the grammar is complete: nothing may follow
                    done[j] = True
            if texts is not None:
                text = texts[r](out[r])
                if any(s in text for s in cfg.stop_strings):
                    done[j] = True
        if seen is not None:
            seen[torch.arange(len(rows)), nxt] |= ~done
        if counts is not None:
            counts[torch.arange(len(rows)), nxt] += (~done).float()
        if bool(done.all()):
            return
        if shrink and bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            step.select(keep)
            rows, nxt, mask, done = rows[keep], nxt[keep], mask[keep], done[keep]
            seen = None if seen is None else seen[keep]
            counts = None if counts is None else counts[keep]
        new = nxt[:, None]
        # the step sees the mask over past + new; finished rows (without `select`) decode pads, ignored
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        new_mask = mask


def model_step_fn(model, cache_factory: Callable[[], object] | None = None) -> StepFn:
    """A step function over a `PLMForCausalLM` with its decompressed KV cache."""
    from plm.model.cache import FullCache

    cache = cache_factory() if cache_factory else FullCache(model.config)

    @torch.no_grad()
    def step(new_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dev = model.device
        return model(new_ids.to(dev), attention_mask=mask.to(dev), cache=cache, logits_to_keep=1).logits

    if callable(getattr(cache, "select", None)):
        step.select = lambda index: cache.select(index.to(model.device))
    return step


def recompute_step_fn(model) -> StepFn:
    """No cache: re-run the whole sequence every step (the reference for cache tests)."""
    state: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(new_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        state["ids"] = new_ids if "ids" not in state else torch.cat([state["ids"], new_ids], 1)
        return model(state["ids"].to(model.device), attention_mask=mask.to(model.device)).logits[:, -1:]

    return step
