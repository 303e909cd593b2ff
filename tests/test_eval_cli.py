"""`plm eval` end to end on the random micro checkpoint, the report layout, and settings parsing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plm.errors import PLMError
from plm.eval.data import default_data_dir
from plm.report import PUBLISHED_PLM_1_8B_INSTRUCT, TaskResult, eval_report, paper_table
from plm.eval.runner import PAPER_TASKS, parse_fewshot, parse_tasks


def plm_eval(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("PLM_DATA", "PLM_SHARED_DATA")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "plm", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=full_env)


@pytest.mark.slow
def test_one_command_on_the_shipped_data(qwen2_micro_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    """What a new user runs: GSM8K and HumanEval by default, data found through $PLM_DATA."""
    out = tmp_path / "results"
    r = plm_eval(qwen2_micro_dir, "--limit", "2", "--max-new-tokens", "12", "--num-fewshot", "gsm8k=1",
                 "--output", out, "--batch-size", "2", env={"PLM_DATA": str(shared_data)})
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "results.json").read_text())
    assert list(run["results"]) == ["gsm8k", "humaneval"]
    g, h = run["results"]["gsm8k"], run["results"]["humaneval"]
    assert g["n"] == 2 and g["num_fewshot"] == 1 and 0.0 <= g["exact_match"] <= 1.0
    assert g["source"] == str(shared_data / "gsm8k" / "test.jsonl")
    assert h["n"] == 2 and h["pass@1"] == 0.0  # random weights write no working code
    assert run["config"]["limit"] == 2 and run["config"]["data_dir"] == str(shared_data)
    samples = [json.loads(line) for line in (out / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and samples[0]["rounds"][0]["prompt"].endswith("\nAnswer:")
    md = (out / "results.md").read_text()
    assert "| PLM-1.8B-Instruct (published) | 51.14 |" in md and "--limit 2" in md
    assert "| ARC-C | ARC-E | MMLU |" in r.stdout  # the table is printed too


@pytest.mark.slow
def test_refinement_and_multiple_choice_from_a_local_data_dir(qwen2_micro_dir: Path, shared_data: Path,
                                                              tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "arc_easy").mkdir(parents=True)
    arc = [{"id": str(i), "question": f"Which number is {i}?", "answerKey": "B",
            "choices": {"text": [str(i + 1), str(i), str(i - 1)], "label": ["A", "B", "C"]}} for i in range(4)]
    (data / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(a) + "\n" for a in arc))
    (data / "gsm8k").symlink_to(shared_data / "gsm8k")
    out = tmp_path / "results"
    r = plm_eval(qwen2_micro_dir, "--tasks", "arc-easy,gsm8k", "--data-dir", data, "--limit", "3",
                 "--refine", "1", "--max-new-tokens", "8", "--output", out, "--name", "micro-random",
                 "--no-progress")
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "results.json").read_text())
    a, g = run["results"]["arc_easy"], run["results"]["gsm8k"]
    assert a["n"] == 3 and set(a) >= {"acc", "acc_norm"} and a["headline"] == "acc_norm"
    assert g["mode"] == "chat" and [e["round"] for e in g["rounds"]] == [0, 1]
    md = (out / "results.md").read_text()
    assert "| micro-random |" in md and "## Self-refinement" in md and "| gsm8k | " in md


def test_user_errors_are_one_line(capsys, tmp_path: Path) -> None:
    from plm.cli import main
    # data is checked before the checkpoint is even opened
    assert main(["eval", str(tmp_path / "no-such-ckpt"), "--tasks", "gsm8k", "--data-dir", str(tmp_path),
                 "--source", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gsm8k: no local data at" in err
    assert main(["eval", str(tmp_path), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--data-dir", str(tmp_path / "x"), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_list_tasks(capsys, shared_data: Path) -> None:
    from plm.cli import main
    assert main(["eval", "--list-tasks", "--data-dir", str(shared_data)]) == 0
    out = capsys.readouterr().out
    assert str(shared_data / "gsm8k") in out and "(no local file; Hugging Face Rowan/hellaswag:validation)" in out


def test_data_dir_precedence(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PLM_DATA", raising=False)
    monkeypatch.delenv("PLM_SHARED_DATA", raising=False)
    monkeypatch.setenv("PLM_CACHE", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "data"  # never a path beside the repository
    monkeypatch.setenv("PLM_SHARED_DATA", str(tmp_path / "old"))
    assert default_data_dir() == tmp_path / "old"
    monkeypatch.setenv("PLM_DATA", str(tmp_path / "new"))
    assert default_data_dir() == tmp_path / "new"


def test_task_and_fewshot_parsing() -> None:
    assert parse_tasks("paper") == list(PAPER_TASKS) and len(PAPER_TASKS) == 13
    assert parse_tasks("GSM8K, code,gsm8k") == ["gsm8k", "humaneval", "mbpp"]
    assert parse_tasks("mc")[:2] == ["arc_challenge", "arc_easy"] and "gsm8k" not in parse_tasks("mc")
    assert parse_fewshot("3", ["gsm8k", "mmlu"]) == {"gsm8k": 3, "mmlu": 3}
    assert parse_fewshot("gsm8k=8,mmlu=5", ["gsm8k"]) == {"gsm8k": 8, "mmlu": 5}
    with pytest.raises(PLMError):
        parse_fewshot("gsm8k:8", ["gsm8k"])


def _result(value: float, metric: str) -> dict:
    return {metric: value, "headline": metric, "n": 10}


def test_paper_table_layout_and_averages() -> None:
    pub = PUBLISHED_PLM_1_8B_INSTRUCT
    full = [TaskResult.from_record(t, _result(pub[t] / 100, "acc")) for t in PAPER_TASKS]
    table = paper_table(full, "same as published")
    assert table[0].startswith("| Model | ARC-C | ARC-E | MMLU | CMMLU | C-Eval | GSM8K | MathQA | HumanEval | "
                               "MBPP | BoolQ | HellaSwag | LogiQA | PIQA | Avg. |")
    assert table[2].endswith("| 57.29 |") and table[3].endswith("| 57.29 |")
    part = paper_table([TaskResult.from_record("gsm8k", _result(0.5, "exact_match")),
                        TaskResult.from_record("humaneval", _result(0.25, "pass@1"))], "x")
    ours, published = part[2:4]
    assert "| 50.00 |" in ours and "| 25.00 |" in ours and ours.endswith("| 37.50 (2 of 13) |")
    assert published.endswith(f"| {(60.73 + 64.60) / 2:.2f} (2 of 13) |")
    run = {"model": "m", "name": "m", "config": {"limit": None}, "results": {"gsm8k": {
        **_result(0.5, "exact_match"), "mode": "chat", "num_fewshot": 0,
        "rounds": [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": 0.75, "fixed": 1, "broken": 0}]}}}
    md = eval_report(run)
    assert "| gsm8k | 50.00 | 75.00 (+1/-0) |" in md and "--limit" not in md
