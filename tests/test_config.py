import json

import pytest
import torch

from plm import PLMConfig, PLMForCausalLM
from plm.errors import ConfigError
from plm.model.config import PRESETS


def test_plm_1_8b_preset_is_the_released_shape():
    c = PLMConfig.from_preset("plm-1.8b")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (151936, 2048, 32, 16)
    assert (c.intermediate_size, c.kv_lora_rank, c.q_lora_rank) == (8192, 512, None)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-6 and c.hidden_act == "relu2"
    assert c.max_position_embeddings == 4096 and c.tie_word_embeddings
    assert c.softmax_scale == pytest.approx(1 / 192 ** 0.5)
    assert c.latent_cache_dim == 576 and c.full_cache_dim == 5120
    with torch.device("meta"):
        n = PLMForCausalLM(c).num_parameters()
    # REFERENCE §1: about 1.825B parameters, 3.65 GB in bf16
    assert n == 1_825_458_176
    assert abs(n * 2 / 1e9 - 3.65) < 0.01


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_info_counts_every_preset_exactly(name):
    """`plm info`'s formula against the parameters of the model itself (built on the meta device),
    for every preset; the small ones fit a laptop CPU."""
    import torch

    from plm import PLMForCausalLM
    from plm.model.config import model_info
    cfg = PLMConfig.from_preset(name, vocab_size=8192, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        real = PLMForCausalLM(cfg).num_parameters()
    info = model_info(cfg, inactive=0.5)
    assert info["total_parameters"] == real
    mlp = cfg.num_hidden_layers * 2 * cfg.hidden_size * cfg.intermediate_size
    assert info["activated_parameters_per_token"] == int(real - 0.5 * mlp)
    if name in ("plm-micro", "plm-tiny"):
        assert real < 20_000_000


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", 0, "hidden_size must be a positive integer"),
    ("num_attention_heads", -2, "num_attention_heads"),
    ("qk_rope_head_dim", 7, "must be even"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("q_lora_rank", 256, "full rank"),
    ("rms_norm_eps", 0.0, "rms_norm_eps"),
    ("tie_word_embeddings", False, "tie"),
    ("eos_token_id", 999999, "outside the vocabulary"),
    ("kv_lora_rank", 1.5, "kv_lora_rank must be a positive integer"),
])
def test_invalid_values_fail_clearly(field, value, match):
    with pytest.raises(ConfigError, match=match):
        PLMConfig(**{field: value})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'plm-7b'"):
        PLMConfig.from_preset("plm-7b")


def test_config_json_roundtrip_keeps_unknown_keys(tmp_path):
    released = {
        "architectures": ["PLMForCausalLM"], "auto_map": {"AutoConfig": "configuration_plm.PLMConfig"},
        "model_type": "plm", "hidden_size": 2048, "num_hidden_layers": 32, "rope_scaling": None,
        "use_cache": True, "vocab_size": 151936, "q_lora_rank": None, "kv_lora_rank": 512,
        "transformers_version": "4.45.0",
    }
    (tmp_path / "config.json").write_text(json.dumps(released))
    c = PLMConfig.load(tmp_path)
    assert c.extra["auto_map"] == released["auto_map"] and c.rope_scaling is None  # a field we model now
    c.save(tmp_path / "out.json")
    back = json.loads((tmp_path / "out.json").read_text())
    for k, v in released.items():
        assert back[k] == v


def test_wrong_model_type_and_bad_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        PLMConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: invalid JSON"):
        PLMConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "plm", "hidden_size": "big"}))
    with pytest.raises(ConfigError, match="config.json: .*hidden_size"):
        PLMConfig.load(tmp_path)
