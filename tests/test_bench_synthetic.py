"""The benchmark's synthetic-sparsity model (plm.bench.synthetic): the relu² activations of the
rewritten random model are the requested share exactly zero on text it was not calibrated on,
the constant channel is never written, and the native decoder's exact sparse path decodes it
with the same greedy tokens as dense while reading only the active rows."""
import pytest
import torch

from plm.bench.synthetic import make_sparse, relu2_zero_share, sparse_checkpoint
from plm.model.config import PLMConfig
from plm.model.modeling import PLMForCausalLM


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = PLMConfig.from_preset("plm-micro", vocab_size=512, num_hidden_layers=4, intermediate_size=512,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return PLMForCausalLM(cfg).eval()


@pytest.mark.parametrize("x", [0.5, 0.909])
def test_requested_share_of_zeros_on_held_out_tokens(x):
    g = torch.Generator().manual_seed(1)
    model = _model()
    before = relu2_zero_share(model, torch.randint(0, 512, (256,), generator=g))
    make_sparse(model, x, torch.randint(0, 512, (512,), generator=g))
    after = relu2_zero_share(model, torch.randint(0, 512, (256,), generator=g))  # other tokens
    assert all(abs(s - 0.5) < 0.1 for s in before)  # random weights: about half
    assert all(abs(s - x) < 0.04 for s in after), after
    for layer in model.model.layers:
        assert not layer.self_attn.o_proj.weight[0].any() and not layer.mlp.down_proj.weight[0].any()


def test_share_of_zeros_holds_at_every_position():
    # the attention's drift along the sequence would move the share with the position (fewer
    # zeros early on); scaled down (attn_scale), the first positions see the requested share too
    g = torch.Generator().manual_seed(2)
    calib, text = torch.randint(0, 512, (512,), generator=g), torch.randint(0, 512, (256,), generator=g)
    spread = {}
    for scale in (1.0, 0.02):
        torch.manual_seed(0)  # plm-tiny's width: plm-micro's stream hardly drifts at all
        model = PLMForCausalLM(PLMConfig.from_preset("plm-tiny", vocab_size=512, num_hidden_layers=4, bos_token_id=0,
                                                     eos_token_id=1, pad_token_id=None)).eval()
        make_sparse(model, 0.909, calib, attn_scale=scale)
        spread[scale] = max(abs(s - 0.909) for a, b in ((0, 16), (16, 64), (64, 256))
                            for s in relu2_zero_share(model, text, a, b))
    assert spread[0.02] < 0.03, spread
    assert spread[1.0] > 0.08, spread  # without the scale the early positions fall short


def test_constant_channel_reaches_every_layer_unchanged():
    model = _model()
    make_sparse(model, 0.8, torch.arange(64))
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, i: seen.append(i[0][..., 0].clone()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(torch.arange(100, 140)[None])
    for h in hooks:
        h.remove()
    c = model.model.embed_tokens.weight[0, 0]
    for v in seen:
        assert torch.equal(v, torch.full_like(v, float(c)))


def test_bad_sparsity_is_refused(tmp_path):
    from plm.errors import PLMError
    with pytest.raises(PLMError, match=r"sparsity must be in \(0, 1\)"):
        sparse_checkpoint("plm-micro", 1.0, list(range(64)), tmp_path / "m")
    with pytest.raises(PLMError, match="at least 16 calibration tokens"):
        sparse_checkpoint("plm-micro", 0.9, [1, 2, 3], tmp_path / "m")


def test_native_sparse_decode_of_the_synthetic_checkpoint(tmp_path):
    from plm.infer import native as nv
    if not nv.available():
        pytest.skip("native kernels not built")
    from plm.infer.native_decoder import NativeDecoder
    from plm.model.checkpoint import load_model

    ids = torch.randint(0, 5000, (400,), generator=torch.Generator().manual_seed(2)).tolist()
    path = sparse_checkpoint("plm-micro", 0.9, ids[:256], tmp_path / "m", dtype="float32")
    model = load_model(path)
    dense = NativeDecoder.from_model(model, fmt="q8_0")
    sparse = NativeDecoder.from_model(model, fmt="q8_0", sparse=True)
    prompt = ids[256:300]
    assert sparse.greedy(prompt, 12) == dense.greedy(prompt, 12)
    active = sparse.sparse_stats()["active_fraction"]
    assert 0.05 < active < 0.16, active


@pytest.mark.slow
def test_edge_benchmark_end_to_end(tmp_path):
    """benchmarks/edge.py on plm-micro with --sparsity, in one run: our native decoder dense and
    sparse, llama.cpp and the PyTorch runtime on the same weights; every engine measured at every
    context, the roofline and bandwidth columns, the per-token overhead of the native decoder,
    the sparse engine's measured share of active neurons, teacher-forced decode, the targets; two
    interleaved rounds pooled."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from plm.infer import native as nv
    if not nv.available():
        pytest.skip("native kernels not built")
    pytest.importorskip("llama_cpp")
    import llama_cpp
    repo = Path(__file__).resolve().parents[1]
    engines = ["ours-q8_0", "ours-q8_0-sparse", "llama-q8_0", "torch-int8"]
    out = tmp_path / "out"
    # --isa forces our kernels' path; --llama-path puts another llama_cpp first on llama.cpp's
    # workers' import path (here the installed one again, through a folder of its own)
    isa = "avx2" if nv.isa_supported("avx2") else "scalar"
    other = tmp_path / "other-llama"
    other.mkdir()
    (other / "llama_cpp").symlink_to(Path(llama_cpp.__file__).parent)
    proc = subprocess.run([sys.executable, str(repo / "benchmarks/edge.py"), "--preset", "plm-micro", "--sparsity", "0.9",
                           "--contexts", "16,40", "--decode-tokens", "4", "--engines", ",".join(engines),
                           "--budgets", "", "--no-sweep", "--contention", "1.0", "--rounds", "2",
                           "--workdir", str(tmp_path / "w"), "--isa", isa, "--llama-path", str(other),
                           "--out", str(out)], capture_output=True, text=True, timeout=1200, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "edge.json").read_text())
    assert res["engines"]["ours-q8_0"]["build"] == f"plm kernels {isa}"
    llama_build = res["engines"]["llama-q8_0"]["build"]
    assert llama_build.startswith("llama.cpp ") and llama_build.endswith(f"(llama-cpp-python {llama_cpp.__version__}, {other})")
    assert ("AVX2" in llama_build) == ("avx2" in nv.info()["cpu_features"])  # llama.cpp's own system info
    assert res["teacher_forced"] and res["sparsity"] == 0.9 and res["bandwidth"]["read_gb_s"] > 0
    for e in engines:
        r = res["engines"][e]
        assert [s["context"] for s in r["stages"]] == [16, 40], (e, r.get("error"))
        for s in r["stages"]:
            assert s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0 and s["read_gb_s"] > 0, (e, s)
            assert len(s["greedy"]) == 4 and len(s["decode_ms"]) == 8 and len(s["rounds"]) == 2
    dense, sparse = res["engines"]["ours-q8_0"], res["engines"]["ours-q8_0-sparse"]
    for s in dense["stages"]:  # the step against its kernels timed apart
        assert s["matmul_ms"] > 0 and s["attention_ms"] > 0
        assert s["overhead_ms"] == pytest.approx(s["step_ms"] - s["matmul_ms"] - s["attention_ms"], abs=2e-3)
    for s, d in zip(sparse["stages"], dense["stages"]):
        assert 0 < s["sparse"]["active_fraction"] < 0.5 and s["sparse"]["rows"] > 0
        assert s["greedy"] == d["greedy"]  # exact sparse: block formats give the dense argmax
    md = (out / "edge.md").read_text()
    assert "right after each decode measurement" in md  # plm-micro decodes from the caches: no windows
    assert "| ours-q8_0-sparse |" in md and "% roofline @40" in md and "2 interleaved rounds" in md and (out / "edge.png").stat().st_size > 0
    assert any(t["target"].startswith("Q8_0 decode @16") for t in res["targets"])
    assert f"Kernels: {llama_build}; plm kernels {isa}." in md


@pytest.mark.parametrize("script", ["build_llama_wheel.sh", "build_llama_server.sh"])
def test_llama_build_scripts_refuse_an_unknown_isa(script):
    """Both llama.cpp builds take their flags from scripts/llama_cmake_flags.sh, which checks
    PLM_LLAMA_ISA before anything is built."""
    import os
    import subprocess
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / script
    p = subprocess.run(["bash", str(path)], env=dict(os.environ, PLM_LLAMA_ISA="avx3"), capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2 and "PLM_LLAMA_ISA must be native or avx2, got 'avx3'" in p.stderr and not p.stdout


def test_edge_benchmark_rejects_a_bad_isa_or_llama_path(tmp_path):
    from plm.bench.edge import EdgeBenchSettings, run
    from plm.errors import PLMError
    base = dict(preset="plm-micro", contexts="16", workdir=str(tmp_path / "w"), out=str(tmp_path / "o"))
    with pytest.raises(PLMError, match="--isa must be native, amx, avx512, avx2 or scalar, got 'avx3'"):
        run(EdgeBenchSettings(**base, isa="avx3"))
    with pytest.raises(PLMError, match=f"--llama-path {tmp_path}: no llama_cpp package there"):
        run(EdgeBenchSettings(**base, llama_path=str(tmp_path)))


def _round(ctx_rates: dict[int, tuple[float, list[float], float]], rss: int) -> dict:
    """An engine result with stages {context: (prefill seconds, decode ms, read GB/s)}."""
    stages = [{"context": c, "prefill_tokens": 64, "prefill_s": p, "prefill_tok_s": 64 / p, "decode_ms": d,
               "decode_tok_s": 1e3 * (len(d) - 1) / sum(d[1:]), "contended": False, "rss": rss, "read_gb_s": bw,
               "greedy": [1, 2, 3]} for c, (p, d, bw) in ctx_rates.items()]
    return {"engine": "ours-q8_0", "weight_bytes": 100, "stages": stages, "peak_rss": rss}


def test_edge_benchmark_merges_interleaved_rounds():
    """--rounds: per context the decode steps pool (each round's warm-up step still dropped),
    prefill time sums, the best bandwidth of the rounds is kept; hand-computed values."""
    from plm.bench.edge import merge_rounds
    a = _round({64: (0.5, [99.0, 50.0, 50.0, 50.0], 30.0)}, rss=10)
    b = _round({64: (1.5, [99.0, 100.0, 100.0, 100.0], 40.0)}, rss=12)
    m = merge_rounds([a, b])
    st = m["stages"][0]
    assert st["decode_tok_s"] == pytest.approx(6 / 0.45)  # 6 warm steps in 450 ms
    assert st["decode_tok_s_median"] == pytest.approx(1e3 / 75)  # median of 50 x3, 100 x3
    assert st["prefill_tok_s"] == pytest.approx(128 / 2.0) and st["prefill_s"] == pytest.approx(2.0)
    assert (st["read_gb_s"], m["peak_rss"], m["rounds"], len(st["decode_ms"])) == (40.0, 12, 2, 8)
    assert [r["decode_tok_s"] for r in st["rounds"]] == [20.0, 10.0]
    assert merge_rounds([a]) is a  # one round: unchanged
    failed = {"engine": "ours-q8_0", "error": "worker died"}
    assert merge_rounds([a, failed]) is a and merge_rounds([failed]) is failed


def test_edge_roofline_against_the_bandwidth_of_each_window():
    """The decode steps cut at the probes taken between them (the warm-up step in no window),
    each window against the mean of its two probes, the median over windows; hand-computed."""
    from plm.bench.edge import decode_windows, merge_rounds, roofline
    times = [0.5, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.05]  # the first: warm-up
    probes = [(0, 30.0), (4, 50.0), (8, 40.0), (9, 40.0)]
    win = decode_windows(times, probes)
    assert [w["steps"] for w in win] == [3, 4, 1]
    assert [w["tok_s"] for w in win] == pytest.approx([10.0, 5.0, 20.0])
    assert [w["read_gb_s"] for w in win] == [40.0, 45.0, 40.0]
    assert decode_windows(times, []) == [] and decode_windows(times, [(0, 30.0)]) == []
    st = {"decode_tok_s": 1.0, "kv_bytes": 1e9, "windows": win}
    r = {"weight_bytes": 3e9}  # 4 GB a token: rooflines 10, 11.25, 10 tok/s
    roof, share = roofline({}, r, st)
    assert roof == pytest.approx(10.0) and share == pytest.approx(1.0)  # median of 1.0, 0.444, 2.0
    # no windows (a small model): the stage's one probe
    assert roofline({}, r, {"decode_tok_s": 5.0, "kv_bytes": 1e9, "read_gb_s": 40.0}) == pytest.approx((10.0, 0.5))
    # rounds pool their windows
    a, b = _round({64: (0.5, [9.0, 5.0], 30.0)}, rss=1), _round({64: (0.5, [9.0, 5.0], 30.0)}, rss=1)
    a["stages"][0]["windows"], b["stages"][0]["windows"] = win[:1], win[1:]
    merged = merge_rounds([a, b])["stages"][0]
    assert merged["windows"] == win and merged["read_gb_s"] == 40.0  # the median of 40, 45, 40


def test_bandwidth_prober_answers_from_its_own_process():
    """Probes come from a helper process (its CPU time reported, so contention checks can
    count it as the measurement's own), started in full before the constructor returns (its
    imports must not overlap a measurement); closing it ends that process."""
    from plm.bench.edge import Prober
    p = Prober(1, 64 << 20)
    try:
        assert p.cpu_s > 0 and p.p.poll() is None  # ready: torch imported, buffer filled
        first, second = p(), p()
        assert first > 0 and second > 0 and p.cpu_s > 0
    finally:
        p.close()
    assert p.p.returncode == 0


def test_sparse_target_checks_each_context_apart():
    """The sparse target's greedy check is per context: a token that differs at 1024 fails that
    row alone and says how many steps differ; the speed ratios are hand-computed."""
    from plm.bench.edge import targets

    def eng(name, tok_s, greedy, sparse=False):
        st = [{"context": c, "decode_tok_s": tok_s, "prefill_tok_s": 1.0, "greedy": g,
               **({"sparse": {"active_fraction": 0.1}} if sparse else {})} for c, g in greedy.items()]
        return {"engine": name, "stages": st}

    dense = {64: [1, 2, 3], 1024: [4, 5, 6]}
    res = {"engines": {"ours-q8_0": eng("ours-q8_0", 10.0, dense),
                       "ours-q8_0-sparse": eng("ours-q8_0-sparse", 14.0, {64: [1, 2, 3], 1024: [4, 9, 6]}, True),
                       "llama-q8_0": eng("llama-q8_0", 8.0, dense)}}
    rows = {r["target"].split(" (")[0]: r for r in targets(res, [64, 1024]) if "sparse" in r["target"]}
    at64, at1024 = rows["Q8_0 sparse decode @64"], rows["Q8_0 sparse decode @1024"]
    assert at64["met"] and "1.75x llama.cpp, 1.40x dense" in at64["measured"]
    assert "identical to dense: yes" in at64["measured"]
    assert not at1024["met"] and "identical to dense: no (1 of 3 steps differ)" in at1024["measured"]


def test_quality_targets_report_the_paired_interval():
    """The quality rows decide on the point perplexities and quote the paired ratio with its
    interval (here 4-bit 1.01163 = +1.16%, interval 1.00851 to 1.01475, from the 8,192-token run)."""
    from plm.bench.edge import targets

    ppl = {"ours bf16": 32.6548, "ours q8_0": 32.6992, "llama.cpp q8_0": 32.6557, "ours q4_k_m": 32.7097,
           "llama.cpp q4_k_m": 32.3337}
    res = {"engines": {}, "quality": {
        "rows": [{"weights": k, "perplexity": v} for k, v in ppl.items()],
        "paired": [{"a": "ours q4_k_m", "b": "llama.cpp q4_k_m", "ratio": 1.01163, "ci95": [1.00851, 1.01475],
                    "sequences": 32}]}}
    rows = {r["target"]: r for r in targets(res, [64]) if r["target"].startswith("quality")}
    within = rows["quality: our 8-bit perplexity within 0.5% of bf16"]
    assert within["met"] and "(+0.14%)" in within["measured"] and "paired" not in within["measured"]
    assert not rows["quality: our 8-bit perplexity <= llama.cpp Q8_0's"]["met"]
    four = rows["quality: our 4-bit (Q4_K_M) perplexity <= llama.cpp Q4_K_M's"]
    assert not four["met"]
    assert four["measured"] == ("32.7097 vs 32.3337; paired +1.16% (95%: +0.85% to +1.48%, 32 sequences)")


def test_benchmarks_name_the_cpu_by_family_model_and_isa(tmp_path):
    """A VM may call its CPU only "Intel(R) Xeon(R) Processor": the machine line every benchmark
    prints adds the CPUID family and model and the vector extensions (hand-written cpuinfo files;
    only the first processor is read)."""
    from plm.utils import cpu_name
    xeon = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
            "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 "
            "avx512_fp16 amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\nmodel name\t: Other\n")
    laptop = "processor\t: 0\ncpu family\t: 6\nmodel\t\t: 154\nmodel name\t: Intel(R) Core(TM) i7-1260P\nflags\t\t: fma avx2\n"
    (tmp_path / "xeon").write_text(xeon)
    (tmp_path / "laptop").write_text(laptop)
    assert cpu_name(str(tmp_path / "xeon")) == ("Intel(R) Xeon(R) Processor (family 6 model 167; "
                                                "avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_int8)")
    assert cpu_name(str(tmp_path / "laptop")) == "Intel(R) Core(TM) i7-1260P (family 6 model 154; avx2)"
    assert cpu_name(str(tmp_path / "missing"))  # no cpuinfo: the platform's name, never empty
