"""transformers loads what we save: plm/model/hf/{configuration,modeling}_plm.py, copied beside every
checkpoint with an auto_map, compute what the reference model (plm.model.modeling) computes.

Needs the `hf` extra (`pip install -e '.[hf]'`); skipped without it."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")

from plm import PLMConfig, PLMForCausalLM  # noqa: E402
from plm.model.checkpoint import HF_CODE, HF_FILES, load_model  # noqa: E402

# small random PLMs: plm-micro; with linear RoPE scaling; with 8 heads over one latent and one shared
# rope key (a GQA-minded port would group them) and value heads narrower than query/key heads
SHAPES = {
    "micro": {},
    "rope-linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "many-heads": {"num_attention_heads": 8, "qk_nope_head_dim": 12, "qk_rope_head_dim": 6,
                   "v_head_dim": 10, "kv_lora_rank": 24},
}
VOCAB = 384


def rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to `rel` of the reference's largest magnitude (fp32 kernels differ in rounding)."""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def make_pair(tmp_path: Path, shape: str = "micro", dtype: torch.dtype | None = None):
    """Our random model (fp32, eval) saved with save_pretrained, and transformers' load of that folder."""
    cfg = PLMConfig.from_preset("plm-micro", vocab_size=VOCAB, bos_token_id=0, eos_token_id=2,
                                initializer_range=0.1, **SHAPES[shape])
    torch.manual_seed(0)
    ours = PLMForCausalLM(cfg).eval()
    ours.save_pretrained(tmp_path, dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    return ours, hf.eval()


def left_padded(n: int = 3, T: int = 14, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch whose row i has i*3 padding tokens on the left (ids of the padding are junk on purpose)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        mask[i, :3 * i] = 0
    return ids, mask


def test_checkpoint_carries_the_code_and_auto_map(tmp_path):
    ours, hf = make_pair(tmp_path)
    for name in HF_FILES:
        assert (tmp_path / name).read_text() == (HF_CODE / name).read_text()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_plm.PLMConfig",
                               "AutoModelForCausalLM": "modeling_plm.PLMForCausalLM"}
    assert PLMConfig.load(tmp_path).extra["auto_map"] == cfg["auto_map"]  # and plm still reads it
    assert type(hf).__name__ == "PLMForCausalLM" and hf.config.model_type == "plm"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rms_norm_eps",
                "rope_theta", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(hf.config, key) == cfg[key], key
    # tied: one tensor, as in ours
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert hf.num_parameters() == ours.num_parameters()


def test_the_package_ships_the_files():
    """save_state_dict reads them from the installed package, so the wheel must carry them."""
    tomllib = pytest.importorskip("tomllib")
    from fnmatch import fnmatch
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    for name in HF_FILES:
        rel = (HF_CODE / name).relative_to(HF_CODE.parents[2]).as_posix()  # plm/model/hf/NAME
        assert any(fnmatch(rel, f"{pkg.replace('.', '/')}/{pat}") for pkg, pats in data.items() for pat in pats), rel


def test_released_style_auto_map_is_replaced_by_ours(tmp_path):
    """A checkpoint that came with another auto_map (e.g. the released one) is saved pointing at the
    files we write beside it; keys we do not write survive."""
    cfg = PLMConfig.from_preset("plm-micro", vocab_size=VOCAB, bos_token_id=0, eos_token_id=2)
    cfg.extra["auto_map"] = {"AutoConfig": "theirs.Config", "AutoModel": "modeling_plm.PLMModel"}
    PLMForCausalLM(cfg).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_plm.PLMConfig" and auto_map["AutoModel"] == "modeling_plm.PLMModel"
    model = transformers.AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(model).__name__ == "PLMModel"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_equal_ours(tmp_path, shape):
    ours, hf = make_pair(tmp_path, shape)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids).logits
        rel_close(hf(ids).logits, want)
        # position_ids given explicitly (offset, as for a continued sequence)
        pos = torch.arange(5, 25).expand(2, 20)
        rel_close(hf(ids, position_ids=pos).logits, ours(ids, position_ids=pos).logits)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_left_padding_equals_ours_and_the_unpadded_rows(tmp_path, shape):
    ours, hf = make_pair(tmp_path, shape)
    ids, mask = left_padded()
    with torch.no_grad():
        got = hf(ids, attention_mask=mask).logits
        want = ours(ids, attention_mask=mask).logits
        real = mask.bool()
        rel_close(got[real], want[real])
        assert torch.isfinite(got).all()  # padding queries see themselves: no NaN reaches real tokens
        for i in range(ids.shape[0]):  # padding changes nothing for the real tokens
            alone = hf(ids[i:i + 1, real[i]]).logits[0]
            rel_close(got[i, real[i]], alone)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_incremental_decode_with_past_key_values_equals_full_forward(tmp_path, shape):
    ours, hf = make_pair(tmp_path, shape)
    ids, mask = left_padded(T=16)
    P = 9
    with torch.no_grad():
        full = hf(ids, attention_mask=mask).logits
        out = hf(ids[:, :P], attention_mask=mask[:, :P], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, transformers.DynamicCache)
        steps = [out.logits]
        for t in range(P, ids.shape[1]):
            out = hf(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        assert cache.get_seq_length() == ids.shape[1]
        real = mask.bool()
        rel_close(torch.cat(steps, dim=1)[real], full[real])
        rel_close(full[real], ours(ids, attention_mask=mask).logits[real])


def test_loss_with_labels_equals_ours_shifted_as_transformers_does(tmp_path):
    ours, hf = make_pair(tmp_path)
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5:8] = -100
    with torch.no_grad():
        got = hf(ids, attention_mask=mask, labels=labels)
        want = ours(ids, attention_mask=mask, labels=labels).loss
    # position t predicts labels[t + 1]; the mean over the tokens that count
    shifted = F.cross_entropy(got.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    rel_close(got.loss, shifted)
    rel_close(got.loss, want)


def test_backward_with_gradient_checkpointing_equals_ours(tmp_path):
    """What training through transformers (Trainer, TRL, PEFT) relies on: the same gradients."""
    ours, hf = make_pair(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    hf.train()
    # transformers 5 renamed it (the old name warns); Trainer and TRL call whichever exists
    getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)()
    assert all(layer.gradient_checkpointing for layer in hf.model.layers)
    logits = ours(ids).logits  # the shifted loss, written out: this test is about gradients
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    hf(ids, labels=ids).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        rel_close(theirs[name].grad, p.grad, rel=1e-4)


@pytest.mark.parametrize("kwarg", ["dtype", "torch_dtype"])
def test_bf16_checkpoint_loads_as_bf16_with_auto(tmp_path, kwarg):
    ours, _ = make_pair(tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5 calls torch_dtype deprecated
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, **{kwarg: "auto"})
    assert hf.dtype == torch.bfloat16 and hf.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = hf(ids).logits
        want = load_model(tmp_path, dtype=torch.bfloat16)(ids).logits
    assert got.dtype == torch.bfloat16
    rel_close(got.float(), want.float(), rel=2e-2)


def test_a_checkpoint_transformers_saves_loads_back_in_plm(tmp_path):
    ours, hf = make_pair(tmp_path / "a", "rope-linear")
    hf.save_pretrained(tmp_path / "b")
    back = load_model(tmp_path / "b")
    assert back.config.rope_factor == 4.0 and back.config.num_attention_heads == ours.config.num_attention_heads
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        rel_close(back(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "not supported"),
    ({"num_key_value_heads": 1}, "no grouped KV heads"),
    ({"rope_interleave": False}, "interleaved"),
    ({"hidden_act": "silu"}, "squared ReLU"),
])
def test_transformers_refuses_what_it_would_compute_differently(tmp_path, change, message):
    make_pair(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        transformers.AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)


