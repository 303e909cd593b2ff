"""Shared fixtures: the real Qwen2 tokenizer and small random PLMs saved in the released layout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PLM_SHARED_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("PLM_DATA", str(SHARED_DATA))  # the benchmark data the tests read (GSM8K, HumanEval)
# derived-result caches (held-out evaluations) of a test session stay in the session
os.environ.setdefault("PLM_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"plm-test-cache-{os.getpid()}"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared benchmark data not found at {SHARED_DATA} (set PLM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    from plm.data.tokenizer import build_qwen2
    return build_qwen2()


@pytest.fixture(scope="session")
def qwen2_micro_dir(tmp_path_factory, qwen2_tokenizer) -> Path:
    """plm-micro shape with the full Qwen2 vocabulary; a larger init spread gives the random
    model non-trivial attention and logits, so parity checks are meaningful."""
    from plm.model.checkpoint import init_checkpoint
    out = tmp_path_factory.mktemp("qwen2-micro")
    qwen2_tokenizer.save(out / "tok")
    return init_checkpoint("plm-micro", out / "ckpt", seed=1234, tokenizer=str(out / "tok"),
                           initializer_range=0.08, num_hidden_layers=3)


@pytest.fixture()
def small_config():
    from plm import PLMConfig
    return PLMConfig.from_preset("plm-micro", vocab_size=512, bos_token_id=0, eos_token_id=2,
                                 initializer_range=0.1)


@pytest.fixture()
def small_model(small_config):
    from plm import PLMForCausalLM
    torch.manual_seed(0)
    return PLMForCausalLM(small_config).eval()
