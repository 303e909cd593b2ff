"""The Python API behaves as transformers users expect: labels shifted inside the model,
`model.generate`, a callable tokenizer, checkpoints keep their dtype, hub ids from the cache."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from plm import PLMForCausalLM
from plm.data.tokenizer import Tokenizer
from plm.errors import PLMError


def test_labels_are_shifted_like_transformers(small_model):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        out = small_model(ids, labels=labels)
        logits = small_model(ids).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    unshifted = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert abs(out.loss.item() - unshifted.item()) > 1e-3  # the old (pre-shifted) reading differs


def test_generate_returns_prompt_and_continuation(qwen2_micro_dir):
    from plm.infer.generate import GenerationConfig, generate
    model, tok = PLMForCausalLM.from_pretrained(qwen2_micro_dir), Tokenizer.from_dir(qwen2_micro_dir)
    prompts = ["Hello there", "A longer prompt about language models"]
    enc = tok(prompts, return_tensors="pt")  # left-padded batch
    assert enc.attention_mask[0, 0] == 0 and enc.attention_mask[1].all()
    out = model.generate(**enc, max_new_tokens=6)
    assert out.shape[0] == 2 and torch.equal(out[:, :enc.input_ids.shape[1]], enc.input_ids)
    for i, p in enumerate(prompts):
        want = generate(model, tok, p, GenerationConfig(max_new_tokens=6, stop_token_ids=[])).tokens[0]
        got = out[i, enc.input_ids.shape[1]:].tolist()
        eos = model.config.eos_ids
        assert got[:len(want)] == want[:len(got)] and (len(want) == 6 or got[len(want)] in eos)
    sampled = [model.generate(**enc, max_new_tokens=5, do_sample=True, temperature=1.0, seed=3) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])  # seeded
    # min_p 1.0 keeps only the best token: sampling at any temperature is greedy
    hot = model.generate(**enc, max_new_tokens=6, do_sample=True, temperature=2.0, min_p=1.0, seed=3)
    assert torch.equal(hot, out)


def test_tokenizer_is_callable(qwen2_micro_dir):
    tok = Tokenizer.from_dir(qwen2_micro_dir)
    one = tok("Hello world")
    assert one.input_ids == tok.encode("Hello world") and one.attention_mask == [1] * len(one.input_ids)
    right = tok(["a", "a b c d"], padding=True, padding_side="right")
    assert right["input_ids"][0][1:] == [tok.pad_token_id] * (len(right["input_ids"][1]) - 1)
    assert right["attention_mask"][0] == [1] + [0] * (len(right["input_ids"][1]) - 1)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                   return_tensors="pt")
    assert chat.shape[0] == 1 and chat[0, 0].item() == 151644  # <|im_start|>
    assert tok.batch_decode(tok(["x y", "z"], return_tensors="pt").input_ids[:, -1:]) == [" y", "z"]


def test_from_pretrained_keeps_the_stored_dtype(small_model, tmp_path):
    small_model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert PLMForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert PLMForCausalLM.from_pretrained(tmp_path / "bf16", torch_dtype=torch.float32).dtype == torch.float32
    assert PLMForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16


def _fake_hub_cache(root, repo: str, src) -> None:
    """A model laid out as huggingface_hub lays out its cache."""
    base = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(src, base / "snapshots" / commit)


@pytest.mark.slow  # llama.cpp parity / subprocess: make test runs it, make test-fast skips it
def test_hub_ids_resolve_from_the_cache_offline(qwen2_micro_dir, tmp_path):
    from plm.model.hub import is_hub_id, resolve_model
    _fake_hub_cache(tmp_path / "hub", "PLM-Team/tiny-test", qwen2_micro_dir)
    assert is_hub_id("PLM-Team/tiny-test") and not is_hub_id(str(qwen2_micro_dir)) and not is_hub_id("./a/b")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "plm", "generate", "PLM-Team/tiny-test", "--prompt", "Hello",
                        "--max-new-tokens", "4", "--runtime", "reference"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    direct = subprocess.run([sys.executable, "-m", "plm", "generate", str(qwen2_micro_dir), "--prompt", "Hello",
                             "--max-new-tokens", "4", "--runtime", "reference"], capture_output=True, text=True,
                            timeout=300)
    assert r.stdout == direct.stdout and r.stdout.strip()
    r = subprocess.run([sys.executable, "-m", "plm", "info", "PLM-Team/not-cached"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in r.stderr
    hub = tmp_path / "hub"
    assert (resolve_model("PLM-Team/tiny-test", cache_dir=hub, local_files_only=True) / "config.json").exists()
    with pytest.raises(PLMError, match="not in the local Hugging Face cache"):
        resolve_model("PLM-Team/missing", cache_dir=hub, local_files_only=True)
