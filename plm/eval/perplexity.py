"""Held-out perplexity of a checkpoint on prepared token shards."""
from __future__ import annotations

import math
from pathlib import Path


def token_perplexity(ckpt: str | Path, data: str | Path, seq_len: int = 256, batch: int = 8,
                     batches: int = 4, seed: int = 99) -> dict:
    """Next-token loss and perplexity over `batches` x `batch` windows of `seq_len` tokens drawn
    (seeded) from a prepared token folder."""
    import torch

    from plm.data.mixture import MixtureLoader
    from plm.model.loss import lm_loss_sum
    from plm.model.modeling import PLMForCausalLM

    model = PLMForCausalLM.from_pretrained(ckpt)
    loader = MixtureLoader({"heldout": (str(data), 1.0)}, seq_len, batch, seed=seed)
    tot, n = 0.0, 0
    with torch.no_grad():
        for _ in range(batches):
            x, y = next(loader)
            ls, c = lm_loss_sum(model, {"input_ids": x, "labels": y})
            tot, n = tot + float(ls), n + c
    return {"loss": tot / n, "perplexity": math.exp(tot / n), "tokens": n}


def paired_perplexity_ratio(nll_a, nll_b) -> dict:
    """Perplexity of A over perplexity of B on the same tokens, with its uncertainty.

    nll_a, nll_b: per-token negative log-likelihoods [sequences, tokens] of the same text.
    Two quantisations of one model differ by a fraction of a percent, less than the spread of
    perplexity across texts, so the comparison is paired: the mean per-token difference d of
    log-likelihoods (log of the ratio), and its standard error over the sequences' own mean
    differences (tokens within a sequence are not independent; sequences are). Returns ratio =
    exp(d), d, se (nan with one sequence) and the two-sided 95% interval of the ratio,
    exp(d -+ 1.96 se).
    """
    import torch

    a, b = torch.as_tensor(nll_a, dtype=torch.float64), torch.as_tensor(nll_b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 2 or a.numel() == 0:
        raise ValueError(f"paired_perplexity_ratio needs two equal, non-empty [sequences, tokens] arrays; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    per_seq = (a - b).mean(1)
    d = float((a - b).mean())
    n = per_seq.numel()
    se = float(per_seq.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"ratio": math.exp(d), "log_ratio": d, "se": se, "sequences": n,
            "ci95": [math.exp(d - 1.96 * se), math.exp(d + 1.96 * se)]}
