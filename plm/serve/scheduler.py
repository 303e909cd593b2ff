"""The scheduler: one thread owns the model and runs continuous batching.

Each iteration it
  1. frees the slots of cancelled requests (a client that went away),
  2. admits waiting requests while fewer than `max_batch` sequences are active (on a backend
     that shares prefixes, a request whose first prompt tokens another request is still
     prefilling waits for them, then copies them: the `n` choices of a prompt prefill it once),
  3. prefills: while sequences are decoding, at most `prefill_chunk` prompt tokens run per
     iteration, so a long prompt delays the running streams by one chunk at a time instead of
     stalling them,
  4. decodes one token for every decoding sequence in one batched step,
  5. samples each row with its request's own settings (penalties, logit bias, a grammar's
     allowed tokens, temperature, top-k, top-p) and generator, records the token's log-probability when asked, streams text, and
     retires finished requests, freeing their cache (a backend with a prompt cache keeps the
     last few, and at admission skips the part of a new prompt one of them already holds).

Two ways to run an iteration, by what the backend offers:
  - mixed (a backend with `run`, the native decoder): the prompt chunks and the decode rows
    go into one forward, so the weights are read once for both. The decoder's rows are
    independent of each other, so where a prompt is cut does not change any result; with
    nothing decoding, prompts run `max(prefill_chunk, IDLE_CHUNK)` tokens at a time.
  - separate (the PyTorch runtimes): prompt chunks run alone, cut at fixed offsets (multiples
    of `prefill_chunk`, so a prompt is computed the same way however busy the server is),
    then one batched decode step; with nothing decoding, whole prompts run at once.

Requests talk back through `emit(Event)`, called on this thread: the HTTP layer passes a
callback that hands the event to its event loop. Text is streamed with any suffix that could
begin a stop string and any incomplete UTF-8 character held back, so what was streamed is
always a prefix of the final text. A request with `logprobs` set gets, with each piece of text,
the log-probabilities of the tokens generated since the last piece: each token's under the
model's own distribution (log-softmax of the raw logits, before penalties, bias and
temperature, as vLLM reports them by default) and the `logprobs` most likely alternatives. A
request with `score_prompt` (echo) gets its prompt's tokens' too: its prompt runs in forwards
of SCORE_CHUNK tokens that return every position's logits, one an iteration beside the decode
step, before it joins the decoding batch.
"""
from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from plm.errors import PLMError
from plm.infer.generate import (GenerationConfig, IncrementalText, SequencePenalties, sample_next,
                                truncate_at_stop)
from plm.serve.backend import common_prefix
from plm.serve.metrics import BATCH_BUCKETS, Metrics


IDLE_CHUNK = 256  # mixed iterations with no stream waiting: prompt tokens per forward
SCORE_CHUNK = 64  # prompt tokens per forward when every position's logits come back (64 x V floats)
SHARE_MIN = 32  # prompt tokens in common worth waiting for another request's prefill


def mixes(backend) -> bool:
    """Whether the backend runs prompt chunks and decode rows in one forward (`run`)."""
    return hasattr(backend, "run")


def default_chunk(backend) -> int:
    """--prefill-chunk by backend. Mixed (native): a prompt chunk rides along with every decode
    step, so it sets the inter-token latency of the running streams while a request joins (each
    prompt row costs about what a decode row does). At the PLM-1.8B shape on 2 cores, 8 streams:
    8 kept the p95 gap at 1.85x a lone stream's, 16 at 3.1x with 13% more throughput and half
    the time to first token (benchmarks/serve.py, docs/serve.md). Separate (PyTorch): larger
    chunks, since each chunk also pays a pass over the weights of its own."""
    return 8 if mixes(backend) else 512


class QueueFull(PLMError):
    """More requests are waiting than --max-queue allows."""


class Draining(PLMError):
    """The server is shutting down and takes no new requests."""


@dataclass
class Event:
    kind: str  # "text" (a piece of the reply), "done" (finish_reason set), "error" (text = message)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list["TokenLogprob"] | None = None  # the tokens behind `text`, when asked for


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None: the prompt's first token (nothing before it)
    top: list[tuple[int, float]]  # the most likely tokens, best first


