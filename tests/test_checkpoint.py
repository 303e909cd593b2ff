"""Checkpoints in the released Hugging Face layout, and clear failures on bad ones."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plm import PLMForCausalLM
from plm.errors import CheckpointError, ConfigError

RELEASED_NAMES = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                  "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
                  "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight"]


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def test_roundtrip_single_file(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expect = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}" for i in range(small_model.config.num_hidden_layers) for n in RELEASED_NAMES}
    assert keys == expect  # tied lm_head stored once, names exactly the released ones
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "plm" and cfg["architectures"] == ["PLMForCausalLM"]
    back = PLMForCausalLM.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = torch.randint(0, 512, (1, 8))
    assert torch.equal(_logits(back, ids), _logits(small_model, ids))


def test_sharded_with_index(small_model, tmp_path):
    small_model.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in small_model.parameters())
    ids = torch.randint(0, 512, (1, 8))
    assert torch.equal(_logits(PLMForCausalLM.from_pretrained(tmp_path), ids), _logits(small_model, ids))


def test_released_style_directory_loads(small_model, tmp_path):
    """A directory written the way the released PLM-1.8B is (bf16 tensors, HF config keys,
    an auto_map, an explicit lm_head copy) loads unchanged."""
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in small_model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = small_model.config.to_dict()
    cfg.update({"torch_dtype": "bfloat16", "auto_map": {"AutoModelForCausalLM": "modeling_plm.PLMForCausalLM"},
                "transformers_version": "4.46.0", "use_cache": True, "rope_scaling": None})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = PLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, sd["model.layers.1.mlp.up_proj.weight"])


def test_missing_tensor_named(small_model, tmp_path):
    sd = {k: v for k, v in small_model.state_dict().items()
          if k not in ("lm_head.weight", "model.layers.1.self_attn.kv_b_proj.weight")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    small_model.config.save(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing from model.safetensors.*model.layers.1.self_attn.kv_b_proj.weight"):
        PLMForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_named(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape \(256, 64\)"):
        PLMForCausalLM.from_pretrained(tmp_path)


def test_truncated_file_named(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        PLMForCausalLM.from_pretrained(tmp_path)


def test_wrong_model_type(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "deepseek_v2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: model_type is 'deepseek_v2'"):
        PLMForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_and_missing_dir(small_model, tmp_path):
    sd = {k: v for k, v in small_model.state_dict().items() if k != "lm_head.weight"}
    sd["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    small_model.config.save(tmp_path)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.gate_proj.weight'"):
        PLMForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        PLMForCausalLM.from_pretrained(tmp_path / "nope")


def test_resave_with_fewer_shards_removes_stale_files(small_model, tmp_path):
    small_model.save_pretrained(tmp_path, max_shard_size="60KB")
    small_model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    assert not (tmp_path / "model.safetensors.index.json").exists()
    PLMForCausalLM.from_pretrained(tmp_path)


def test_expected_tensors_are_the_models_own():
    """The validator's names and shapes, written from the config, equal the model's state dict."""
    import torch

    from plm import PLMConfig, PLMForCausalLM
    from plm.model.checkpoint import expected_tensors
    for preset in ("plm-micro", "plm-tiny", "plm-1.8b"):
        cfg = PLMConfig.from_preset(preset)
        with torch.device("meta"):
            sd = PLMForCausalLM(cfg).state_dict()
        assert expected_tensors(cfg) == {k: tuple(v.shape) for k, v in sd.items() if k != "lm_head.weight"}
