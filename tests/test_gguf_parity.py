"""Parity with llama.cpp's independent `plm` implementation (through llama-cpp-python) on a
random PLM with the full Qwen2 vocabulary, exported by `plm export gguf`."""
import numpy as np
import pytest
import torch

from plm import PLMForCausalLM
from plm.data.tokenizer import Tokenizer
from plm.export.gguf import export_gguf, load_gguf_state

pytestmark = pytest.mark.slow  # subprocesses and training runs: `make test`, not `make test-fast`

llama_cpp = pytest.importorskip("llama_cpp", reason="make test installs the llama extra") if False else __import__("llama_cpp")


def _llama(path, n_ctx=256):
    # f32 K/V cache so the comparison measures the model, not cache rounding
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, n_batch=128,
                           verbose=False, type_k=0, type_v=0)


@pytest.fixture(scope="module")
def f32_gguf(qwen2_micro_dir, tmp_path_factory):
    return export_gguf(qwen2_micro_dir, tmp_path_factory.mktemp("gguf") / "micro-f32.gguf", "f32")


@pytest.fixture(scope="module")
def prompt_ids(qwen2_micro_dir):
    tok = Tokenizer.from_dir(qwen2_micro_dir)
    text = ("PLM, the Peripheral Language Model, uses multi-head latent attention and squared ReLU. "
            "边缘设备上的语言模型 🚀 def f(x): return x**2 " * 4)
    ids = tok.encode(text)[:64]
    assert len(ids) == 64
    return ids


def test_logits_match_llama_cpp(qwen2_micro_dir, f32_gguf, prompt_ids):
    llm = _llama(f32_gguf)
    llm.eval(prompt_ids)
    theirs = np.asarray(llm.scores[:64])
    model = PLMForCausalLM.from_pretrained(qwen2_micro_dir)
    with torch.no_grad():
        ours = model(torch.tensor([prompt_ids])).logits[0].numpy()
    assert theirs.shape == ours.shape == (64, 151936)
    diff = np.abs(theirs - ours).max()
    assert diff < 1e-3 * np.abs(ours).max(), diff
    assert np.abs(ours).max() > 0.5  # the random model's logits are far from flat


def test_greedy_32_tokens_identical(qwen2_micro_dir, f32_gguf, prompt_ids):
    from plm.infer.generate import GenerationConfig, generate_tokens, model_step_fn
    model = PLMForCausalLM.from_pretrained(qwen2_micro_dir)
    ours = [t for _, t in generate_tokens(model_step_fn(model), [prompt_ids], GenerationConfig(max_new_tokens=32))]
    llm = _llama(f32_gguf)
    llm.eval(prompt_ids)
    theirs = []
    for _ in range(32):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(nxt)
        llm.eval([nxt])
    assert ours == theirs
    assert len(set(ours)) > 3  # not a degenerate repeat of one token


def test_tokenizer_matches_llama_cpp(f32_gguf, qwen2_micro_dir):
    tok = Tokenizer.from_dir(qwen2_micro_dir)
    llm = _llama(f32_gguf)
    for text in ["Hello world, this is a test.", "你好，世界！", "  spaces\n\n\tand tabs", "emoji 🎉 x=1+2"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    assert llm.tokenize(b"<|im_start|>user\nHello<|im_end|>\n", add_bos=False, special=True) == \
        [151644, 872, 198, 9707, 151645, 198]


def test_gguf_metadata_and_tensors(f32_gguf, qwen2_micro_dir):
    import gguf
    r = gguf.GGUFReader(str(f32_gguf))
    def val(key):
        f = r.fields[key]
        return f.parts[f.data[0]].tolist()[0] if f.types[0] != gguf.GGUFValueType.STRING else bytes(f.parts[f.data[0]]).decode()
    assert val("general.architecture") == "plm"
    assert val("plm.attention.kv_lora_rank") == 32
    assert val("plm.attention.key_length") == 24 and val("plm.attention.value_length") == 16
    assert val("plm.rope.dimension_count") == 8
    assert val("tokenizer.ggml.pre") == "qwen2"
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_kv_a_mqa.weight",
            "blk.0.attn_kv_a_norm.weight", "blk.0.attn_kv_b.weight", "blk.0.attn_output.weight",
            "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied to token_embd
    # the exported tensors are exactly the checkpoint's
    model = PLMForCausalLM.from_pretrained(qwen2_micro_dir)
    for k, v in load_gguf_state(f32_gguf).items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("qtype,tol", [("f16", 0.01), ("q8_0", 0.05), ("q4_k_m", 0.5)])
def test_quantised_exports_run_in_llama_cpp(qwen2_micro_dir, tmp_path, prompt_ids, qtype, tol):
    out = export_gguf(qwen2_micro_dir, tmp_path / f"m-{qtype}.gguf", qtype)
    llm = _llama(out)
    llm.eval(prompt_ids[:16])
    theirs = np.asarray(llm.scores[:16])
    model = PLMForCausalLM.from_pretrained(qwen2_micro_dir)
    with torch.no_grad():
        ours = model(torch.tensor([prompt_ids[:16]])).logits[0].numpy()
    rel = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert rel < tol, rel
    assert out.stat().st_size < (tmp_path / "m-f32.gguf").stat().st_size if (tmp_path / "m-f32.gguf").exists() else True


@pytest.mark.parametrize("qtype,ftype", [("q8_0", 7), ("q4_0", 2)])
def test_direct_quantisation_matches_llama_cpp_bytes(qwen2_micro_dir, f32_gguf, tmp_path, qtype, ftype):
    """Our numpy q8_0/q4_0 blocks are exactly the blocks llama.cpp's own quantiser makes from the
    same f32 file, tensor by tensor (where both chose the same type)."""
    import gguf
    import llama_cpp

    from plm.export.gguf import quiet_llama_log
    ours = export_gguf(qwen2_micro_dir, tmp_path / f"ours-{qtype}.gguf", qtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    theirs = tmp_path / f"llama-{qtype}.gguf"
    with quiet_llama_log():
        assert llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(theirs).encode(), params) == 0
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert set(a) == set(b)
    same = [n for n in a if a[n].tensor_type == b[n].tensor_type]
    Q = gguf.GGMLQuantizationType
    assert sum(1 for n in same if a[n].tensor_type == getattr(Q, qtype.upper())) >= 5 * 3  # every layer's matrices
    for n in same:
        assert bytes(a[n].data.tobytes()) == bytes(b[n].data.tobytes()), n
