"""The GPU paths, checked on CPU: the chunked linear + cross entropy against full cross entropy
(values and gradients), padded-V ("flash") attention against plain SDPA, the trainer's loss,
attention and compile settings (FSDP2 on gloo with the chunked loss and per-block compile
matching one process), and the static-cache absorbed-MLA decoder against the reference model,
eager and compiled. What needs a GPU (MFU, decode tok/s, CUDA graphs) is benchmarks/gpu.sh."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from plm import PLMConfig, PLMForCausalLM
from plm.errors import PLMError
from plm.infer.generate import (
    GenerationConfig,
    generate_tokens,
    left_pad,
    model_step_fn,
)
from plm.infer.static_decode import StaticDecoder, StaticRuntime
from plm.model.loss import chunked_cross_entropy_sum, chunked_lm_loss, lm_loss_sum
from plm.model.modeling import attention_backend, set_attn_impl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; one thread keeps a shared 2-core box responsive
    yield
    torch.set_num_threads(n)


def _model(preset: str = "plm-micro", seed: int = 0, vocab: int = 512, init: float = 0.1, **kw) -> PLMForCausalLM:
    cfg = PLMConfig.from_preset(preset, vocab_size=vocab, bos_token_id=0, eos_token_id=2, initializer_range=init, **kw)
    torch.manual_seed(seed)
    return PLMForCausalLM(cfg)


def _labels(g: torch.Generator, shape: tuple[int, ...], vocab: int, ignore: float = 0.3) -> torch.Tensor:
    y = torch.randint(0, vocab, shape, generator=g)
    return y.masked_fill(torch.rand(shape, generator=g) < ignore, -100)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---- 1. chunked linear + cross entropy -------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_cross_entropy_equals_full_fp32(chunk):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(3, 41, 32, generator=g, requires_grad=True)
    w = torch.randn(301, 32, generator=g, requires_grad=True)
    y = _labels(g, (3, 41), 301)
    full = F.cross_entropy((h @ w.t()).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(full * 0.37, (h, w))
    got = chunked_cross_entropy_sum(h, w, y, chunk)
    ch, cw = torch.autograd.grad(got * 0.37, (h, w))  # the incoming gradient scales both
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(ch, gh, rtol=1e-5, atol=1e-6) and torch.allclose(cw, gw, rtol=1e-5, atol=1e-6)
    assert ch[y == -100].abs().max() == 0  # ignored tokens get no gradient


def test_chunked_cross_entropy_bf16_autocast_close_to_full():
    """Under autocast the products run in bf16 as lm_head's would; fp32 logits and loss."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 50, 64, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(500, 64, generator=g)).requires_grad_()
    y = _labels(g, (2, 50), 500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        got = chunked_cross_entropy_sum(h, w, y, 13)
    gh, gw = torch.autograd.grad(full, (h, w))
    ch, cw = torch.autograd.grad(got, (h, w))
    assert got.item() == pytest.approx(full.item(), rel=1e-3)
    assert ch.dtype == h.dtype and cw.dtype == w.dtype  # fp32 master weights get fp32 gradients
    assert _rel(ch, gh) < 2e-2 and _rel(cw, gw) < 2e-2


def test_chunked_cross_entropy_all_ignored_is_zero_with_zero_gradients():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = chunked_cross_entropy_sum(h, w, torch.full((4,), -100), 3)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_chunked_cross_entropy_under_no_grad_computes_no_gradients():
    """Evaluation: one matmul per chunk (the logits), none for gradients."""
    h = torch.randn(20, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    y = torch.randint(0, 30, (20,))

    class Count(TorchDispatchMode):
        mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        loss = chunked_cross_entropy_sum(h, w, y, 6)
    assert Count.mm == 4 and not loss.requires_grad  # ceil(20 / 6) chunks
    assert loss.item() == pytest.approx(F.cross_entropy(h @ w.t(), y, reduction="sum").item(), rel=1e-6)


class _Largest(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_chunked_lm_loss_on_the_model_equals_lm_loss_sum_and_never_holds_full_logits():
    V, B, T, chunk = 2000, 2, 24, 10
    model, twin = _model(vocab=V), _model(vocab=V)
    g = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g), "labels": _labels(g, (B, T), V, ignore=0.2)}
    with _Largest() as full_mode:
        ref, n_ref = lm_loss_sum(model, batch)
        ref.backward()
    with _Largest() as chunk_mode:
        got, n = chunked_lm_loss(chunk)(twin, batch)
        got.backward()
    assert n == n_ref == int((batch["labels"] != -100).sum())
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    grads = {k: p.grad for k, p in model.named_parameters()}
    for k, p in twin.named_parameters():  # the tied embedding gets both its input and its output gradient
        assert torch.allclose(p.grad, grads[k], rtol=1e-4, atol=1e-6), k
    assert full_mode.largest >= B * T * V  # the probe sees the logits of the plain loss
    assert chunk_mode.largest <= max(chunk * V, V * model.config.hidden_size)  # a chunk of logits, the embedding


# ---- 2. attention backend --------------------------------------------------------------------


def test_flash_padded_v_attention_equals_sdpa_on_cpu():
    """attn_impl "flash" pads V from 128 to the q/k head dim; its output is the same attention:
    causal, with padding, decoding with a cache, and its gradients."""
    from plm.model.cache import FullCache
    model = _model("plm-tiny", seed=3, init=0.06)
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0

    def run():
        model.zero_grad()
        causal = model(ids).logits
        padded = model(ids, attention_mask=mask).logits
        (causal.square().mean() + padded.square().mean()).backward()
        with torch.no_grad():
            cache = FullCache(model.config)
            steps = [model(ids[:, :9], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                                 for t in range(9, 13)]
        return causal.detach(), padded.detach(), torch.cat(steps, 1), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    ref = run()
    set_attn_impl(model, "flash")
    got = run()
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    with pytest.raises(ValueError, match="attn_impl"):
        set_attn_impl(model, "fast")


def test_attention_backend_names_the_kernel():
    cfg = PLMConfig()  # PLM-1.8B: q/k 192, v 128
    # on CPU: q/k 192 with v 128 is math only; padded, the CPU flash kernel takes it
    assert attention_backend(cfg, "sdpa", 64, "cpu", torch.float32) == "MATH"
    assert attention_backend(cfg, "flash", 64, "cpu", torch.float32) == "FLASH_ATTENTION"
    assert attention_backend(cfg, "eager") == "eager"


# ---- 3. the trainer's settings -------------------------------------------------------------


class _Loader:
    def __init__(self, batches: list[dict]) -> None:
        self.batches = iter(batches)

    def __next__(self) -> dict:
        return next(self.batches)


def _train_step(cfg_kw: dict, batches: list[dict], tmp_path: Path, model=None) -> tuple[float, dict, object]:
    from plm.train.config import TrainConfig
    from plm.train.dist import DistEnv
    from plm.train.trainer import Trainer
    model = model or _model()
    cfg = TrainConfig(precision="fp32", progress=False, device="cpu", grad_accum=len(batches), **cfg_kw)
    tr = Trainer(model, cfg, DistEnv(), tmp_path)
    m = tr.train_step(_Loader(batches), lr=1e-3)
    return m["loss"], {k: v.detach().clone() for k, v in model.state_dict().items()}, tr


def _lm_batches(n: int, seed: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 512, (2, 16), generator=g), "labels": _labels(g, (2, 16), 512)}
            for _ in range(n)]


