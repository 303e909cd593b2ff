"""Checkpoints in the released Hugging Face layout: config.json + safetensors (+ index when sharded).

Loading is strict: every expected tensor must be present with the right shape, nothing is
silently re-initialised, and every failure names the file and the tensor.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from plm.errors import CheckpointError, ConfigError
from plm.model.config import PLMConfig, padded_vocab
from plm.model.modeling import PLMForCausalLM
from plm.utils import atomic_path, atomic_write_text, parse_size

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# our transformers implementation, copied beside every checkpoint so that
# AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads it (docs/transformers.md)
HF_CODE = Path(__file__).parent / "hf"
HF_FILES = ("configuration_plm.py", "modeling_plm.py")
AUTO_MAP = {"AutoConfig": "configuration_plm.PLMConfig", "AutoModelForCausalLM": "modeling_plm.PLMForCausalLM"}
# tensors some exporters add that carry no information for PLM
_IGNORABLE = re.compile(r"(^lm_head\.weight$)|(rotary_emb\.inv_freq$)")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def save_model(model: PLMForCausalLM, path: str | Path, max_shard_size: int | str = "4GB",
               dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors; tied lm_head is stored once (as embed_tokens)."""
    save_state_dict(model.state_dict(), model.config, path, max_shard_size, dtype or model.dtype)


def save_state_dict(state: dict[str, torch.Tensor], config: PLMConfig, path: str | Path,
                    max_shard_size: int | str = "4GB", dtype: torch.dtype | None = None) -> None:
    """Write a full (gathered) state dict in the released layout.

    Each file is written under a temporary name and renamed, so a crash never leaves a
    half-written tensor file under the final name.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size, "max_shard_size")
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu()
             for k, v in state.items() if k != "lm_head.weight"}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    cfg = config.to_dict()
    cfg["torch_dtype"] = cfg["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")  # what is stored
    # remove files of an earlier save with another shard count
    for old in list(path.glob("model-*-of-*.safetensors")) + [path / SINGLE_FILE, path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        with atomic_path(path / fname) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    for name in HF_FILES:
        atomic_write_text(path / name, (HF_CODE / name).read_text())
    cfg["auto_map"] = {**cfg.get("auto_map", {}), **AUTO_MAP}  # ours replace a released checkpoint's
    atomic_write_text(path / "config.json", json.dumps(cfg, indent=2) + "\n")


def weight_map(path: str | Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for a single-file or sharded checkpoint directory."""
    path = Path(path)
    if (path / INDEX_FILE).exists():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            return {k: path / v for k, v in index["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a valid safetensors index ({e})") from None
    if (path / SINGLE_FILE).exists():
        f = path / SINGLE_FILE
        return {k: f for k in _open(f).keys()}
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return {k: found[0] for k in _open(found[0]).keys()}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _open(file: Path):
    if not file.exists():
        raise CheckpointError(f"{file}: file listed by the checkpoint is missing")
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                              "it may be truncated or corrupt") from None


def load_config(path: str | Path) -> PLMConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    return PLMConfig.load(path / "config.json")


FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}  # safetensors dtype names a PLM weight may have


def expected_tensors(config: PLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a PLM checkpoint of this config holds, with its shape (the tied lm_head is
    stored once, as the embedding). Written from the config alone: building even a meta-device
    model would import torch's compiler stack, seconds before the first token;
    tests/test_checkpoint.py holds this equal to the model's own state dict."""
    c = config
    d, H, rank, rope = c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, d)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (H * c.qk_head_dim, d),
            p + "self_attn.kv_a_proj_with_mqa.weight": (rank + rope, d),
            p + "self_attn.kv_a_layernorm.weight": (rank,),
            p + "self_attn.kv_b_proj.weight": (H * (c.qk_nope_head_dim + c.v_head_dim), rank),
            p + "self_attn.o_proj.weight": (d, H * c.v_head_dim),
            p + "mlp.up_proj.weight": (c.intermediate_size, d),
            p + "mlp.down_proj.weight": (d, c.intermediate_size),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        })
    out["model.norm.weight"] = (d,)
    return out