@pytest.mark.slow
def test_generate_greedy_gives_our_tokens_and_text(qwen2_micro_dir):
    """transformers' generate + AutoTokenizer on a plm-micro with the real Qwen2 tokenizer give the
    token ids and text of plm.infer.generate.generate, batched with left padding."""
    from plm.data.tokenizer import Tokenizer
    from plm.infer.generate import GenerationConfig, generate

    prompts = ["The Peripheral Language Model runs on", "def fibonacci(n):\n    "]
    tok = Tokenizer.from_dir(qwen2_micro_dir)
    ours = load_model(qwen2_micro_dir, dtype=torch.float32)
    res = generate(ours, tok, prompts, GenerationConfig(max_new_tokens=24))
    assert all(len(set(t)) > 4 for t in res.tokens), res.tokens  # not a degenerate repetition

    # trust_remote_code: AutoTokenizer reads config.json too, and its auto_map would make it ask
    hf_tok = transformers.AutoTokenizer.from_pretrained(qwen2_micro_dir, trust_remote_code=True)
    hf_tok.padding_side = "left"
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen2_micro_dir, trust_remote_code=True,
                                                           dtype=torch.float32).eval()
    enc = hf_tok(prompts, return_tensors="pt", padding=True)
    assert [ids[m.bool()].tolist() for ids, m in zip(enc.input_ids, enc.attention_mask)] == \
        [tok.encode(p) for p in prompts]
    # the same stop ids as ours, and never the embedding rows past the tokenizer (padding to 64)
    out = hf.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=tok.stop_token_ids,
                      pad_token_id=tok.pad_token_id,
                      suppress_tokens=list(range(tok.vocab_size, hf.config.vocab_size)))
    new = out[:, enc.input_ids.shape[1]:].tolist()
    for row, want in zip(new, res.tokens):
        cut = next((i for i, t in enumerate(row) if t in tok.stop_token_ids), len(row))
        assert row[:cut] == want
    assert [hf_tok.decode(t) for t in res.tokens] == res.texts
