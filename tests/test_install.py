"""The built wheel works where it is installed: from any folder, with the recipes and the
benchmark core inside the package, not the repository."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel in a fresh virtual environment; its dependencies come from this environment's
    site-packages (linked by a .pth line, which does not bring this checkout's editable install)."""
    root = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (root / "dist").glob("plm-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return venv, root


def run(venv, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run([str(venv / "bin" / "plm"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


def test_the_wheel_is_what_runs(installed):
    venv, root = installed
    r = subprocess.run([venv / "bin" / "python", "-c", "import plm, plm.recipe as r; "
                        "print(plm.__file__); print(r.find_recipe('recipes/tiny/pipeline.yaml'))"],
                       capture_output=True, text=True, cwd=root, check=True)
    where, recipe = r.stdout.split()
    assert str(venv) in where and str(REPO) not in where
    assert str(venv) in recipe and Path(recipe).exists()  # the recipes ship in the wheel
    assert run(venv, "--version", cwd=root).stdout.startswith("plm ")
    r = run(venv, "demo", "--help", cwd=root)
    assert r.returncode == 0 and "recipes/tiny" in r.stdout


def test_a_pipeline_runs_from_another_folder(installed):
    venv, root = installed
    recipes, elsewhere = root / "my-recipes", root / "elsewhere"
    recipes.mkdir()
    elsewhere.mkdir()
    pre = {"name": "w", "run_dir": "${run}/pretrain", "vars": {"run": "runs/w"}, "tokenizer": "${run}/tokenizer",
           "model": {"preset": "plm-micro"},
           "data": {"math": {"dir": "${run}/data/math", "inputs": ["${run}/corpus/math/problems.jsonl"]}},
           "train": {"seq_len": 32, "micro_batch_size": 2, "progress": False, "precision": "fp32"},
           "phases": [{"name": "a", "tokens": 32 * 2 * 3, "mixture": {"math": 1.0},
                       "schedule": {"peak_lr": 1e-2, "floor_lr": 1e-3, "warmup": 1, "stable": 1, "decay": 1}}]}
    (recipes / "pretrain.yaml").write_text(yaml.safe_dump(pre))
    pipe = {"name": "w", "vars": {"run": "runs/w"}, "run_dir": "${run}", "stages": {
        "corpus": {"code_bytes": 20_000, "math_problems": 100, "math_test": 10},
        "tokenizer": {"vocab_size": 300},
        "pretrain": {"recipe": "pretrain.yaml"},  # relative to the pipeline file, not to the working folder
        "sparsity": {"tokens": 64, "seq_len": 32}}}
    (recipes / "pipeline.yaml").write_text(yaml.safe_dump(pipe))
    r = run(venv, "pipeline", recipes / "pipeline.yaml", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (elsewhere / "runs/w/report.md").read_text()
    assert "## Pretraining" in report and "## Activation sparsity" in report
