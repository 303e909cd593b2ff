"""NativeDecoder (the C++ decode step) against the PyTorch reference model and llama.cpp.

References: `PLMForCausalLM` in float32 on the same weights (for quantised formats: the same
quantised weights, dequantised by the `gguf` package), and llama.cpp on the same GGUF file.
Tolerances: float32 weights and cache reproduce the reference to fp32 rounding (1e-4 of the
logit scale over prefill and decode); other formats add activation rounding (bf16, or int8
per block for block formats: about 0.4% per matrix product, compounding over the layers), so
they are held to a relative L2 logit error (bounds below) and to argmax agreement.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plm import PLMConfig, PLMForCausalLM
from plm.errors import CheckpointError, ConfigError, PLMError
from plm.infer import native as nv

pytestmark = pytest.mark.skipif(not nv.load(), reason="native kernels not built (plm kernels build)")

from plm.infer.native_decoder import NativeDecoder, native_step_fn, open_gguf, tokenizer_from_gguf  # noqa: E402


def odd_config() -> PLMConfig:
    """Dimensions that are not multiples of the tiles or of 64/256-wide blocks: odd vocab,
    3 heads, hidden 96, intermediate 160, o_proj input 48 (not a whole Q8_0 block)."""
    return PLMConfig.from_preset("plm-micro", vocab_size=509, hidden_size=96, num_attention_heads=3,
                                 intermediate_size=160, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=16, num_hidden_layers=2, bos_token_id=0, eos_token_id=2,
                                 initializer_range=0.1)


@pytest.fixture(params=["micro", "odd"])
def model(request, small_model):
    if request.param == "micro":
        return small_model
    torch.manual_seed(1)
    return PLMForCausalLM(odd_config()).eval()


def reference_logits(model: PLMForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def decoder_logits(dec: NativeDecoder, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """Logits after the prompt (prefill) and after each continuation token (decode steps)."""
    s = dec.new_sequence()
    out = [dec.prefill(s, prompt)]
    for t in cont:
        out.append(dec.step([s], [t])[0])
    dec.free(s)
    return torch.stack(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_f32_decoder_matches_reference(model):
    torch.manual_seed(0)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (24,)).tolist()
    dec = NativeDecoder.from_model(model, fmt="f32", cache_dtype="f32")
    greedy = dec.greedy(prompt, 40)
    ref = reference_logits(model, prompt + greedy)[23:]
    ours = decoder_logits(dec, prompt, greedy)
    scale = ref.abs().max()
    assert (ours - ref).abs().max() < 1e-4 * scale, (ours - ref).abs().max()
    assert scale > 0.5 and len(set(greedy)) > 3  # a non-trivial model and continuation
    # greedy continuation identical to the reference's own
    from plm.infer.generate import GenerationConfig, generate_tokens, model_step_fn

    theirs = [t for _, t in generate_tokens(model_step_fn(model), [prompt], GenerationConfig(max_new_tokens=40))]
    assert greedy == theirs


@pytest.mark.parametrize("latent", [{}, {"kv_lora_rank": 48, "qk_rope_head_dim": 16}], ids=("micro", "tiles"))
def test_attention_parts_at_long_context(latent):
    """Past 256 cached rows attention runs over parts of 256 rows merged by their log-sum-exp
    (spread over the threads in a one-sequence step, one thread's loop in a prefill or a
    batch): with fp32 weights and cache the decoder still reproduces the reference to fp32
    rounding, and with a bf16 cache a prefill, a batched step and the rows alone agree bit for
    bit. `tiles`: a latent row of 64 values with rank 48, which AMX hosts attend on tiles."""
    torch.manual_seed(0)
    model = PLMForCausalLM(PLMConfig.from_preset("plm-micro", vocab_size=512, bos_token_id=0, eos_token_id=2,
                                                 initializer_range=0.1, max_position_embeddings=1024,
                                                 **latent)).eval()
    V = model.config.vocab_size
    prompt, cont = torch.randint(0, V, (600,)).tolist(), torch.randint(0, V, (6,)).tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a one-sequence step then takes the by-part path
    try:
        dec = NativeDecoder.from_model(model, fmt="f32", cache_dtype="f32")
        ours = decoder_logits(dec, prompt, cont)
        ref = reference_logits(model, prompt + cont)[599:]
        assert (ours - ref).abs().max() < 1e-4 * ref.abs().max(), (ours - ref).abs().max()
        dec = NativeDecoder.from_model(model, fmt="bf16")
        a, b = dec.new_sequence(), dec.new_sequence()
        first = dec.prefill(a, prompt, chunk=128)
        dec.prefill(b, prompt[:300], chunk=128)
        batched = dec.step([a, b], [cont[0], cont[1]])
        alone = dec.new_sequence()
        for t in prompt[:-1]:
            dec.step([alone], [t])
        assert torch.equal(dec.step([alone], [prompt[-1]])[0], first)
        assert torch.equal(dec.step([alone], [cont[0]])[0], batched[0])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt,bound", [("bf16", 0.03), ("f16", 0.03), ("q8_0", 0.06), ("q4_0", 0.06), ("q4_k", 0.06),
                                       ("q6_k", 0.06), ("q4_k_m", 0.06)])
def test_formats_against_reference_on_the_same_weights(model, fmt, bound):
    """bf16/f16 against the reference with weights rounded the same way; block formats against
    the reference on the decoder's own (dequantised) weights: what is left is activation rounding."""
    torch.manual_seed(0)
    dec = NativeDecoder.from_model(model, fmt=fmt)
    ref_model = dequantised_reference(model, dec)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (16,)).tolist()
    cont = torch.randint(0, V, (16,)).tolist()
    ours = decoder_logits(dec, prompt, cont)
    ref = reference_logits(ref_model, prompt + cont)[15:]
    err = rel_err(ours, ref)
    assert err < bound, err
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


