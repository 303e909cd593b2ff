"""Language-model losses on the reference model, shared by training and evaluation.

`lm_loss_sum` takes the model's logits: [tokens, vocab] in fp32 is 151,936 x 4 bytes = 0.6 MB
per token, 10 GB for a 4 x 4096 batch, and as much again for its gradient. `chunked_lm_loss`
computes the same loss from the final hidden states and the tied embedding, a chunk of tokens
at a time, so the full logits exist neither in the forward nor in the backward pass
(`train.loss_chunk`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]

_INPUTS = ("input_ids", "attention_mask", "position_ids")


def lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over labelled tokens (labels already aligned with the
    inputs' next positions; -100 = ignored), and their count."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k in _INPUTS}
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) over rows of h, `chunk` rows at a time.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits
    exist: the loss is a scalar, so backward only scales them by the incoming gradient. This
    does the lm_head's three matrix products once each (a recomputing backward would do four)
    and keeps at most [chunk, vocab] fp32 logits alive.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hc, wc = h.to(dtype), w.to(dtype)  # the matmul dtype autocast would use for lm_head
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                x, y = hc[s:s + chunk], labels[s:s + chunk]
                logits = (x @ wc.t()).float()  # [n, V]: the only vocabulary-sized tensor
                lse = logits.logsumexp(-1)
                loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not (need_h or need_w):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g[torch.arange(len(y), device=g.device), y] -= 1  # d CE / d logits
                g = g.to(dtype)
                if need_h:
                    gh[s:s + chunk] = g @ wc
                if need_w:
                    gw.add_(g.t() @ x)  # accumulated in fp32 across chunks
        ctx.save_for_backward(*(t for t in (gh, gw) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = next(saved) if need_h else None
        gh = (gh * grad).to(gh.dtype) if need_h else None
        gw = (next(saved) * grad).to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk: int) -> torch.Tensor:
    """Summed cross entropy of logits hidden @ weight^T against labels (-100 = ignored),
    computed `chunk` tokens at a time; the [tokens, vocab] logits never exist whole.

    hidden [..., d] (the final, normalised hidden states), weight [V, d] (the tied embedding),
    labels [...]. Under autocast the products run in the autocast dtype, as lm_head's would;
    the logits, the log-sum-exp and the loss are fp32. Gradients flow to hidden and weight.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: a Function sees requires_grad even under no_grad
        h, weight = h.detach(), weight.detach()
    keep = y != -100
    if not bool(keep.all()):  # SFT masks prompts: their rows cost nothing
        idx = keep.nonzero().squeeze(1)
        h, y = h.index_select(0, idx), y.index_select(0, idx)
    return _LinearCrossEntropy.apply(h, weight, y, chunk, dtype)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The PLMForCausalLM under torch.compile's and DDP's wrappers (FSDP2 wraps in place)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def chunked_lm_loss(chunk: int) -> LossFn:
    """A trainer loss like `lm_loss_sum`, with the linear + cross entropy chunked.

    The model runs with logits_to_keep=1 (the lm_head sees one position) and returns its final
    hidden states; the loss reads the tied embedding from the model itself. Under FSDP2 the
    root module keeps its parameters unsharded from its forward until its backward, so this is
    the gathered embedding, and its gradient is reduce-scattered with the rest."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k in _INPUTS}
        out = model(**inputs, logits_to_keep=1)
        weight = unwrap_model(model).lm_head.weight
        return chunked_cross_entropy_sum(out.hidden_states, weight, labels, chunk), int((labels != -100).sum())

    loss_fn.chunk = chunk  # type: ignore[attr-defined]
    return loss_fn
