"""GGUF export for llama.cpp's `plm` architecture, through the `gguf` package.

f32/f16 are written directly; quantised types (q8_0, q4_k_m, ...) are produced from the
f16/f32 file by llama.cpp's own quantiser in `llama-cpp-python`, so the bytes are exactly
what llama.cpp would make.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from plm.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from plm.errors import PLMError
from plm.model.checkpoint import load_config, weight_map
from plm.model.config import PLMConfig

# HF tensor name (after "model.layers.N.") -> llama.cpp tensor name (after "blk.N.")
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}

# llama.cpp's llama_ftype values for the quantiser
QUANT_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
TYPES = ("f32", "f16", *QUANT_FTYPES)


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_TENSORS:
        return f"blk.{parts[2]}.{LAYER_TENSORS[parts[3]]}"
    raise PLMError(f"tensor {hf_name!r} has no GGUF name for the plm architecture")


def _vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings, types and merges as llama.cpp's gpt2 tokenizer expects them;
    ids beyond the tokenizer (embedding padding) become [PADn] entries."""
    import gguf
    import json

    model = json.loads(tok.hf.to_str())["model"]
    by_id = {i: s for s, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise PLMError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    special = {tok.token_id(t) for t in SPECIAL_TOKENS}
    added = {t.content for t in tok.hf.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL)
        elif by_id[i] in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def write_gguf(ckpt: str | Path, out: str | Path, ftype: str = "f16", tokenizer: Tokenizer | None = None,
               name: str | None = None) -> Path:
    """Write an f32 or f16 GGUF from a checkpoint directory (read from its safetensors)."""
    import gguf
    from safetensors import safe_open

    if ftype not in ("f32", "f16"):
        raise PLMError(f"write_gguf writes f32 or f16, got {ftype!r}")
    ckpt, out = Path(ckpt), Path(out)
    cfg: PLMConfig = load_config(ckpt)
    tok = tokenizer or Tokenizer.from_dir(ckpt)
    w = gguf.GGUFWriter(str(out) + ".tmp", "plm")
    w.add_name(name or ckpt.resolve().name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.qk_head_dim)
    w.add_value_length(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges = _vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # same pre-tokenizer regex for Qwen2 and our small BPEs
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.endoftext_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.config.get("chat_template") or "")
    wmap = weight_map(ckpt)
    opened = {}
    for hf_name in sorted(wmap, key=_tensor_order):
        if hf_name == "lm_head.weight" or hf_name.endswith("rotary_emb.inv_freq"):
            continue  # tied output: llama.cpp reuses token_embd
        f = opened.setdefault(wmap[hf_name], safe_open(str(wmap[hf_name]), framework="pt"))
        t = f.get_tensor(hf_name).float()
        # norms stay f32 (llama.cpp requires it); matrices follow ftype
        arr = t.numpy().astype(np.float16 if ftype == "f16" and t.dim() == 2 else np.float32)
        w.add_tensor(gguf_tensor_name(hf_name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(str(out) + ".tmp", out)
    return out


def _tensor_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1, name)


def quantize(src: str | Path, out: str | Path, qtype: str, threads: int = 0) -> Path:
    """Quantise a GGUF with llama.cpp's quantiser (needs the `llama` extra)."""
    if qtype not in QUANT_FTYPES:
        raise PLMError(f"unknown quantisation {qtype!r}; choose from {', '.join(QUANT_FTYPES)}")
    try:
        import llama_cpp
    except ImportError:
        raise PLMError("quantised GGUF export needs llama-cpp-python: pip install 'plm[llama]'") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[qtype]
    params.nthread = threads
    tmp = str(out) + ".tmp"
    rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), params)
    if rc != 0:
        Path(tmp).unlink(missing_ok=True)
        raise PLMError(f"llama.cpp quantisation of {src} to {qtype} failed (code {rc})")
    os.replace(tmp, out)
    return Path(out)


def export_gguf(ckpt: str | Path, out: str | Path, qtype: str = "f16",
                tokenizer: Tokenizer | None = None) -> Path:
    """Checkpoint directory -> GGUF of any supported type."""
    if qtype not in TYPES:
        raise PLMError(f"unknown GGUF type {qtype!r}; choose from {', '.join(TYPES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if qtype in ("f32", "f16"):
        return write_gguf(ckpt, out, qtype, tokenizer)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        base = write_gguf(ckpt, Path(tmp) / "base-f32.gguf", "f32", tokenizer)
        return quantize(base, out, qtype)


def load_gguf_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an f32/f16 GGUF back as HF-named tensors (round-trip checks)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    inv = {v: k for k, v in GLOBAL_TENSORS.items()}
    inv_layer = {v: k for k, v in LAYER_TENSORS.items()}
    state = {}
    for t in reader.tensors:
        if t.name in inv:
            hf = inv[t.name]
        else:
            _, n, rest = t.name.split(".", 2)
            hf = f"model.layers.{n}.{inv_layer[rest]}"
        shape = tuple(reversed([int(x) for x in t.shape]))
        state[hf] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    return state