def test_q4_k_m_mix_puts_q6_k_where_llama_cpp_does(small_model):
    """The layers whose down projection (and V projection) llama.cpp's Q4_K_M stores in Q6_K: 2
    and 5 of 6 (read from the Q4_K_M file its quantiser wrote for the 6-layer model of `make
    demo`), 16 of PLM-1.8B's 32 (its use_more_bits by hand: 0-3, 28-31 and 6, 9, ..., 27)."""
    from plm.infer.native_decoder import q4_k_m_more_bits
    assert [i for i in range(6) if q4_k_m_more_bits(i, 6)] == [2, 5]
    assert [i for i in range(32) if q4_k_m_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    dec = NativeDecoder.from_model(small_model, fmt="q4_k_m")  # 2 layers: the second
    assert (dec.formats["0.down"], dec.formats["1.down"]) == ("Q4_K", "Q6_K")
    assert dec.formats["embed"] == "Q8_0" and dec.formats["0.up"] == "Q8_0"  # rows of 64: no K-quant blocks


def dequantised_reference(model: PLMForCausalLM, dec: NativeDecoder) -> PLMForCausalLM:
    """The reference model holding exactly the decoder's weights: each matrix quantised as
    from_state_dict does (format per matrix from dec.formats) and decoded by gguf-py."""
    c = model.config
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    H, nope, vd, R = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank

    def roundtrip(w: torch.Tensor, label: str) -> torch.Tensor:
        fmt = nv.FORMATS[dec.formats[label].split()[0].lower()]
        return nv.dequantize_blocks(nv.quantize(w, fmt), fmt, *w.shape)

    sd["model.embed_tokens.weight"] = roundtrip(sd["model.embed_tokens.weight"], "embed")
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q, kva = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.kv_a_proj_with_mqa.weight"]
        qa = roundtrip(torch.cat([q, kva]), f"{i}.qa")
        sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.kv_a_proj_with_mqa.weight"] = qa[:len(q)], qa[len(q):]
        kvb = sd[p + "self_attn.kv_b_proj.weight"].view(H, nope + vd, R)
        wuk = roundtrip(kvb[:, :nope].transpose(1, 2).reshape(H * R, nope), f"{i}.wuk")
        wuv = roundtrip(kvb[:, nope:].reshape(H * vd, R), f"{i}.wuv")
        kvb = torch.cat([wuk.view(H, R, nope).transpose(1, 2), wuv.view(H, vd, R)], dim=1)
        sd[p + "self_attn.kv_b_proj.weight"] = kvb.reshape(H * (nope + vd), R)
        for name, label in (("self_attn.o_proj", "o"), ("mlp.up_proj", "up"), ("mlp.down_proj", "down")):
            sd[p + name + ".weight"] = roundtrip(sd[p + name + ".weight"], f"{i}.{label}")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    ref = PLMForCausalLM(c).eval()
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_k"])
def test_batched_step_and_prefill_equal_one_at_a_time(small_model, fmt, monkeypatch):
    """Each row's arithmetic is independent of the batch: a batched step equals the rows run
    alone, and a prefill equals feeding the prompt one token at a time (bit for bit). Chunks of
    20 rows: on AMX hosts a chunk spans a whole 16-row tile and a partial one, the 5-token
    prompt one partial tile, and the decode steps tiles one row wide."""
    monkeypatch.setenv("PLM_AMX_MIN_BYTES", "0")  # the micro model's matrices on AMX tiles too
    dec = NativeDecoder.from_model(small_model, fmt=fmt)
    torch.manual_seed(0)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 45, 1)]
    seqs = [dec.new_sequence() for _ in prompts]
    first = [dec.prefill(s, p, chunk=20) for s, p in zip(seqs, prompts)]
    nxt = [int(f.argmax()) for f in first]
    batched = [dec.step(seqs, nxt)]
    for _ in range(5):
        nxt = batched[-1].argmax(-1).tolist()
        batched.append(dec.step(seqs, nxt))
    for b, p in enumerate(prompts):
        s = dec.new_sequence()
        logits = None
        for t in p:  # token by token instead of prefill
            logits = dec.step([s], [t])[0]
        assert torch.equal(logits, first[b])
        toks = [int(first[b].argmax())]
        for k in range(6):
            row = dec.step([s], [toks[-1]])[0]
            assert torch.equal(row, batched[k][b]), (fmt, b, k)
            toks.append(int(row.argmax()))
        dec.free(s)
    with pytest.raises(RuntimeError, match="appears twice"):
        dec.step([seqs[0], seqs[0]], [1, 2])


