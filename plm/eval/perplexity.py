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