def validate_checkpoint(path: str | Path, config: PLMConfig,
                        headers: dict[str, tuple[Path, tuple[int, ...], str]]) -> dict[str, tuple[int, ...]]:
    """The one strict check of a checkpoint's tensors against its config, before any is read:
    every expected tensor present, with its shape and a float dtype; nothing unexpected.
    `headers`: name -> (file, shape, safetensors dtype). Each failure names the file and tensor."""
    path = Path(path)
    expected = expected_tensors(config)
    missing = [k for k in expected if k not in headers]
    if missing:
        where = sorted({f.name for f, _, _ in headers.values()}) or ["(no tensors)"]
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from {', '.join(where)}, "
                              f"e.g. {missing[0]!r}")
    unexpected = [k for k in headers if k not in expected and not _IGNORABLE.search(k)]
    if unexpected:
        raise CheckpointError(f"{headers[unexpected[0]][0]}: unexpected tensor {unexpected[0]!r} "
                              f"({len(unexpected)} in all); is this a PLM checkpoint with this config?")
    for k, shape in expected.items():
        file, got, dtype = headers[k]
        if tuple(got) != shape:
            raise CheckpointError(f"{file}: tensor {k!r} has shape {tuple(got)}, config.json implies {shape}")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {k!r} has dtype {dtype}, expected a float")
    return expected


def read_headers(path: str | Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, dtype) of every tensor of a checkpoint folder, from the safetensors
    headers alone (no tensor data is read)."""
    out = {}
    wmap = weight_map(path)
    for file in sorted(set(wmap.values())):
        for name, (shape, dtype, _, _) in safetensors_header(file).items():
            if wmap.get(name) == file:
                out[name] = (file, shape, dtype)
    for name, file in wmap.items():
        if name not in out:
            raise CheckpointError(f"{file}: the index lists tensor {name!r} but the file does not hold it")
    return out


def safetensors_header(file: str | Path) -> dict[str, tuple[tuple[int, ...], str, int, int]]:
    """name -> (shape, dtype, start, end) of a safetensors file (byte offsets from the file start),
    checked against the file's size."""
    file = Path(file)
    if not file.exists():
        raise CheckpointError(f"{file}: file listed by the checkpoint is missing")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries = {}
        for name, e in header.items():
            s, t = e["data_offsets"]
            entries[name] = (tuple(e["shape"]), e["dtype"], 8 + n + s, 8 + n + t)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    if entries and max(v[3] for v in entries.values()) > size:
        raise CheckpointError(f"{file}: file is shorter than its header says (truncated?)")
    return entries


def load_model(path: str | Path, dtype: torch.dtype | str | None = torch.float32,
               device: str | torch.device = "cpu") -> PLMForCausalLM:
    """Load a PLM checkpoint directory (ours or the released one) strictly."""
    path = Path(path)
    config = load_config(path)
    dtype = parse_dtype(dtype)
    headers = read_headers(path)
    expected = validate_checkpoint(path, config, headers)
    with torch.device("meta"):
        model = PLMForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(headers[k][0], []).append(k)
    for file, keys in by_file.items():
        f = _open(file)
        for k in keys:
            try:
                t = f.get_tensor(k)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: cannot read tensor {k!r} ({e})") from None
            state[k] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight  # re-tie after assign
    return model.eval()


def init_checkpoint(preset: str, out: str | Path, seed: int = 0, tokenizer: str = "qwen2",
                    dtype: str = "float32", **overrides) -> Path:
    """A random-weight PLM of a preset shape, with its tokenizer, saved in the released layout."""
    from plm.data.tokenizer import Tokenizer, build_qwen2

    tok = build_qwen2() if tokenizer == "qwen2" else Tokenizer.from_dir(tokenizer)
    cfg = PLMConfig.from_preset(preset, vocab_size=padded_vocab(tok.vocab_size),
                                bos_token_id=tok.endoftext_id, eos_token_id=tok.eos_token_id,
                                **overrides)
    torch.manual_seed(seed)
    model = PLMForCausalLM(cfg)
    out = Path(out)
    model.save_pretrained(out, dtype=parse_dtype(dtype))
    tok.save(out)
    return out