def test_trainer_loss_chunk_selects_the_chunked_loss_and_trains_the_same(tmp_path):
    batches = _lm_batches(2)
    loss0, w0, tr0 = _train_step({}, batches, tmp_path / "a")
    loss1, w1, tr1 = _train_step({"loss_chunk": 5}, batches, tmp_path / "b")
    assert tr0.loss_fn is lm_loss_sum and tr1.loss_fn.chunk == 5
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    # Adam's first step moves each weight by about lr = 1e-3 whatever its gradient's size, so a
    # gradient near 0 turns rounding into up to ~1e-5 here; a wrong gradient would show as ~1e-3
    for k in w0:
        assert torch.allclose(w1[k], w0[k], atol=1e-4), k


def test_trainer_attention_setting(tmp_path):
    from plm.model.modeling import PLMAttention
    batches = _lm_batches(1)
    loss0, _, _ = _train_step({}, batches, tmp_path / "a")
    model = _model()
    loss1, _, tr = _train_step({"attention": "flash"}, batches, tmp_path / "b", model)
    assert {m.attn_impl for m in model.modules() if isinstance(m, PLMAttention)} == {"flash"}
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    _, _, tr = _train_step({}, batches, tmp_path / "c", _model())  # auto on CPU: the model's own
    assert {m.attn_impl for m in tr.raw_model.modules() if isinstance(m, PLMAttention)} == {"sdpa"}


