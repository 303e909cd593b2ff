"""GGUF export for llama.cpp's `plm` architecture, through the `gguf` package.

f32, f16, bf16, q8_0 and q4_0 are written directly (the `gguf` package's numpy quantisers, the
same round-to-nearest blocks as llama.cpp's reference quantiser; norms stay f32; a matrix whose
rows are not whole 32-value blocks stays f16; for q4_0 the tied embedding/output matrix is q8_0,
as llama.cpp keeps its output layer at higher precision). K-quants (q4_k_m, q5_k_m, q6_k) are
made by llama.cpp's own quantiser from an f32 file (the `llama` extra).
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from plm.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from plm.errors import PLMError
from plm.model.checkpoint import load_config, read_headers, validate_checkpoint
from plm.model.config import PLMConfig
from plm.utils import atomic_path

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
from plm.export import DIRECT_TYPES, LLAMA_FTYPES, TYPES  # noqa: E402  (light constants the CLI reads too)


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
               name: str | None = None, progress: bool = False) -> Path:
    """Write a GGUF of a directly written type (f32, f16, bf16, q8_0, q4_0) from a checkpoint
    directory, read tensor by tensor from its safetensors; atomic."""
    import gguf
    from safetensors import safe_open
    from tqdm.auto import tqdm

    if ftype not in DIRECT_TYPES:
        raise PLMError(f"write_gguf writes {', '.join(DIRECT_TYPES)}, got {ftype!r}")
    ckpt, out = Path(ckpt), Path(out)
    cfg: PLMConfig = load_config(ckpt)
    headers = read_headers(ckpt)
    validate_checkpoint(ckpt, cfg, headers)  # llama.cpp would refuse a wrong-shape or missing tensor later
    check_output_path(ckpt, out)
    tok = tokenizer or Tokenizer.from_dir(ckpt)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "plm")
        _write_metadata(w, cfg, tok, ftype, name or ckpt.resolve().name)
        opened = {}
        names = [n for n in sorted(headers, key=_tensor_order)
                 if n != "lm_head.weight" and not n.endswith("rotary_emb.inv_freq")]  # tied output: token_embd
        for hf_name in tqdm(names, desc=f"GGUF {ftype}", unit="tensor", disable=not progress, leave=False):
            file = headers[hf_name][0]
            f = opened.setdefault(file, safe_open(str(file), framework="pt"))
            arr, raw = _encode(f.get_tensor(hf_name).float().numpy(), ftype, hf_name)
            w.add_tensor(gguf_tensor_name(hf_name), arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    return out


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def _encode(t: np.ndarray, ftype: str, hf_name: str):
    """A tensor in the file's type: (array, gguf raw dtype or None for a plain float array)."""
    import gguf
    from gguf import quants

    Q = gguf.GGMLQuantizationType
    if t.ndim == 1 or ftype == "f32":
        return t.astype(np.float32), None  # norms stay f32: llama.cpp requires it
    kind = {"f16": None, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[ftype]
    if ftype == "q4_0" and hf_name == "model.embed_tokens.weight":
        kind = Q.Q8_0  # the tied output layer: 8 bits, as llama.cpp keeps its output layer finer
    if kind is None or (kind in (Q.Q8_0, Q.Q4_0) and t.shape[-1] % 32):
        return t.astype(np.float16), None  # f16, or rows that are not whole 32-value blocks
    return quants.quantize(t, kind), kind


def check_output_path(ckpt: Path, out: Path) -> None:
    """Never write an export over the checkpoint it is made from."""
    try:
        inside = out.resolve().parent == ckpt.resolve()
    except OSError:
        return
    if inside and (out.suffix in (".safetensors", ".json") or out.name.startswith(("tokenizer", "config"))
                   or out.exists() and out.suffix != ".gguf"):
        raise PLMError(f"--out {out} would overwrite a file of the checkpoint {ckpt}; write the GGUF elsewhere")
    if out.exists() and out.is_dir():
        raise PLMError(f"--out {out} is a directory; give a file name, e.g. {out / 'model.gguf'}")


def _write_metadata(w, cfg: PLMConfig, tok: Tokenizer, ftype: str, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling:  # linear: llama.cpp divides positions by the factor too
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factor)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.qk_head_dim)
    w.add_value_length(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[ftype]))
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


def _tensor_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1, name)


def quantize(src: str | Path, out: str | Path, qtype: str, threads: int = 0) -> Path:
    """Quantise a GGUF with llama.cpp's quantiser (needs the `llama` extra)."""
    if qtype not in LLAMA_FTYPES:
        raise PLMError(f"unknown quantisation {qtype!r}; choose from {', '.join(LLAMA_FTYPES)}")
    try:
        import llama_cpp
    except ImportError:
        raise PLMError("quantised GGUF export needs llama-cpp-python: pip install 'plm[llama]'") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[qtype]
    params.nthread = threads
    with atomic_path(out) as tmp, quiet_llama_log():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise PLMError(f"llama.cpp quantisation of {src} to {qtype} failed (code {rc})")
    return Path(out)


@contextlib.contextmanager
def quiet_llama_log():
    """llama.cpp logs every tensor it quantises to stderr (through llama-cpp-python's logger,
    printed below its level): keep errors only while quantising."""
    import logging

    from llama_cpp import _logger
    before = _logger.logger.level
    _logger.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        _logger.logger.setLevel(before)


def export_gguf(ckpt: str | Path, out: str | Path, qtype: str = "f16",
                tokenizer: Tokenizer | None = None, progress: bool = False) -> Path:
    """Checkpoint directory -> GGUF of any supported type."""
    if qtype not in TYPES:
        raise PLMError(f"unknown GGUF type {qtype!r}; choose from {', '.join(TYPES)}")
    from plm.model.hub import resolve_model
    ckpt, out = resolve_model(ckpt), Path(out)
    check_output_path(ckpt, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if qtype in DIRECT_TYPES:
        return write_gguf(ckpt, out, qtype, tokenizer, progress=progress)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        base = write_gguf(ckpt, Path(tmp) / "base-f32.gguf", "f32", tokenizer, progress=progress)
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