def _entries(lp: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Entries for tokens[i] under the log-probabilities lp[i] ([n, V]), with the k best."""
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()
    if not k:
        return [TokenLogprob(t, v, []) for t, v in zip(tokens, chosen)]
    top = lp.topk(k, dim=-1)
    return [TokenLogprob(t, v, list(zip(i, w))) for t, v, i, w in
            zip(tokens, chosen, top.indices.tolist(), top.values.tolist())]


@dataclass
class Request:
    prompt: list[int]
    cfg: GenerationConfig  # max_new_tokens, temperature, top_k, top_p, seed, stop strings and ids
    emit: Callable[[Event], None]
    route: str = "completions"  # metrics label
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k best
    score_prompt: bool = False  # the prompt's tokens' log-probabilities too (echo; needs logprobs)
    matcher: object | None = None  # set from cfg.grammar at admission: the reply stays inside it
    # set by the scheduler
    seq: int = -1
    state: str = "new"  # new | waiting | prefill | decode | done
    prefilled: int = 0  # prompt tokens in the cache
    cached: int = 0  # of which the prompt cache held at admission
    tokens: list[int] = field(default_factory=list)
    last: int = -1  # the token to feed at the next step
    forced: list[int] = field(default_factory=list)  # grammar-forced tokens fed with `last` at the next step
    text: str = ""  # the reply so far (cut at a stop string when one appears)
    sent: str = ""  # the part of `text` already emitted
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    pending: list[TokenLogprob] = field(default_factory=list)  # log-probabilities not yet emitted
    detok: IncrementalText | None = None  # decodes `tokens` as they grow
    penalties: SequencePenalties | None = None  # the penalties and logit bias over `tokens` as they grow
    scored_next: torch.Tensor | None = None  # echo: log-probabilities of the next prompt token
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float | None = None

    @property
    def usage(self) -> dict:
        n = len(self.tokens)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n, "total_tokens": len(self.prompt) + n,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Scheduler:
    """See the module docstring. `backend` is a plm.serve.backend.Backend; `tokenizer` decodes
    and masks ids past its vocabulary (padded embedding rows are never real tokens)."""

    def __init__(self, backend, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int | None = None, metrics: Metrics | None = None, threads: int | None = None) -> None:
        prefill_chunk = default_chunk(backend) if prefill_chunk is None else prefill_chunk
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise PLMError(f"max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) must be >= 1, "
                           f"max_queue ({max_queue}) >= 0")
        self.backend, self.tok = backend, tokenizer
        self.vocab = tokenizer.vocab_size
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, prefill_chunk
        self.threads = threads
        self.metrics = metrics or Metrics()
        self._define_metrics()
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # admitted: prefilling or decoding, oldest first
        self.draining = False
        self._stop = False
        self._ids = itertools.count()
        self.thread: threading.Thread | None = None
        self.steps = 0

    # ---- the public side (any thread) ---------------------------------------------------
    def start(self) -> "Scheduler":
        self.thread = threading.Thread(target=self._run, name="plm-scheduler", daemon=True)
        self.thread.start()
        return self

    def submit(self, req: Request) -> None:
        """Queue a request; QueueFull past max_queue waiting, Draining after drain()."""
        req.cfg.validate()
        with self.cond:
            if self.draining:
                raise Draining("the server is shutting down")
            free = self.max_batch - len(self.active)
            if len(self.waiting) - free >= self.max_queue:  # waiting beyond the free slots
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            req.seq = next(self._ids)
            req.state = "waiting"
            req.t_submit = time.perf_counter()
            req.detok = IncrementalText(self.tok.decode)
            req.penalties = SequencePenalties(req.cfg, req.prompt)
            seed = req.cfg.seed
            req.generator = torch.Generator()
            if seed is None:
                req.generator.seed()
            else:
                req.generator.manual_seed(seed)
            self.waiting.append(req)
            self.cond.notify()

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away); its slot is freed at the next iteration."""
        with self.cond:
            if req.state != "done":
                req.cancelled = True
                self.cond.notify()

    def drain(self) -> None:
        """Take no new requests; those accepted are still served."""
        with self.cond:
            self.draining = True
            self.cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Drain, wait for the accepted requests to finish, then end the thread."""
        self.drain()
        with self.cond:
            self.cond.wait_for(lambda: not self.waiting and not self.active, timeout)
            self._stop = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    # ---- the loop (scheduler thread) -------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # per thread
        if self.threads:  # OpenMP's thread count is per calling thread: set it on this one
            torch.set_num_threads(self.threads)
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self._stop or self.waiting or self.active)
                if self._stop:
                    return
                gone = [r for r in self.waiting if r.cancelled]
                for req in gone:
                    self.waiting.remove(req)
                new, held = [], []
                while self.waiting and len(self.active) + len(new) < self.max_batch:
                    req = self.waiting.popleft()
                    (held if self._shares_pending(req, new) else new).append(req)
                self.waiting.extendleft(reversed(held))
            try:
                for req in gone + [r for r in self.active if r.cancelled]:
                    self._finish(req, "cancelled")  # frees the slot at once
                for req in new:
                    req.state = "prefill"
                    self.active.append(req)
                    if req.cfg.grammar is not None:  # a copy of the compiled grammar's start state
                        req.matcher = req.cfg.grammar.matcher()
                    # a backend with a prompt cache may hold the prompt's beginning already
                    req.cached = req.prefilled = self.backend.admit(  # a scored prompt runs whole
                        req.seq, len(req.prompt) + req.cfg.max_new_tokens, () if req.score_prompt else req.prompt) or 0
                    self.metrics.inc("prompt_tokens_cached_total", req.cached)
                self._iteration()
            except Exception as e:  # a bug or an out-of-memory: fail the requests, keep serving
                traceback.print_exc(file=sys.stderr)
                for req in list(self.active):
                    self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            self.metrics.set("kv_cache_bytes", self.backend.cache_bytes())
            with self.cond:
                self.cond.notify_all()  # stop() waits for an empty server

    def _shares_pending(self, req: Request, new: list[Request]) -> bool:
        """Hold `req` back while a request still in its prefill is computing at least SHARE_MIN
        of `req`'s first prompt tokens (the `n` choices of one prompt, clients with one system
        prompt): admitted once that part is in a cache, `req` copies it instead of recomputing
        it (a backend that shares prefixes: the native decoder)."""
        if not getattr(self.backend, "shares_prefixes", False) or req.score_prompt or len(req.prompt) <= SHARE_MIN:
            return False
        head = req.prompt[:SHARE_MIN]
        for p in itertools.chain(self.active, new):
            if p.state in ("prefill", "waiting") and not p.score_prompt and p.prompt[:SHARE_MIN] == head:
                k = common_prefix(p.prompt, req.prompt[:len(req.prompt) - 1])
                if k > p.prefilled:
                    return True
        return False

    def _iteration(self) -> None:
        for req in [r for r in self.active if r.state == "prefill" and r.score_prompt]:
            self._score_chunk(req)
        if mixes(self.backend):
            self._mixed_iteration()
            return
        decoding = [r for r in self.active if r.state == "decode"]
        # with streams running, one chunk-budget of prompt per iteration; alone, all of it
        budget = self.chunk if decoding else sys.maxsize
        for req in [r for r in self.active if r.state == "prefill" and not r.score_prompt]:
            while req.state == "prefill" and budget > 0:
                s = req.prefilled
                e = min(len(req.prompt), (s // self.chunk + 1) * self.chunk)  # fixed chunk boundaries
                t0 = time.perf_counter()
                logits = self.backend.prefill(req.seq, req.prompt[s:e])
                self.metrics.observe("prefill_chunk_seconds", time.perf_counter() - t0)
                self.metrics.inc("prompt_tokens_total", e - s)
                req.prefilled, budget = e, budget - (e - s)
                if e == len(req.prompt):
                    req.state = "decode"
                    self._accept(req, logits[None])
            if budget <= 0:
                break
        decoding = [r for r in self.active if r.state == "decode"]
        if not decoding:
            return
        t0 = time.perf_counter()
        logits = self.backend.step([r.seq for r in decoding], [r.last for r in decoding])
        self._decoded(decoding, logits, time.perf_counter() - t0)

    def _score_chunk(self, req: Request) -> None:
        """The next SCORE_CHUNK tokens of the prompt of a request that wants its tokens'
        log-probabilities (echo), in a forward that returns every position's logits. One chunk an
        iteration, beside the decode step, so the running streams wait for one chunk at a time,
        not for the whole prompt. The entries go out ahead of the reply's."""
        p, s = req.prompt, req.prefilled
        if s == 0:
            req.pending = [TokenLogprob(p[0], None, [])]  # the first token has nothing before it
        ids = p[s:s + SCORE_CHUNK]
        t0 = time.perf_counter()
        logits = self.backend.prefill(req.seq, ids, all_logits=True).float()
        self.metrics.observe("prefill_chunk_seconds", time.perf_counter() - t0)
        self.metrics.inc("prompt_tokens_total", len(ids))
        if logits.shape[-1] > self.vocab:
            logits[:, self.vocab:] = float("-inf")
        lp = logits[:-1].log_softmax(-1)
        if s:  # the previous chunk's last position scores this chunk's first token
            lp = torch.cat([req.scored_next[None], lp])
        req.pending += _entries(lp, ids if s else ids[1:], req.logprobs)
        req.scored_next = logits[-1].log_softmax(-1)
        req.prefilled += len(ids)
        if req.prefilled == len(p):
            req.state, req.scored_next = "decode", None
            self._accept(req, logits[-1:])

    def _decoded(self, decoding: list[Request], logits: torch.Tensor, seconds: float, first: int = 0) -> None:
        """A decode step ran: metrics, then each decoding request's row (logits[first + j])."""
        self.steps += 1
        self.metrics.observe("decode_step_seconds", seconds)
        self.metrics.observe("batch_size", len(decoding))
        for j, req in enumerate(decoding, start=first):
            self._accept(req, logits[j:j + 1])

    def _mixed_iteration(self) -> None:
        """Prompt chunks and decode rows in one forward (see the module docstring)."""
        decoding = [r for r in self.active if r.state == "decode"]
        budget = self.chunk if decoding else max(self.chunk, IDLE_CHUNK)
        fed: list[tuple[Request, int]] = []
        for req in self.active:
            if budget <= 0:
                break
            if req.state == "prefill" and not req.score_prompt:
                n = min(len(req.prompt) - req.prefilled, budget)
                fed.append((req, n))
                budget -= n
        segments = [(r.seq, r.prompt[r.prefilled:r.prefilled + n]) for r, n in fed]
        segments += [(r.seq, [r.last] + r.forced) for r in decoding]
        t0 = time.perf_counter()
        logits = self.backend.run(segments)
        dt = time.perf_counter() - t0
        if not decoding:
            self.metrics.observe("prefill_chunk_seconds", dt)
        for j, (req, n) in enumerate(fed):
            req.prefilled += n
            self.metrics.inc("prompt_tokens_total", n)
            if req.prefilled == len(req.prompt):
                req.state = "decode"
                self._accept(req, logits[j:j + 1])
        if decoding:
            self._decoded(decoding, logits, dt, first=len(fed))

    def _accept(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the next token of `req` from logits [1, V], stream it, maybe finish."""
        logits = logits.float()
        if logits.shape[-1] > self.vocab:
            logits[:, self.vocab:] = float("-inf")
        cfg = req.cfg
        adjusted = req.penalties(logits, req.tokens)
        if req.matcher is not None:
            adjusted = req.matcher.mask(adjusted)
        tok = int(sample_next(adjusted, cfg, req.generator)[0])
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
            self.metrics.observe("time_to_first_token_seconds", now - req.t_submit)
        else:
            self.metrics.observe("inter_token_latency_seconds", now - req.t_last)
        req.t_last = now
        if tok in req.cfg.stop_token_ids:
            self._finish(req, "stop")
            return
        if req.matcher is not None:
            req.matcher.advance(tok)
        req.tokens.append(tok)
        req.last = tok
        if req.logprobs is not None:
            req.pending += _entries(logits.log_softmax(-1), [tok], req.logprobs)
        self.metrics.inc("generation_tokens_total")
        req.forced = self._forced(req)
        text = req.detok(req.tokens)
        stops = req.cfg.stop_strings
        if stops:
            text, hit = truncate_at_stop(text, stops)
            if hit:
                req.text = text
                self._finish(req, "stop")
                return
        req.text = text
        if req.matcher is not None and req.matcher.stopped:  # the grammar is complete
            self._finish(req, "stop")
            return
        if len(req.tokens) >= req.cfg.max_new_tokens:
            self._finish(req, "length")
            return
        safe = text.rstrip("\ufffd")  # an incomplete UTF-8 character decodes as U+FFFD
        safe = safe[:len(safe) - _held_suffix(safe, stops)] if stops else safe
        if len(safe) > len(req.sent) and safe.startswith(req.sent):
            self._emit_text(req, safe[len(req.sent):])
            req.sent = safe

    def _forced(self, req: Request) -> list[int]:
        """The tokens a request's grammar forces after its last token (a JSON key, the opening
        of a tool call), taken into the reply at once and fed with that token in the next
        forward, so each costs a row of a forward instead of a decode step of its own. Only on
        a backend that takes several tokens of a sequence in one forward, and not when
        log-probabilities are asked for (forced tokens have none)."""
        if req.matcher is None or req.logprobs is not None or not mixes(self.backend) or req.matcher.stopped:
            return []
        ff = req.matcher.forced(req.cfg.max_new_tokens - len(req.tokens))
        req.tokens += ff
        self.metrics.inc("generation_tokens_total", len(ff))
        self.metrics.inc("grammar_forced_tokens_total", len(ff))
        return ff

    def _emit_text(self, req: Request, text: str) -> None:
        lps = None
        if req.logprobs is not None:
            lps, req.pending = req.pending, []
        req.emit(Event("text", text, logprobs=lps))

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req in self.active:
            self.active.remove(req)
            try:
                self.backend.free(req.seq)
            except Exception:  # never let a failed free keep the request alive
                traceback.print_exc(file=sys.stderr)
        req.state, req.finish_reason = "done", reason
        self.metrics.inc("requests_finished_total", route=req.route, finish_reason=reason)
        if req.t_first is not None:
            self.metrics.observe("request_duration_seconds", time.perf_counter() - req.t_submit)
        if error is not None:
            req.emit(Event("error", error))
            return
        if reason == "cancelled":
            req.emit(Event("done", finish_reason=reason))
            return
        rest = req.text[len(req.sent):] if req.text.startswith(req.sent) else ""
        if rest or req.pending:
            self._emit_text(req, rest)
            req.sent = req.text
        req.emit(Event("done", finish_reason=reason))

    # ---- metrics ------------------------------------------------------------------------------
    def _define_metrics(self) -> None:
        m = self.metrics
        m.counter("prompt_tokens_total", "Prompt tokens prefilled.")
        m.counter("prompt_tokens_cached_total", "Prompt tokens taken from the prompt cache instead (not prefilled).")
        m.counter("generation_tokens_total", "Tokens generated (stop tokens excluded).")
        m.counter("grammar_forced_tokens_total", "Generated tokens a grammar forced, fed in one forward with the "
                                                 "token before them (native runtime).")
        m.counter("requests_finished_total", "Requests finished, by route and finish reason "
                                             "(stop, length, cancelled: the client went away, error).")
        m.gauge("queue_depth", "Requests waiting for a slot.", lambda: len(self.waiting))
        m.gauge("running_sequences", "Sequences holding a slot (prefilling or decoding).", lambda: len(self.active))
        m.gauge("max_batch", "Slots: sequences decoded together at most.", lambda: self.max_batch)
        m.gauge("kv_cache_bytes", "KV cache bytes allocated (after the last iteration).")
        m.histogram("batch_size", "Sequences per batched decode step.", BATCH_BUCKETS)
        m.histogram("decode_step_seconds", "Time of one batched decode step (with the prompt chunk run "
                                           "in it, on the native runtime).")
        m.histogram("prefill_chunk_seconds", "Time of one prefill chunk run without decode rows.")
        m.histogram("time_to_first_token_seconds", "From submission to the first token (queueing included).")
        m.histogram("inter_token_latency_seconds", "Between consecutive tokens of one request.")
        m.histogram("request_duration_seconds", "From submission to the last token.")