@pytest.mark.parametrize("fmt", ["f32", "bf16", "q8_0", "q4_k"])
def test_mixed_segments_equal_separate_calls(small_model, fmt):
    """run() puts decode rows of some sequences and prompt chunks of others in one forward (a
    server iteration): every segment's logits and every cache equal the same work done by
    separate prefill and step calls, bit for bit."""
    dec = NativeDecoder.from_model(small_model, fmt=fmt)
    torch.manual_seed(1)
    a, b, c = (torch.randint(0, 512, (n,)).tolist() for n in (9, 14, 6))
    # apart: a and b decode one token each; c prefills in two chunks (4 + 2), d starts afresh
    apart = [dec.new_sequence() for _ in range(3)]
    la, lb = dec.prefill(apart[0], a), dec.prefill(apart[1], b)
    ta, tb = int(la.argmax()), int(lb.argmax())
    want_a, want_b = dec.step([apart[0]], [ta])[0], dec.step([apart[1]], [tb])[0]
    dec.prefill(apart[2], c[:4])
    want_c = dec.prefill(apart[2], c[4:])
    # together: one forward with a 1-row, b 1-row and c's first 4 rows, then c's last 2 with a and b
    mixed = [dec.new_sequence() for _ in range(3)]
    assert torch.equal(dec.run([(mixed[0], a), (mixed[1], b)]), torch.stack([la, lb]))
    out = dec.run([(mixed[0], [ta]), (mixed[2], c[:4]), (mixed[1], [tb])])
    assert torch.equal(out[0], want_a) and torch.equal(out[2], want_b)
    nxt = dec.run([(mixed[2], c[4:]), (mixed[0], [int(want_a.argmax())])])
    assert torch.equal(nxt[0], want_c)
    assert [dec.length(s) for s in mixed] == [len(a) + 2, len(b) + 1, len(c)]
    # the caches agree: the next token of every sequence is the same either way
    follow = dec.step(apart, [int(want_a.argmax()), int(want_b.argmax()), int(want_c.argmax())])
    again = dec.step([mixed[1], mixed[2]], [int(want_b.argmax()), int(want_c.argmax())])
    assert torch.equal(again[0], follow[1]) and torch.equal(again[1], follow[2])
    with pytest.raises(RuntimeError, match="appears twice"):
        dec.run([(mixed[0], [1]), (mixed[0], [2, 3])])
    with pytest.raises(PLMError, match="at least one segment"):
        dec.run([])
    with pytest.raises(RuntimeError, match="has 0 tokens"):
        dec.run([(mixed[0], [])])


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0", "q4_k"])
def test_sparse_down_equals_dense(fmt):
    """The neuron-major down projection reads only active neurons' rows and gives the dense
    result (bit for bit for block formats): identical greedy decoding."""
    torch.manual_seed(3)
    cfg = PLMConfig.from_preset("plm-micro", vocab_size=512, intermediate_size=512, bos_token_id=0, eos_token_id=2,
                                initializer_range=0.1)
    model = PLMForCausalLM(cfg).eval()
    dense = NativeDecoder.from_model(model, fmt=fmt)
    sparse = NativeDecoder.from_model(model, fmt=fmt, sparse=True)
    assert "sparse" in sparse.formats["0.down"] and "sparse" not in dense.formats["0.down"]
    prompt = torch.randint(0, 512, (12,)).tolist()
    g_dense, g_sparse = dense.greedy(prompt, 32), sparse.greedy(prompt, 32)
    assert g_dense == g_sparse
    a, b = decoder_logits(dense, prompt, g_dense), decoder_logits(sparse, prompt, g_dense)
    if fmt == "bf16":  # fp32 summation order only, though it can flip later bf16 roundings (2^-9)
        assert rel_err(b, a) < 5e-3
    else:
        assert torch.equal(a, b)
    stats = sparse.sparse_stats()
    assert stats["rows"] > 0 and 0.05 < stats["active_fraction"] < 0.95  # relu² zeros were skipped


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_sparse_stats_of_a_batched_step_equal_its_rows_one_by_one(fmt):
    """The active-neuron count of one batched step of 8 sequences (on AVX-512 the many-row sparse
    product, which counts from a per-block tally) equals the count of the same 8 rows stepped one
    sequence at a time (the one-row path, which counts while listing each row's active neurons):
    the rows are bit-identical either way, so the counts must be too."""
    torch.manual_seed(5)
    cfg = PLMConfig.from_preset("plm-micro", vocab_size=512, intermediate_size=512, bos_token_id=0, eos_token_id=2,
                                initializer_range=0.1)
    dec = NativeDecoder.from_model(PLMForCausalLM(cfg).eval(), fmt=fmt, sparse=True)
    prompts = [torch.randint(0, 512, (5 + i,)).tolist() for i in range(8)]
    nxt = torch.randint(0, 512, (8,)).tolist()

    def counted(batched: bool) -> tuple[list[int], torch.Tensor]:
        seqs = [dec.new_sequence() for _ in prompts]
        for s, p in zip(seqs, prompts):
            dec.prefill(s, p)
        before = [int(v) for v in dec.impl.sparse_stats()]
        if batched:
            logits = dec.step(seqs, nxt)
        else:
            logits = torch.cat([dec.step([s], [t]) for s, t in zip(seqs, nxt)])
        after = [int(v) for v in dec.impl.sparse_stats()]
        for s in seqs:
            dec.free(s)
        return [a - b for a, b in zip(after, before)], logits

    (rows_b, active_b, neurons_b), logits_b = counted(True)
    (rows_1, active_1, neurons_1), logits_1 = counted(False)
    assert torch.equal(logits_b, logits_1)
    assert rows_b == rows_1 == 8 * cfg.num_hidden_layers
    assert neurons_b == neurons_1 == rows_b * cfg.intermediate_size
    assert active_b == active_1 and 0 < active_b < neurons_b


