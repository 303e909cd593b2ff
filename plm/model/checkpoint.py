"""Checkpoints in the released Hugging Face layout: config.json + safetensors (+ index when sharded).

Loading is strict: every expected tensor must be present with the right shape, nothing is
silently re-initialised, and every failure names the file and the tensor.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from plm.errors import CheckpointError, ConfigError
from plm.model.config import PLMConfig
from plm.model.modeling import PLMForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors some exporters add that carry no information for PLM
_IGNORABLE = re.compile(r"(^lm_head\.weight$)|(rotary_emb\.inv_freq$)")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}")
    return _DTYPES[name]


def parse_size(size: int | str) -> int:
    """'4GB' / '500MB' / 1234 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.I)
    if not m:
        raise ConfigError(f"cannot parse size {size!r} (e.g. '4GB', '500MB')")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    limit = parse_size(max_shard_size)
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
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    # remove files of an earlier save with another shard count
    for old in list(path.glob("model-*-of-*.safetensors")) + [path / SINGLE_FILE, path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        tmp = path / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        _atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    _atomic_write_text(path / "config.json", json.dumps(cfg, indent=2) + "\n")


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


def load_model(path: str | Path, dtype: torch.dtype | str | None = torch.float32,
               device: str | torch.device = "cpu") -> PLMForCausalLM:
    """Load a PLM checkpoint directory (ours or the released one) strictly."""
    path = Path(path)
    config = load_config(path)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = PLMForCausalLM(config)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    wmap = weight_map(path)
    missing = [k for k in expected if k not in wmap]
    if missing:
        where = sorted({str(f.name) for f in wmap.values()}) or ["(no tensors)"]
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from {', '.join(where)}, "
                              f"e.g. {missing[0]!r}")
    unexpected = [k for k in wmap if k not in expected and not _IGNORABLE.search(k)]
    if unexpected:
        raise CheckpointError(f"{wmap[unexpected[0]]}: unexpected tensor {unexpected[0]!r} "
                              f"({len(unexpected)} in all); is this a PLM checkpoint with this config?")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(wmap[k], []).append(k)
    for file, keys in by_file.items():
        f = _open(file)
        for k in keys:
            try:
                t = f.get_tensor(k)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: cannot read tensor {k!r} ({e})") from None
            if tuple(t.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{file}: tensor {k!r} has shape {tuple(t.shape)}, "
                                      f"config.json implies {tuple(expected[k].shape)}")
            if not t.is_floating_point():
                raise CheckpointError(f"{file}: tensor {k!r} has dtype {t.dtype}, expected a float")
            state[k] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight  # re-tie after assign
    return model.eval()