def test_train_config_compile_values():
    from plm.errors import ConfigError
    from plm.recipe import parse
    from plm.train.config import TrainConfig
    for v in (True, False, "block", "model"):
        assert parse(TrainConfig, {"compile": v}, "train").compile == v
    for bad, msg in [({"compile": "blocks"}, "train.compile"), ({"loss_chunk": -1}, "loss_chunk"),
                     ({"attention": "fast"}, "train.attention")]:
        with pytest.raises(ConfigError, match=msg):
            parse(TrainConfig, bad, "train")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_compile_trains_like_eager_and_keeps_parameter_names(tmp_path, checkpointing):
    """train.compile=block: each layer's forward compiled in place (with activation
    checkpointing too); same loss and weights as eager, state_dict names unchanged."""
    batches = _lm_batches(1)
    loss0, w0, _ = _train_step({"loss_chunk": 8, "activation_checkpointing": checkpointing}, batches, tmp_path / "a")
    loss1, w1, tr = _train_step({"loss_chunk": 8, "activation_checkpointing": checkpointing, "compile": "block"},
                                batches, tmp_path / "b")
    assert all(getattr(layer, "_plm_compiled", False) for layer in tr.raw_model.model.layers)
    assert list(w1) == list(w0)
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for k in w0:  # as in the chunked-loss test: Adam's first step turns rounding into up to ~1e-5
        assert torch.allclose(w1[k], w0[k], atol=1e-4), k


# FSDP2 on gloo: two processes with the chunked loss (and per-block compile with activation
# checkpointing) match one process with the plain loss; the pretraining recipe and reference
# run of tests/test_train.py
from test_train import data, losses, recipe, reference, run  # noqa: F401


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"loss_chunk": 48},
                                   {"loss_chunk": 48, "compile": "block", "activation_checkpointing": True}],
                         ids=["chunked", "chunked-block-compile-checkpointing"])
