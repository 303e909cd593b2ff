"""`plm init` and `plm info`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


from plm.errors import PLMError
from plm.model.config import DEFAULT_INACTIVE, PRESETS, PLMConfig, model_info

def _human(n: float, unit: str = "") -> str:
    for s in ["", "K", "M", "G", "T"]:
        if abs(n) < 1000:
            return f"{n:.2f}{s}{unit}" if s else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.2f}P{unit}"


def _cmd_init(args: argparse.Namespace) -> int:
    from plm.model.checkpoint import init_checkpoint
    from plm.model.config import config_fields
    from plm.recipe import parse_value
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PLMError(f"--set {item!r}: expected KEY=VALUE, e.g. num_hidden_layers=4")
        if key not in config_fields() and key not in ("rope_interleave", "rope_parameters"):
            raise PLMError(f"--set {key}: {key}: not a PLM config field (known: {', '.join(sorted(config_fields()))})")
        overrides[key] = parse_value(value)
    out = init_checkpoint(args.preset, args.out, args.seed, args.tokenizer, args.dtype, **overrides)
    print(f"wrote random {args.preset} PLM to {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from plm.model.checkpoint import load_config
    if not 0 <= args.inactive <= 1:
        raise PLMError(f"--inactive is a fraction of MLP neurons in [0, 1], got {args.inactive}")
    from plm.model.hub import resolve_model
    cfg = load_config(resolve_model(args.dir)) if Path(args.dir).exists() or "/" in args.dir else None
    if cfg is None:
        if args.dir not in PRESETS:
            raise PLMError(f"{args.dir}: not a checkpoint directory or preset")
        cfg = PLMConfig.from_preset(args.dir)
    wb = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.torch_dtype, 2)
    info = model_info(cfg, args.inactive, wb)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    L = cfg.num_hidden_layers
    print(f"PLM  {args.dir}")
    print(f"  shape            {L} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"MLP {cfg.intermediate_size} (relu²), vocab {cfg.vocab_size}")
    print(f"  MLA              q full-rank, kv latent {cfg.kv_lora_rank}, qk {cfg.qk_nope_head_dim}+"
          f"{cfg.qk_rope_head_dim} (rope), v {cfg.v_head_dim}, scale 1/sqrt({cfg.qk_head_dim})")
    print(f"  parameters       {_human(info['total_parameters'])} total, "
          f"{_human(info['non_embedding_parameters'])} non-embedding")
    print(f"  activated/token  {_human(info['activated_parameters_per_token'])} "
          f"(estimate at {args.inactive:.1%} inactive MLP neurons)")
    kv = info["kv_bytes_per_token_bf16"]
    print(f"  KV cache/token   latent {_human(kv['latent'], 'B')} ({cfg.latent_cache_dim} values x {L} layers), "
          f"decompressed {_human(kv['decompressed'], 'B')} ({cfg.full_cache_dim} x {L}), "
          f"{info['kv_cache_reduction']}x smaller (bf16)")
    wm = info["weight_memory_bytes"]
    print(f"  weight memory    {_human(wm['checkpoint_dtype'], 'B')} as stored ({cfg.torch_dtype}), "
          f"bf16 {_human(wm['bf16'], 'B')}, Q8_0 ~{_human(wm['q8_0'], 'B')}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a random-weight PLM checkpoint of a preset shape")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the model shape")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--tokenizer", default="qwen2", help="'qwen2' (full PLM vocabulary) or a tokenizer directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="stored dtype")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config.json field, e.g. num_hidden_layers=4 (repeatable)")
    p.set_defaults(func=_cmd_init)
    p = sub.add_parser("info", help="parameters, activated parameters, KV-cache and weight memory")
    p.add_argument("dir", help="checkpoint folder, hub id or preset name")
    p.add_argument("--inactive", type=float, default=DEFAULT_INACTIVE,
                   help="fraction of MLP neurons inactive per token (default: PLM-1.8B's published 0.909)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=_cmd_info)
