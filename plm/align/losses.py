"""ARIES losses on summed response log-probabilities.

Notation (ARIES, arXiv 2502.05605): x the prompt, y_w the better answer, y_l the worse (or earlier) one,
z(x, y_l) the refinement context from `plm.data.chat`. Every log-prob here is the SUM of
the response tokens' log-probabilities (not a mean), as DPO defines it.

* `dpo_loss`:            -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))
* `aries_preference_loss`: DPO(x; y_w > y_l) + lambda * DPO(z(x, y_l); y_w > y_l)
  (ASSUMED form; lambda = 0 is plain DPO, the baseline)
* `aries_sft_loss`:       -[log p(y_w | x) + log p(y_w | z(x, y_l))]

Reference log-probs are plain tensors computed once per iteration from the frozen model
before it trains (see plm.align.aries), so no loss here ever needs a second model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position [B, T] (0 where label == -100). `labels` are next-token
    targets aligned with the logits (already shifted), as everywhere in plm.train."""
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return lp * mask


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-prob of the labelled (response) tokens of each row: [B]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return token_logps(logits, labels).sum(-1)


def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and implicit reward margin beta*((pi_w-ref_w)-(pi_l-ref_l))."""
    margin = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return -F.logsigmoid(margin), margin.detach()


def aries_preference_loss(direct: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                          refine: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
                          beta: float, lam: float) -> dict[str, torch.Tensor]:
    """Per-pair DPO(x; y_w > y_l) + lam * DPO(z(x, y_l); y_w > y_l).

    direct/refine: (pi_w, pi_l, ref_w, ref_l) summed log-probs in the direct context x and the
    refinement context z(x, y_l). With lam == 0 `refine` may be None: plain DPO.
    """
    d_loss, d_margin = dpo_loss(*direct, beta)
    out = {"loss": d_loss, "direct_margin": d_margin}
    if lam != 0:
        if refine is None:
            raise ValueError("lambda != 0 needs the refinement-context log-probs")
        r_loss, r_margin = dpo_loss(*refine, beta)
        out["loss"] = d_loss + lam * r_loss
        out["refine_margin"] = r_margin
    return out


def aries_sft_loss(logp_w_direct: torch.Tensor, logp_w_refine: torch.Tensor) -> torch.Tensor:
    """Per-pair ARIES-SFT loss -[log p(y_w|x) + log p(y_w|z(x,y_l))] (both terms weight 1)."""
    return -(logp_w_direct + logp_w_refine)
