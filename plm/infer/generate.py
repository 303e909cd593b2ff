"""Text generation: prompts in, text out (batched, streamed, cut at stop strings), on the
sampling loop of plm.model.generation; and the context-window check of the CLI.

`generate` is backend-agnostic: a `step` callable maps (new token ids, attention mask) to
next-token logits and owns the cache, so the reference model and the edge runtime share
one sampling loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from plm.errors import PLMError
# the sampling core lives with the model (PLMForCausalLM.generate uses it); this module is the
# generation API users import, so it names the core's pieces too
from plm.model.generation import (NUCLEUS_CANDIDATES, GenerationConfig, IncrementalText, StepFn,  # noqa: F401
                                  apply_repetition_penalty, generate_tokens, left_pad, model_step_fn, penalize,
                                  SequencePenalties, recompute_step_fn, sample_next)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per sequence (stop token excluded)
    texts: list[str] | None = None
    finish_reasons: list[str] = field(default_factory=list)  # "stop" | "length"


def fit_to_context(cfg: GenerationConfig, prompt_tokens: int, context: int,
                   warn: Callable[[str], None] | None = None) -> None:
    """Cap `cfg.max_new_tokens` so prompt + reply fit the model's context window (saying so);
    a prompt that does not fit at all is an error."""
    if prompt_tokens >= context:
        raise PLMError(f"the prompt has {prompt_tokens} tokens; the model's context window is {context}")
    room = context - prompt_tokens
    if cfg.max_new_tokens > room:
        if warn:
            warn(f"--max-new-tokens {cfg.max_new_tokens} would pass the model's {context}-token window "
                 f"(prompt: {prompt_tokens} tokens); generating at most {room}")
        cfg.max_new_tokens = room


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(model, tokenizer, prompts: Sequence[str] | str, cfg: GenerationConfig | None = None,
             step: StepFn | None = None, stream: Callable[[str], None] | None = None) -> GenerationResult:
    """Generate continuations of text prompts (batched, left-padded).

    stream: called with each new piece of text of the first prompt as it is produced.
    """
    cfg = cfg or GenerationConfig()
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not cfg.stop_token_ids:
        cfg.stop_token_ids = list(tokenizer.stop_token_ids)
    encoded = [tokenizer.encode(p) for p in prompts]
    step = step or model_step_fn(model)
    tokens: list[list[int]] = [[] for _ in prompts]
    printed = ""
    streamed = IncrementalText(tokenizer.decode)
    for row, tok in generate_tokens(step, encoded, cfg, pad_id=tokenizer.pad_token_id,
                                    vocab_size=tokenizer.vocab_size, decode=tokenizer.decode):
        tokens[row].append(tok)
        if stream is not None and row == 0:
            text = streamed(tokens[0])
            # hold back text that may be the start of a stop string or a split UTF-8 char
            safe, _ = truncate_at_stop(text, cfg.stop_strings)
            if not safe.endswith("\ufffd") and len(safe) > len(printed):
                stream(safe[len(printed):])
                printed = safe
    texts, reasons = [], []
    for t in tokens:
        text, stopped = truncate_at_stop(tokenizer.decode(t), cfg.stop_strings)
        texts.append(text)
        reasons.append("stop" if stopped or len(t) < cfg.max_new_tokens else "length")
    if stream is not None:
        rest = texts[0][len(printed):]
        if rest:
            stream(rest)
    return GenerationResult(tokens=tokens, texts=texts, finish_reasons=reasons)
