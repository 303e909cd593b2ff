"""`plm generate` / `plm chat` / `Engine` on the native decoder and on the PyTorch kernels: the
same greedy text in float32, GGUF files run directly, `plm quantize` writes what loads without
quantising again, and a machine without the built kernels falls back with one line."""
import os
import subprocess
import sys

import pytest

from plm.infer import native as nv
from plm.infer.engine import Engine
from plm.infer.generate import GenerationConfig, generate
from plm.infer.runtime import EdgeOptions

native = pytest.mark.skipif(not nv.load(), reason="the native kernels are not built here (plm kernels build)")


def plm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "plm", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def greedy(engine: Engine, prompt: str, n: int = 12) -> list[int]:
    return generate(None, engine.tokenizer, prompt, GenerationConfig(max_new_tokens=n, stop_token_ids=[]),
                    step=engine.new_step()).tokens[0]


@native
def test_auto_picks_native_and_float32_equals_the_pytorch_kernels(qwen2_micro_dir):
    nat = Engine(qwen2_micro_dir, edge=EdgeOptions(dtype="float32"))
    torch_path = Engine(qwen2_micro_dir, edge=EdgeOptions(dtype="float32", backend="torch"))
    assert (nat.backend, torch_path.backend) == ("native", "torch")
    for p in ("Hello there", "The Peripheral Language Model runs on"):
        assert greedy(nat, p) == greedy(torch_path, p)
    # what only the PyTorch path does sends auto there
    assert Engine(qwen2_micro_dir, edge=EdgeOptions(kv="full")).backend == "torch"


@pytest.mark.slow  # llama.cpp parity / subprocess: make test runs it, make test-fast skips it
@native
def test_quantize_writes_a_gguf_that_runs_as_the_runtime_would_quantise(qwen2_micro_dir, tmp_path):
    out = tmp_path / "m-int8.gguf"
    r = plm("quantize", qwen2_micro_dir, "--type", "int8", "--out", out)
    assert r.returncode == 0, r.stderr
    import gguf
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    from_file = Engine(out)
    at_load = Engine(qwen2_micro_dir, edge=EdgeOptions(quant="int8"))
    assert from_file.backend == at_load.backend == "native"
    assert from_file.tokenizer.encode("Hello, world") == at_load.tokenizer.encode("Hello, world")
    ids = at_load.tokenizer.encode("Hello there")
    a = from_file.native.prefill(from_file.native.new_sequence(), ids)
    b = at_load.native.prefill(at_load.native.new_sequence(), ids)
    # the same Q8_0 blocks, except kv_b's key half: a file's is dequantised (it is read across its
    # blocks by the absorbed query), a float checkpoint's requantised along the other axis
    assert (a - b).abs().max() < 0.02 * a.abs().max() and a.argmax() == b.argmax()
    r = plm("generate", out, "--prompt", "Hello there", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


@pytest.mark.slow  # llama.cpp parity / subprocess: make test runs it, make test-fast skips it
def test_without_the_kernels_the_pytorch_path_serves(qwen2_micro_dir, tmp_path):
    env = {"PLM_NATIVE": "0"}
    r = plm("generate", qwen2_micro_dir, "--prompt", "Hello", "--max-new-tokens", "4", "--dtype", "float32", env=env)
    assert r.returncode == 0, r.stderr
    assert len([x for x in r.stderr.splitlines() if "native kernels unavailable" in x]) == 1
    ref = plm("generate", qwen2_micro_dir, "--prompt", "Hello", "--max-new-tokens", "4", "--runtime", "reference")
    assert r.stdout == ref.stdout  # float32 edge runtime = the reference model
    r = plm("generate", qwen2_micro_dir, "--prompt", "Hello", "--quant", "q8_0", env=env)
    assert r.returncode == 2 and "native kernels are not available" in r.stderr and "Traceback" not in r.stderr
    r = plm("kernels", "info", env=env)
    assert r.returncode == 0 and "PLM_NATIVE=0" in r.stdout
