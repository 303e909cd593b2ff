"""Shipped recipes parse into valid phases and schedules; the benchmark scripts run."""
import subprocess
import sys
from pathlib import Path

import pytest

from plm.recipe import load_recipe
from plm.train.pretrain import build_phases
from plm.train.schedule import lr_at
from plm.train.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "plm-1.8b"])
def test_pretrain_recipes_build(name):
    r = load_recipe(REPO / "recipes" / name / "pretrain.yaml")
    cfg = TrainConfig.from_dict(r["train"])
    world = 64 if name == "plm-1.8b" else 1
    dirs = {k: Path(v["dir"]) for k, v in r["data"].items()}
    phases = build_phases(r, dirs, cfg, world)
    assert [p.name for p in phases] == [p["name"] for p in r["phases"]] and len(phases) == 3
    for p in phases:
        W, S, D, _ = p.schedule.phases()
        assert W + S + D <= p.steps
        peak = p.schedule.peak_lr
        assert lr_at(p.schedule, W) == pytest.approx(peak) and lr_at(p.schedule, p.steps - 1) < peak
    if name == "plm-1.8b":
        tokens = sum(p["tokens"] for p in r["phases"])
        assert abs(tokens - 2.48e12) < 0.01e12  # REFERENCE §3: about 2.48T tokens
        assert r["phases"][0]["tokens"] == 1_650_000_000_000
        assert r["model"]["preset"] == "plm-1.8b" and r["tokenizer"] == "qwen2"


def test_set_overrides_and_errors(tmp_path):
    r = load_recipe(REPO / "recipes/tiny/pretrain.yaml", ["train.micro_batch_size=4", "phases.1.tokens=10"])
    assert r["train"]["micro_batch_size"] == 4 and r["phases"][1]["tokens"] == 10
    # "2e-4" is a float (PyYAML alone reads it as a string); words stay strings
    r = load_recipe(REPO / "recipes/tiny/pretrain.yaml", ["phases.0.schedule.peak_lr=2e-4", "name=inf"])
    assert r["phases"][0]["schedule"]["peak_lr"] == 2e-4 and r["name"] == "inf"
    from plm.errors import ConfigError
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_recipe(REPO / "recipes/tiny/pretrain.yaml", ["train.micro_batch_size"])
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_run_folder_variable_relocates_every_tiny_path(tmp_path):
    # every path of the tiny recipes is built from ${run}: one setting moves the whole run
    for name in ("pretrain", "sft", "aries", "pipeline"):
        default = repr(load_recipe(REPO / f"recipes/tiny/{name}.yaml"))
        moved = repr(load_recipe(REPO / f"recipes/tiny/{name}.yaml", ["vars.run=/elsewhere/x"]))
        assert "runs/tiny" in default and "${" not in default, name
        assert "runs/tiny" not in moved.replace("recipes/tiny", "") and "/elsewhere/x/" in moved, name
    assert load_recipe(REPO / "recipes/tiny/sft.yaml", ["vars.run=r"])["model"]["init_from"] == "r/pretrain/final"
    bad = tmp_path / "bad.yaml"
    bad.write_text("vars: {run: a}\nrun_dir: ${rn}/x\n")
    from plm.errors import ConfigError
    with pytest.raises(ConfigError, match=r"bad.yaml: \$\{rn\} is not defined under 'vars:' \(defined: run\)"):
        load_recipe(bad)


def test_train_throughput_benchmark_runs(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/train_throughput.py"), "--preset", "plm-micro",
                        "--seq-len", "32", "--batch", "2", "--steps", "1", "--warmup", "0", "--precision", "fp32",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| naive (eager attention" in r.stdout
    assert (tmp_path / "train_throughput-plm-micro-cpu.json").exists()
