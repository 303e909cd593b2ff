"""The pipeline: stages in order, manifest-verified skipping, --from, failures named, a report."""
import json
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow  # subprocesses and training runs: `make test`, not `make test-fast`


def plm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "plm", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    run = root / "run"
    pre = {
        "name": "p", "run_dir": str(run / "pretrain"), "seed": 0, "tokenizer": str(run / "tokenizer"),
        "model": {"preset": "plm-micro"},
        "data": {"code": {"dir": str(run / "data/code"), "inputs": [str(run / "corpus/code")]},
                 "math": {"dir": str(run / "data/math"), "inputs": [str(run / "corpus/math/problems.jsonl")]},
                 "math_test": {"dir": str(run / "data/math_test"), "inputs": [str(run / "corpus/math_test.jsonl")],
                               "text_field": "answer"}},
        "eval": {"sources": {"math_test": 1.0}, "batches": 1},
        "train": {"seq_len": 32, "micro_batch_size": 4, "progress": False, "ckpt_every": 0},
        "phases": [{"name": "a", "tokens": 32 * 4 * 3, "mixture": {"code": 0.5, "math": 0.5},
                    "schedule": {"peak_lr": 1e-2, "floor_lr": 1e-3, "warmup": 1, "stable": 1, "decay": 1}},
                   {"name": "b", "tokens": 32 * 4 * 2, "mixture": {"math": 1.0},
                    "schedule": {"peak_lr": 1e-2, "floor_lr": 1e-3, "warmup": 1, "stable": 0, "decay": 1}}],
    }
    (root / "pretrain.yaml").write_text(yaml.safe_dump(pre))
    pipe = {"name": "p", "run_dir": str(run), "stages": {
        "corpus": {"code_bytes": 100_000, "math_problems": 300, "math_test": 40},
        "tokenizer": {"vocab_size": 400},
        "pretrain": {"recipe": str(root / "pretrain.yaml")},
        "export": {"types": ["f32"], "check_tokens": 24, "greedy_tokens": 8}}}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipe))
    r = plm("pipeline", root / "pipeline.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    return root, run, r


def test_runs_all_stages_and_reports(pipeline):
    root, run, r = pipeline
    for stage in ("corpus", "tokenizer", "pretrain", "export"):
        m = json.loads((run / "stages" / f"{stage}.json").read_text())
        assert m["status"] == "done" and m["checksums"], stage
    report = (run / "report.md").read_text()
    pre = json.loads((run / "stages/pretrain.json").read_text())["results"]["summary"]
    assert f"{pre['unigram_entropy']:.3f}" in report  # numbers come from the run
    assert "(loss_lr_all.png)" in report and (run / "loss_lr_all.png").stat().st_size > 10_000
    chk = json.loads((run / "stages/export.json").read_text())["results"]["llama_cpp_agreement"]
    assert chk["greedy_identical"] and chk["relative_diff"] < 1e-3


def test_rerun_skips_verified_stages_and_redoes_tampered_ones(pipeline):
    root, run, _ = pipeline
    r = plm("pipeline", root / "pipeline.yaml")
    assert r.returncode == 0 and r.stdout.count("done before (manifest verified)") == 4
    # an output changed behind the pipeline's back: that stage and those after it rerun
    gguf = run / "export" / "model-f32.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-10])
    r = plm("pipeline", root / "pipeline.yaml")
    assert r.returncode == 0
    assert r.stdout.count("done before") == 3 and "[export] GGUF export" in r.stdout
    r = plm("pipeline", root / "pipeline.yaml", "--from", "pretrain")
    assert r.returncode == 0 and r.stdout.count("done before") == 2
    # the stage's recipe file changed (a setting, not a comment): pretrain and later stages rerun
    pre = root / "pretrain.yaml"
    pre.write_text("# a comment only\n" + pre.read_text())
    r = plm("pipeline", root / "pipeline.yaml")
    assert r.returncode == 0 and r.stdout.count("done before") == 4
    cfg = yaml.safe_load(pre.read_text())
    cfg["phases"][1]["tokens"] = 32 * 4 * 3
    pre.write_text(yaml.safe_dump(cfg))
    r = plm("pipeline", root / "pipeline.yaml")
    assert r.returncode == 0 and r.stdout.count("done before") == 2 and "[pretrain] pretrain" in r.stdout


def test_failed_stage_is_named_and_earlier_results_stay(pipeline, tmp_path):
    root, run, _ = pipeline
    before = (run / "stages/pretrain.json").read_text()
    r = plm("pipeline", root / "pipeline.yaml", "--set", "stages.export.types=[f32, f99]")
    assert r.returncode == 2
    assert "stage 'export' failed" in r.stderr and "f99" in r.stderr and "Traceback" not in r.stderr
    assert (run / "stages/pretrain.json").read_text() == before
    assert json.loads((run / "stages/export.json").read_text())["status"] == "failed"
    r = plm("pipeline", root / "pipeline.yaml", "--from", "nope")
    assert r.returncode == 2 and "--from nope: this pipeline has no such stage" in r.stderr
