"""The model side of evaluation: log-likelihoods and generations from a PLM checkpoint, batched.

`PLMEvalModel` is the one engine behind both `plm eval` and the lm-evaluation-harness
adapter (`plm.eval.lm_eval_model`), so the two harnesses score a request the same way.
Task code talks to the small `EvalLM` protocol, which tests can satisfy with a fake.

Conventions (those of lm-evaluation-harness's `hf` model, so numbers are comparable):
- a log-likelihood is a log-softmax over the model's full output vocabulary;
- trailing whitespace of a context moves to the start of its continuation, and the
  continuation's tokens are those of ``encode(context + continuation)`` past the context's;
- an empty context is replaced by ``<|endoftext|>``;
- inputs longer than the model's window keep their last ``max_length`` tokens.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

from plm.data.chat import chat_prompt
from plm.errors import PLMError


class EvalLM(Protocol):
    """What evaluation tasks need from a model."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]],
                      desc: str | None = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would produce it) per request."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                 desc: str | None = None) -> list[str]:
        """Greedy continuation of each prompt, cut before the first stop string."""

    def chat_prompt(self, messages: list[dict]) -> str:
        """The text that asks the model for the next assistant turn of ``messages``."""


def _chunks(seq: list[int], n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


class PLMEvalModel:
    """A `PLMForCausalLM` and its tokenizer, as an `EvalLM`."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 progress: bool = True, autocast_bf16: bool = False) -> None:
        if batch_size < 1:
            raise PLMError(f"batch size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = int(max_length or model.config.max_position_embeddings)
        if self.max_length < 2:
            raise PLMError(f"max_length must be at least 2, got {self.max_length}")
        self.progress = progress
        self.autocast_bf16 = autocast_bf16  # bf16 autocast over fp32 weights (worth it on CUDA)
        self.truncated = 0  # inputs cut to fit max_length, for the report

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu",
                        **kwargs) -> "PLMEvalModel":
        from plm.data.tokenizer import Tokenizer
        from plm.model.modeling import PLMForCausalLM

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise PLMError(f"device {device!r} requested but CUDA is not available")
        from plm.model.hub import resolve_model
        path = resolve_model(path)
        model = PLMForCausalLM.from_pretrained(path, dtype=dtype, device=device)
        return cls(model, Tokenizer.from_dir(path), **kwargs)

    # ---- tokens ----------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """Stands in for an empty context (Qwen2 documents are separated by <|endoftext|>)."""
        return self.tokenizer.endoftext_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context and of its continuation, split where the two tokenizations part."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not continuation:
            raise PLMError("cannot score an empty continuation")
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        split = 0
        while split < min(len(ctx), len(whole)) and ctx[split] == whole[split]:
            split += 1
        if split == len(whole):  # continuation merged entirely into the context's last token
            split -= 1
        if split == 0:
            return [self.prefix_token_id], whole
        return whole[:split], whole[split:]

    # ---- log-likelihoods ---------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]],
                      desc: str | None = None) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], desc=desc)

    @torch.inference_mode()
    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                             desc: str | None = None) -> list[tuple[float, bool]]:
        """Score token-level (context, continuation) pairs; longest first, right-padded batches."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = []
        for ctx, cont in requests:
            ctx, cont = list(ctx), list(cont)
            if not cont:
                raise PLMError("cannot score an empty continuation")
            if not ctx:
                ctx = [self.prefix_token_id]
            if len(cont) > self.max_length:
                raise PLMError(f"a continuation of {len(cont)} tokens exceeds the model window "
                               f"({self.max_length})")
            full = ctx + cont
            if len(full) > self.max_length + 1:
                self.truncated += 1
                full = full[-(self.max_length + 1):]
            rows.append((full[:-1], cont))
        # requests with the same input share one forward pass (e.g. MMLU's four one-letter
        # answers after one prompt): the continuations differ only in the targets gathered
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (inp, _) in enumerate(rows):
            groups.setdefault(tuple(inp), []).append(i)
        inputs = sorted(groups, key=len, reverse=True)
        dev = self.model.device
        bar = tqdm(total=len(rows), desc=desc or "loglikelihood", unit="req", disable=not self.progress,
                   leave=False)
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size]
            T = len(batch[0])
            ids = torch.full((len(batch), T), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for j, inp in enumerate(batch):
                ids[j, :len(inp)] = torch.tensor(inp)
                mask[j, :len(inp)] = 1
            attn = None if bool(mask.all()) else mask.to(dev)
            hidden = self.model.model(ids.to(dev), attention_mask=attn)  # [B, T, D]
            # logits only where a continuation token is predicted: the full [B, T, V] is huge
            picked, targets, spans = [], [], []
            for j, inp in enumerate(batch):
                L = len(inp)
                for i in groups[inp]:
                    cont = rows[i][1]
                    picked.append(hidden[j, L - len(cont):L])
                    targets.extend(cont)
                    spans.append((i, len(cont)))
            logp = self.model.lm_head(torch.cat(picked)).float().log_softmax(-1)
            tgt = torch.tensor(targets, device=logp.device)
            token_lp = logp.gather(-1, tgt[:, None]).squeeze(-1)
            greedy = logp.argmax(-1) == tgt
            pos = 0
            for i, n in spans:
                results[i] = (float(token_lp[pos:pos + n].sum()), bool(greedy[pos:pos + n].all()))
                pos += n
            bar.update(len(spans))
        bar.close()
        return results  # type: ignore[return-value]

    def rolling_windows(self, tokens: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) pairs that predict every token exactly once, the first from
        <|endoftext|>, each window as long as the model allows (lm-eval's rolling scheme)."""
        tokens = list(tokens)
        seq = [self.prefix_token_id] + tokens
        return [(seq[:s + 1], tokens[s:s + self.max_length])
                for s in range(0, len(tokens), self.max_length)]

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str | None = None) -> list[float]:
        """log p(text) of whole documents, windowed to the model's context."""
        windows, owner = [], []
        for k, text in enumerate(texts):
            for w in self.rolling_windows(self.tokenizer.encode(text)):
                windows.append(w)
                owner.append(k)
        scores = self.loglikelihood_tokens(windows, desc=desc or "loglikelihood_rolling")
        totals = [0.0] * len(texts)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        return totals

    # ---- generation ----------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                 desc: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, batch_size: int | None = None) -> list[str]:
        """A continuation of each prompt (greedy unless `temperature` > 0), cut before the first
        stop string: the one batched-generation path of evaluation, self-refinement and ARIES
        sampling. Prompts are batched by length (shortest first); batch b samples with seed
        `seed + b`, so a run is reproducible for the same prompts and batch size."""
        from plm.infer.generate import GenerationConfig, generate_tokens, model_step_fn, truncate_at_stop

        if max_new_tokens >= self.max_length:
            raise PLMError(f"max_new_tokens ({max_new_tokens}) must be below the model window "
                           f"({self.max_length})")
        room = self.max_length - max_new_tokens
        tok = self.tokenizer
        encoded = []
        for p in prompts:
            ids = tok.encode(p) or [self.prefix_token_id]
            if len(ids) > room:
                self.truncated += 1
                ids = ids[-room:]
            encoded.append(ids)
        stop = [s for s in stop if s]
        out: list[str] = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        bar = tqdm(total=len(prompts), desc=desc or "generate", unit="seq", disable=not self.progress,
                   leave=False)
        for b, batch in enumerate(_chunks(order, batch_size or self.batch_size)):
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   stop_token_ids=list(tok.stop_token_ids), stop_strings=list(stop),
                                   seed=None if seed is None else seed + b)
            gen: list[list[int]] = [[] for _ in batch]
            with torch.inference_mode(), self._autocast():
                for row, t in generate_tokens(model_step_fn(self.model), [encoded[i] for i in batch], cfg,
                                              pad_id=tok.pad_token_id, vocab_size=tok.vocab_size,
                                              decode=tok.decode):
                    gen[row].append(t)
            for j, i in enumerate(batch):
                out[i] = truncate_at_stop(tok.decode(gen[j]), stop)[0]
            bar.update(len(batch))
        bar.close()
        return out

    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16)

    def chat_prompt(self, messages: list[dict]) -> str:
        return chat_prompt(messages)
