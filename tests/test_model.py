"""The PyTorch model against REFERENCE §1's equations, padding, caching, packing and dtypes.
(Agreement with llama.cpp's independent implementation is in test_gguf_parity.py.)"""
import math

import pytest
import torch

from plm import PLMForCausalLM
from plm.model.cache import FullCache
from plm.model.modeling import apply_rope


def naive_forward(model: PLMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """REFERENCE §1 written out literally: per-head loops, complex-number RoPE on
    interleaved pairs, explicit causal softmax. Shares no code with plm.model."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)

    def rope(x, pos):  # x [T, 64]: pair (x[2i], x[2i+1]) is a complex number
        d = x.shape[-1]
        freqs = torch.tensor([c.rope_theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
        rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), pos[:, None].double() * freqs)
        xc = torch.view_as_complex(x.reshape(len(pos), d // 2, 2).contiguous())
        return torch.view_as_real(xc * rot).reshape(len(pos), d)

    T = ids.shape[0]
    pos = torch.arange(T)
    x = sd["model.embed_tokens.weight"][ids]
    H, dn, dr, dv, r = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = h @ sd[p + "self_attn.q_proj.weight"].T
        ckv = h @ sd[p + "self_attn.kv_a_proj_with_mqa.weight"].T
        lat, k_rope = ckv[:, :r], rope(ckv[:, r:], pos)
        kv = rms(lat, sd[p + "self_attn.kv_a_layernorm.weight"]) @ sd[p + "self_attn.kv_b_proj.weight"].T
        heads = []
        for hh in range(H):
            qh = q[:, hh * (dn + dr):(hh + 1) * (dn + dr)]
            qh = torch.cat([qh[:, :dn], rope(qh[:, dn:], pos)], -1)
            kvh = kv[:, hh * (dn + dv):(hh + 1) * (dn + dv)]
            kh = torch.cat([kvh[:, :dn], k_rope], -1)
            vh = kvh[:, dn:]
            s = qh @ kh.T / math.sqrt(dn + dr)
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(s, -1) @ vh)
        x = x + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + torch.relu(h @ sd[p + "mlp.up_proj.weight"].T) ** 2 @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["model.embed_tokens.weight"].T


def test_matches_reference_equations(small_model):
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    ref = naive_forward(small_model, ids)
    with torch.no_grad():
        ours = small_model(ids[None]).logits[0].double()
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_rope_rotates_interleaved_pairs_by_hand():
    # one pair, position 1, theta irrelevant for pair 0 (frequency 1): rotate (1, 0) by 1 rad
    x = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]])  # [B=1, H=1, T=1, 4]
    cos = torch.tensor([[[math.cos(1.0), math.cos(0.01)]]])
    sin = torch.tensor([[[math.sin(1.0), math.sin(0.01)]]])
    out = apply_rope(x, cos, sin)[0, 0, 0]
    expect = [math.cos(1.0), math.sin(1.0), -math.sin(0.01), math.cos(0.01)]
    assert torch.allclose(out, torch.tensor(expect), atol=1e-6)


def test_tied_embeddings_and_no_biases(small_model):
    assert small_model.lm_head.weight is small_model.model.embed_tokens.weight
    assert all("bias" not in n for n, _ in small_model.named_parameters())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded(small_model, side):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 512, (n,), generator=g) for n in (9, 4, 7)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        batch = small_model(ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = small_model(s[None]).logits[0]
            got = batch[i][mask[i].bool()]
            assert torch.allclose(got, alone, atol=1e-5), (side, i, (got - alone).abs().max())


def test_kv_cache_decoding_matches_full_forward(small_model):
    ids = torch.randint(0, 512, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = small_model(ids).logits
        cache = FullCache(small_model.config)
        parts = [small_model(ids[:, :6], cache=cache).logits]
        for t in range(6, 15):
            parts.append(small_model(ids[:, t:t + 1], cache=cache).logits)
    assert cache.length == 15
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_packed_samples_with_block_mask_match_separate_runs(small_model):
    a, b = torch.arange(3, 10), torch.arange(20, 25)
    ids = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    seg = torch.tensor([0] * len(a) + [1] * len(b))
    T = len(seg)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal & (seg[:, None] == seg[None, :]))[None, None]
    with torch.no_grad():
        packed = small_model(ids, attention_mask=mask, position_ids=pos).logits[0]
        assert torch.allclose(packed[:len(a)], small_model(a[None]).logits[0], atol=1e-5)
        assert torch.allclose(packed[len(a):], small_model(b[None]).logits[0], atol=1e-5)


def test_bf16_close_to_fp32(small_model):
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = small_model(ids).logits
        bf = small_model.to(torch.bfloat16)(ids).logits
    assert bf.dtype == torch.bfloat16
    assert (bf.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_loss_and_backward(small_model):
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    labels = ids  # transformers' convention: shifted inside the model
    out = small_model.train()(ids, labels=labels)
    assert math.log(512) * 0.8 < out.loss.item() < math.log(512) * 1.2
    out.loss.backward()
    assert small_model.model.layers[0].self_attn.kv_b_proj.weight.grad.abs().sum() > 0
    small_model.model.gradient_checkpointing = True
    small_model.zero_grad()
    out2 = small_model(ids, labels=labels)
    assert torch.allclose(out.loss, out2.loss)


def test_eager_attention_baseline_matches_sdpa(small_model):
    from plm.model.modeling import PLMAttention
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = small_model(ids).logits, small_model(ids, attention_mask=mask).logits
        PLMAttention.impl = "eager"
        try:
            got = small_model(ids).logits, small_model(ids, attention_mask=mask).logits
        finally:
            PLMAttention.impl = "sdpa"
    assert torch.allclose(got[0], ref[0], atol=1e-5) and torch.allclose(got[1], ref[1], atol=1e-5)