def test_fsdp_two_processes_with_chunked_loss_match_one(data, reference, tmp_path, extra):
    run_dir = tmp_path / "run"
    r = run(["pretrain", recipe(data, run_dir, micro_batch_size=2, distributed="fsdp", **extra)], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = losses(run_dir), losses(reference)
    assert [g[:2] for g in got] == [x[:2] for x in ref]
    assert [g[2] for g in got] == pytest.approx([x[2] for x in ref], abs=2e-4)


# ---- 4. static-cache absorbed-MLA decode ---------------------------------------------------


def _greedy(step, prompts: list[list[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n greedy steps through a StepFn: tokens [n, B] and the logits they came from [n, B, V]."""
    ids, mask = left_pad(prompts, 0)
    new, toks, logits = ids, [], []
    for _ in range(n):
        lg = step(new, mask)[:, -1].float().cpu()
        nxt = lg.argmax(-1)
        toks.append(nxt)
        logits.append(lg)
        new = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(new)], 1)
    return torch.stack(toks), torch.stack(logits)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [100, 200, 300, 400, 17], [42]]


@pytest.fixture(scope="module")
def tiny():
    # plm-tiny's shape (6 layers, MLA rank 64, rope 16); a wide init gives peaked logits
    return _model("plm-tiny", seed=1, init=0.06).eval()


def test_static_decode_eager_equals_reference_greedy_and_logits(tiny):
    ref_tok, ref_lg = _greedy(model_step_fn(tiny), PROMPTS, 20)
    dec = StaticDecoder(tiny, batch=len(PROMPTS), capacity=40, compile=False)
    assert not dec.use_graph and dec.cache[0].shape == (4, 40, 64 + 16)
    got_tok, got_lg = _greedy(dec, PROMPTS, 20)
    assert torch.equal(got_tok, ref_tok)
    assert (got_lg - ref_lg).abs().max() < 1e-4 * ref_lg.abs().max()
    assert dec.length == 9 + 19
    # reset: a second batch of sequences in the same buffers gives the same again
    dec.reset()
    assert torch.equal(_greedy(dec, PROMPTS, 20)[0], ref_tok)


def test_static_decode_prefill_after_decode_and_single_token_prompts(tiny):
    """A chat-style step: more than one new token after decoded ones (past > 0), and prompts of
    one token (decoded from the first step)."""
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = tiny(ids).logits
    dec = StaticDecoder(tiny, batch=2, capacity=16, compile=False)
    mask = torch.ones(2, 12, dtype=torch.long)
    out = [dec(ids[:, :1], mask[:, :1])]
    out += [dec(ids[:, t:t + 1], mask[:, :t + 1]) for t in range(1, 5)]
    out.append(dec(ids[:, 5:9], mask[:, :9]))  # prefill after decode
    out += [dec(ids[:, t:t + 1], mask[:, :t + 1]) for t in range(9, 12)]
    got = torch.cat(out, 1)
    want = torch.cat([ref[:, :5], ref[:, 8:9], ref[:, 9:12]], 1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    with pytest.raises(PLMError, match="do not fit"):
        dec(ids[:, :5], torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(PLMError, match="batches of 2"):
        dec(ids[:1, :1], mask[:1, :13])


def test_static_runtime_generates_like_the_reference_and_guards_its_decoder(tiny):
    cfg = GenerationConfig(max_new_tokens=16)

    def gen(step):
        out = [[] for _ in PROMPTS]
        for r, t in generate_tokens(step, PROMPTS, cfg, pad_id=0):
            out[r].append(t)
        return out

    rt = StaticRuntime(tiny, capacity=32, compile=False)
    assert gen(rt.new_step()) == gen(model_step_fn(tiny))
    first, second = rt.new_step(), rt.new_step()
    ids, mask = left_pad(PROMPTS, 0)
    first(ids, mask)
    second(ids, mask)  # takes the batch-4 decoder over
    with pytest.raises(PLMError, match="took over"):
        first(ids[:, :1], torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1))


def test_engine_runs_the_static_decoder_on_cuda(monkeypatch):
    from plm.infer import engine
    assert "static" in engine.RUNTIMES
    assert engine.resolve_runtime("auto") == "edge"  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine.resolve_runtime("auto") == "static"
    assert engine.resolve_runtime("reference") == "reference"


@pytest.mark.slow
def test_static_decode_compiled_equals_reference(tiny):
    """decode_layer through torch.compile (default mode, inductor's CPU code): the same greedy
    tokens and logits as the reference, for a batch of prompts of different lengths."""
    ref_tok, ref_lg = _greedy(model_step_fn(tiny), PROMPTS, 12)
    dec = StaticDecoder(tiny, batch=len(PROMPTS), capacity=24, compile=True)
    got_tok, got_lg = _greedy(dec, PROMPTS, 12)
    assert torch.equal(got_tok, ref_tok)
    assert (got_lg - ref_lg).abs().max() < 1e-4 * ref_lg.abs().max()


# ---- 5. the benchmarks' CPU behaviour --------------------------------------------------------


def test_gpu_script_fails_fast_without_cuda(tmp_path):
    r = subprocess.run(["bash", str(REPO / "benchmarks/gpu.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                    "HOME": str(tmp_path)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "CUDA" in r.stderr and "Traceback" not in r.stderr


def test_decode_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/decode_throughput.py on a small model on CPU: same tokens as the reference,
    tok/s and roofline fields present (the figures themselves need a GPU)."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/decode_throughput.py"), "--device", "cpu",
                        "--preset", "plm-micro", "--vocab-size", "512", "--batch", "1,2", "--ctx", "16",
                        "--steps", "4", "--dtype", "float32", "--no-compile", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    res = json.loads((tmp_path / "decode_throughput-plm-micro-cpu.json").read_text())
    assert res["greedy_check"]["equal"] is True
    rows = {(x["batch"], x["ctx"]): x for x in res["rows"]}
    assert set(rows) == {(1, 16), (2, 16)}
    for x in rows.values():
        assert x["tokens_per_s"] > 0 and x["weight_bytes_per_step"] > 0 and "hbm_roofline_fraction" in x


@pytest.mark.slow
def test_gpu_script_plumbing_in_selftest_mode(tmp_path):
    """PLM_GPU_SELFTEST=1 runs benchmarks/gpu.sh's stages on the CPU at toy sizes: every stage
    exits 0 and the summary holds every table, so the first run on a lent GPU fails only on
    what needs the GPU."""
    import json
    r = subprocess.run(["bash", str(REPO / "benchmarks/gpu.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                    "HOME": str(tmp_path), "PLM_GPU_SELFTEST": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu.log", "summary.json", "summary.md"]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [x["exit"] for x in s["stages"]] == ["0", "0", "0"]
    assert all(t and not t["partial"] for t in s["train"].values()) and not s["decode"]["partial"]
    assert s["decode"]["greedy_check"]["equal"] is True
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.count("### Training throughput") == 2 and "### Decode" in md