def test_sequences_and_cache_bytes(small_model):
    c = small_model.config
    dec = NativeDecoder.from_model(small_model, fmt="bf16", capacity=4)
    s = dec.new_sequence()
    dec.prefill(s, list(range(10)))  # grows past the initial capacity
    assert dec.length(s) == 10
    assert dec.kv_bytes(s) == 10 * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2
    dec.free(s)
    with pytest.raises(PLMError):
        dec.free(s)
    with pytest.raises(RuntimeError, match="no sequence"):
        dec.step([s], [1])
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        dec.prefill(dec.new_sequence(), [c.vocab_size])


def test_step_fn_with_generate_left_padded(small_model):
    """native_step_fn in the shared sampling loop: a left-padded batch decodes as the
    reference does (float32)."""
    from plm.infer.generate import GenerationConfig, generate_tokens, model_step_fn

    torch.manual_seed(5)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (7, 3, 11)]
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=[2])
    dec = NativeDecoder.from_model(small_model, fmt="f32", cache_dtype="f32")
    step = native_step_fn(dec)
    ours = list(generate_tokens(step, prompts, cfg, pad_id=0))
    theirs = list(generate_tokens(model_step_fn(small_model), prompts, cfg, pad_id=0))
    assert ours == theirs


# ---------------------------------------------------------------------------------------
# GGUF files: ours (plm export gguf) and llama.cpp's quantiser


