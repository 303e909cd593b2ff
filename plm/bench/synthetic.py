"""Random-weight PLM checkpoints whose relu² activations are a chosen share exactly zero.

A trained PLM-1.8B leaves about 90.9% of its MLP activations exactly zero; a random-weight
model leaves about half (relu of a symmetric pre-activation). To measure whole-model sparse
decode at the real shape without the trained weights, `sparse_checkpoint` gives every up_proj
neuron a bias that fires it on the chosen share of tokens. PLM's MLP has no bias, so the bias
rides on a constant residual channel:

1. channel 0 of every token embedding is set to C = std(embedding) * sqrt(d), and row 0 of every
   o_proj and down_proj is zeroed, so no layer writes to channel 0: it stays C through the model
   and reaches each MLP, after RMSNorm, as a positive value c_t (per token, as the norm varies);
2. layer by layer, in one forward pass over calibration tokens (a hook before each MLP, so each
   layer is calibrated on the stream the calibrated layers below it produce), column 0 of
   up_proj is set per neuron j to b_j = -quantile_X(z_tj / c_t), where z_tj is the neuron's
   pre-activation from the other channels: z_tj + b_j c_t > 0 on a share 1 - X of the tokens.

3. every o_proj is scaled by `attn_scale` (0.02): a random model's attention output drifts
   along the sequence (it averages over a growing prefix), and at full scale that drift moved
   the zero share from 0.5-0.6 over the first 64 positions to 0.7-0.9 past 256 on PLM-1.8B;
   scaled down, the residual stream, and with it the share, hardly depends on the position
   (0.885-0.91 on held-out tokens at positions 0-16, 16-64, 64-256 and 256-1024, layers 0, 16
   and 31 of PLM-1.8B calibrated on 1,024 tokens). The attention still runs in full: the
   measured work is unchanged.

Each neuron fires on 1 - X of the calibration tokens (exactly, over the calibration sequence),
on different tokens per neuron, as in a trained model. The tied lm_head gains C times the final
norm's channel 0 on every logit alike, which changes no argmax. The achieved share on other
text differs a little from X (the quantiles come from the calibration tokens); benchmarks
report the share they measured.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from plm.errors import PLMError

ATTN_SCALE = 0.02  # o_proj scale: keeps the zero share the same at every position


def sparse_checkpoint(preset: str, sparsity: float, calibration_ids: Sequence[int], out: str | Path,
                      seed: int = 0, dtype: str = "bfloat16", attn_scale: float = ATTN_SCALE, **overrides) -> Path:
    """Write a random-weight `preset` checkpoint (with its Qwen2 tokenizer) whose relu²
    activations are about `sparsity` exactly zero on text like `calibration_ids`."""
    from plm.data.tokenizer import build_qwen2
    from plm.model.checkpoint import parse_dtype
    from plm.model.config import PLMConfig, padded_vocab
    from plm.model.modeling import PLMForCausalLM

    if not 0.0 < sparsity < 1.0:
        raise PLMError(f"sparsity must be in (0, 1), got {sparsity}")
    if len(calibration_ids) < 16:
        raise PLMError(f"need at least 16 calibration tokens, got {len(calibration_ids)}")
    tok = build_qwen2()
    cfg = PLMConfig.from_preset(preset, vocab_size=padded_vocab(tok.vocab_size), bos_token_id=tok.endoftext_id,
                                eos_token_id=tok.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = PLMForCausalLM(cfg).eval()
    make_sparse(model, sparsity, torch.as_tensor(list(calibration_ids), dtype=torch.long), attn_scale)
    out = Path(out)
    model.save_pretrained(out, dtype=parse_dtype(dtype))
    tok.save(out)
    return out


@torch.no_grad()
def make_sparse(model, sparsity: float, ids: torch.Tensor, attn_scale: float = ATTN_SCALE) -> None:
    """Rewrite `model` in place as the module docstring says (float32 weights expected)."""
    if not 0.0 < attn_scale <= 1.0:
        raise PLMError(f"attn_scale must be in (0, 1], got {attn_scale}")
    inner = model.model
    emb = inner.embed_tokens.weight
    emb[:, 0] = float(emb.std()) * emb.shape[1] ** 0.5
    for layer in inner.layers:
        layer.self_attn.o_proj.weight.mul_(attn_scale)
        layer.self_attn.o_proj.weight[0].zero_()
        layer.mlp.down_proj.weight[0].zero_()

    def calibrate(mlp, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        w = mlp.up_proj.weight
        c = x[:, 0]
        if bool((c <= 0).any()):
            raise PLMError("constant channel reached an MLP non-positive (norm weight <= 0?)")
        z = x[:, 1:] @ w[:, 1:].float().T  # [T, I] without channel 0
        ratio = z / c[:, None]
        w[:, 0] = -torch.quantile(ratio, sparsity, dim=0).to(w.dtype)

    hooks = [layer.mlp.register_forward_pre_hook(calibrate) for layer in inner.layers]
    try:
        inner(ids[None])  # the decoder stack only: no logits needed
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def relu2_zero_share(model, ids: torch.Tensor, start: int = 0, end: int | None = None) -> list[float]:
    """Per layer, the share of relu² activations exactly zero on `ids` (teacher-forced), over
    the positions [start, end)."""
    shares: list[float] = []

    def grab(mlp, inputs):
        z = mlp.up_proj(inputs[0][:, start:end])
        shares.append(float((torch.relu(z) == 0).float().mean()))

    hooks = [layer.mlp.register_forward_pre_hook(grab) for layer in model.model.layers]
    try:
        model(ids[None])
    finally:
        for h in hooks:
            h.remove()
    return shares