@pytest.fixture(scope="module")
def gguf_files(qwen2_micro_dir, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from plm.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("native-gguf")
    return {t: export_gguf(qwen2_micro_dir, out / f"micro-{t}.gguf", t) for t in ("f32", "f16", "q8_0", "q4_0")}


def gguf_reference(path) -> PLMForCausalLM:
    """PLMForCausalLM holding a GGUF's weights as gguf-py dequantises them."""
    from plm.export.gguf import GLOBAL_TENSORS, LAYER_TENSORS
    from plm.infer.native_decoder import config_from_gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    inv = {v: k for k, v in GLOBAL_TENSORS.items()}
    inv_layer = {v: k for k, v in LAYER_TENSORS.items()}
    sd = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        N, K = (1, shape[0]) if len(shape) == 1 else shape
        w = nv.dequantize_blocks(np.ascontiguousarray(t.data).view(np.uint8), int(t.tensor_type), N, K).reshape(shape)
        if t.name in inv:
            sd[inv[t.name]] = w
        else:
            _, n, rest = t.name.split(".", 2)
            sd[f"model.layers.{n}.{inv_layer[rest]}"] = w
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model = PLMForCausalLM(cfg).eval()
    model.load_state_dict(sd)
    return model


@pytest.fixture(scope="module")
def prompt64(qwen2_micro_dir):
    from plm.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(qwen2_micro_dir)
    text = ("PLM, the Peripheral Language Model, uses multi-head latent attention and squared ReLU. "
            "边缘设备上的语言模型 🚀 def f(x): return x**2 " * 4)
    ids = tok.encode(text)[:64]
    assert len(ids) == 64
    return ids


@pytest.mark.slow  # llama.cpp parity / subprocess: make test runs it, make test-fast skips it
@pytest.mark.parametrize("gtype,bound", [("f32", 1e-4), ("f16", 0.02), ("q8_0", 0.05), ("q4_0", 0.05)])
def test_gguf_matches_reference_on_its_weights(gguf_files, prompt64, gtype, bound):
    dec = NativeDecoder.from_gguf(gguf_files[gtype], cache_dtype="f32")
    ref = reference_logits(gguf_reference(gguf_files[gtype]), prompt64)
    ours = decoder_logits(dec, prompt64[:8], prompt64[8:])
    if gtype == "f32":  # float weights: fp32 rounding only
        assert (ours - ref[7:]).abs().max() < bound * ref.abs().max()
    else:
        assert rel_err(ours, ref[7:]) < bound
    assert (ours.argmax(-1) == ref[7:].argmax(-1)).float().mean() >= 0.95
    if gtype in ("q8_0", "q4_0"):  # tensors stayed in their blocks
        assert dec.formats["0.up"] == gtype.upper()


def test_gguf_absorbed_key_half_held_as_q8_0_for_low_bit_files(qwen2_micro_dir, tmp_path):
    """kv_b's key half, transposed for the absorbed query, crosses the file's blocks: from a
    4-bit file it is held as Q8_0 (half the bytes of F16, a rounding well under the file's own),
    from an 8-bit one as F16; both stay close to gguf-py's decoding of the file, and Q8_0 close
    to the F16 form. qk_nope_head_dim 32 so its rows are whole Q8_0 blocks (16 keeps F16)."""
    from plm.export.gguf import export_gguf
    from plm.model.checkpoint import init_checkpoint

    ckpt = init_checkpoint("plm-micro", tmp_path / "ckpt", seed=7, tokenizer=str(qwen2_micro_dir),
                           initializer_range=0.08, qk_nope_head_dim=32)
    q4 = export_gguf(ckpt, tmp_path / "m-q4_0.gguf", "q4_0")
    q8 = export_gguf(ckpt, tmp_path / "m-q8_0.gguf", "q8_0")
    assert NativeDecoder.from_gguf(q8).formats["0.wuk"] == "F16"
    dec = NativeDecoder.from_gguf(q4, cache_dtype="f32")
    exact = NativeDecoder.from_gguf(q4, cache_dtype="f32", wuk_format="f16")
    assert (dec.formats["0.wuk"], exact.formats["0.wuk"], dec.formats["0.wuv"]) == ("Q8_0", "F16", "Q4_0")
    torch.manual_seed(0)
    ids = torch.randint(0, 151643, (24,)).tolist()
    ref = reference_logits(gguf_reference(q4), ids)[7:]
    ours, theirs = decoder_logits(dec, ids[:8], ids[8:]), decoder_logits(exact, ids[:8], ids[8:])
    assert rel_err(ours, ref) < 0.05 and (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert 0 < rel_err(ours, theirs) < 0.02  # Q8_0 really ran, and stayed close
    with pytest.raises(ConfigError, match="multiple of 32"):
        NativeDecoder.from_gguf(export_gguf(qwen2_micro_dir, tmp_path / "n16.gguf", "q4_0"), wuk_format="q8_0")
    with pytest.raises(ConfigError, match="wuk_format=.q4_0."):
        NativeDecoder.from_gguf(q4, wuk_format="q4_0")


@pytest.fixture(scope="module")
def confident_ggufs(qwen2_micro_dir, prompt64, tmp_path_factory):
    """The micro model trained for 20 steps on the prompt, exported and quantised by llama.cpp.

    Why train: a random model's logits over 151,936 tokens are near-ties (median top-2 margin
    0.08 at logit std 0.64), so the int8 activation rounding that both engines apply (about
    1.5% relative logit error each, independently) flips the argmax at 2-9% of positions --
    llama.cpp disagrees with the exact float reference as often as we do. A model that
    predicts its text (as a trained PLM does) has real margins, and the agreement measures
    whether we run the file as llama.cpp does."""
    pytest.importorskip("llama_cpp")
    from plm.data.tokenizer import Tokenizer
    from plm.export.gguf import export_gguf

    torch.manual_seed(0)
    model = PLMForCausalLM.from_pretrained(qwen2_micro_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.tensor([prompt64])
    for _ in range(20):
        loss = model(x[:, :-1], labels=x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("confident")
    model.save_pretrained(out / "ckpt")
    Tokenizer.from_dir(qwen2_micro_dir).save(out / "ckpt")
    return {t: export_gguf(out / "ckpt", out / f"micro-{t}.gguf", t) for t in ("q8_0", "q4_0")}


@pytest.mark.slow  # llama.cpp parity / subprocess: make test runs it, make test-fast skips it
@pytest.mark.parametrize("gtype", ["q8_0", "q4_0"])
def test_logits_agree_with_llama_cpp(confident_ggufs, prompt64, gtype):
    """Our decoder and llama.cpp on the same llama.cpp-quantised file: argmax agreement over
    a 64-token prompt >= 99%, relative logit error reported (0.2-0.3% here)."""
    from plm.export.llama_check import open_llama

    llm = open_llama(confident_ggufs[gtype], n_ctx=128)  # flash attention off, f32 K/V
    llm.eval(prompt64)
    theirs = torch.from_numpy(np.asarray(llm.scores[:64], dtype=np.float32))
    dec = NativeDecoder.from_gguf(confident_ggufs[gtype], cache_dtype="f32")
    assert dec.formats["0.up"] == gtype.upper()
    ours = decoder_logits(dec, prompt64[:1], prompt64[1:])
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    err = rel_err(ours, theirs)
    print(f"\n{gtype}: argmax agreement {agree:.3f}, relative logit error {err:.4f}")
    assert agree >= 0.99, (agree, err)
    assert err < 0.01


@pytest.mark.slow  # llama.cpp parity / subprocess: make test runs it, make test-fast skips it
def test_gguf_tokenizer(gguf_files, qwen2_micro_dir):
    from plm.data.tokenizer import Tokenizer

    ours = tokenizer_from_gguf(open_gguf(gguf_files["q8_0"]))
    ref = Tokenizer.from_dir(qwen2_micro_dir)
    for text in ["Hello world, this is a test.", "你好，世界！", "  spaces\n\n\tand tabs", "emoji 🎉 x=1+2",
                 "<|im_start|>user\nHello<|im_end|>\n"]:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.encode("<|im_start|>user\nHello<|im_end|>\n") == [151644, 872, 198, 9707, 151645, 198]
    assert ours.decode(ref.encode("round trip ✓")) == "round trip ✓"
    assert ours.eos_token_id == ref.eos_token_id


def test_gguf_reader_reads_what_the_gguf_package_reads(gguf_files, qwen2_micro_dir):
    """open_gguf parses through a plain view of the file's map (fast); every field and tensor
    equals the gguf package's own reader's, and load_gguf gives the decoder and tokenizer of
    the file from one parse."""
    import gguf

    from plm.data.tokenizer import Tokenizer
    from plm.infer.native_decoder import _field, load_gguf
    path = gguf_files["q8_0"]
    ours, ref = open_gguf(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(ref.fields) and len(ours.fields) > 20
    for k in ref.fields:
        assert _field(ours, k) == _field(ref, k), k
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in ref.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, ref.tensors))
    dec, tok = load_gguf(path)
    assert tok.encode("Hello world") == Tokenizer.from_dir(qwen2_micro_dir).encode("Hello world")
    prompt = list(range(100, 120))
    assert dec.greedy(prompt, 4) == NativeDecoder.from_gguf(path).greedy(prompt, 4)


@pytest.mark.slow  # two parses of a Qwen2 vocabulary by the gguf package's reader: ~15 s
def test_gguf_load_benchmark_runs(gguf_files, tmp_path):
    """benchmarks/gguf_load.py: both load paths on one file (the script checks they decode alike)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    out = subprocess.run([sys.executable, "benchmarks/gguf_load.py", str(gguf_files["q8_0"]), "--repeats", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    (row,) = json.loads((tmp_path / "gguf_load.json").read_text())["rows"]
    assert row["file"] == gguf_files["q8_0"].name and row["before_s"] > 0 and row["now_s"] > 0
    assert "| file | MiB |" in (tmp_path / "gguf_load.md").read_text()


def test_gguf_errors(gguf_files, tmp_path, qwen2_micro_dir):
    with pytest.raises(CheckpointError, match="no such GGUF"):
        NativeDecoder.from_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        NativeDecoder.from_gguf(bad)




@pytest.mark.slow  # llama.cpp parity / subprocess: make test runs it, make test-fast skips it
def test_gguf_types_without_a_kernel_are_held_as_q8_0(qwen2_micro_dir, tmp_path, capfd):
    """llama.cpp's Q5_K_M of a model whose rows are not whole 256-value blocks: every tensor
    falls back to Q5_0/Q5_1, which load as Q8_0 with one notice; logits stay near the float model's."""
    from plm.export.gguf import export_gguf
    from plm.model.checkpoint import load_model

    q5 = export_gguf(qwen2_micro_dir, tmp_path / "micro-q5_k_m.gguf", "q5_k_m")
    dec = NativeDecoder.from_gguf(q5)
    assert dec.converted and set(dec.converted.values()) <= {"Q5_0", "Q5_1", "Q5_K"}, dec.converted
    assert "held as Q8_0" in capfd.readouterr().err
    prompt = list(range(100, 140))
    with torch.no_grad():
        ref = load_model(qwen2_micro_dir)(torch.tensor([prompt])).logits[0, -1].float()
    s = dec.new_sequence()
    got = dec.prefill(s, prompt)[:ref.shape[0]]
    assert float((got - ref).norm() / ref.norm()) < 0.1


@pytest.fixture(scope="module", params=["q4_k_m", "q5_k_m"])
def k_quant_gguf(request, qwen2_tokenizer, tmp_path_factory):
    """llama.cpp's Q4_K_M / Q5_K_M of a model whose rows are whole 256-value super-blocks: Q4_K /
    Q5_K matrices, Q6_K token_embd and Q6_K ffn_down / attn_kv_b in some layers."""
    pytest.importorskip("llama_cpp")
    from plm.export.gguf import export_gguf

    cfg = PLMConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=2, kv_lora_rank=256,
                    num_hidden_layers=4, initializer_range=0.05)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(request.param)
    PLMForCausalLM(cfg).save_pretrained(out / "ckpt")
    qwen2_tokenizer.save(out / "ckpt")
    return export_gguf(out / "ckpt", out / f"m-{request.param}.gguf", request.param)


@pytest.mark.slow  # llama.cpp parity / subprocess: make test runs it, make test-fast skips it
def test_llama_cpp_k_quant_files(k_quant_gguf, capfd):
    five = k_quant_gguf.name.endswith("q5_k_m.gguf")
    low = "Q5_K" if five else "Q4_K"
    dense = NativeDecoder.from_gguf(k_quant_gguf, cache_dtype="f32")
    assert not dense.converted  # every tensor read in its own format
    sparse = NativeDecoder.from_gguf(k_quant_gguf, cache_dtype="f32", sparse=True)
    kinds = set(dense.formats.values())
    assert {low, "Q6_K"} <= kinds and dense.formats["token_embd"] == "Q6_K"
    assert "Q6_K sparse" in set(sparse.formats.values())
    torch.manual_seed(0)
    ids = torch.randint(0, 151643, (24,)).tolist()
    ref = reference_logits(gguf_reference(k_quant_gguf), ids)[7:]
    ours = decoder_logits(dense, ids[:8], ids[8:])
    assert rel_err(ours, ref) < 0.05
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    if not five:
        assert torch.equal(decoder_logits(sparse, ids[:8], ids[8:]), ours)
    else:  # no sparse layout for Q5_K: those down projections held as Q8_0, with a notice
        assert "Q8_0 sparse" in set(sparse.formats.values()) and sparse.converted
        assert "Q5_K (sparse down projection)" in capfd.readouterr().err
        assert rel_err(decoder_logits(sparse, ids[:8], ids[8:]), ref) < 0.05
