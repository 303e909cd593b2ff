"""HumanEval and MBPP scoring through the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plm.errors import PLMError
from plm.eval.code_tasks import (SHARED_DATA_ENV, CodeProblem, extract_code, load_humaneval,
                                 load_mbpp, pass_at_1, score_completions, shared_data_dir)


@pytest.fixture(scope="module")
def humaneval() -> list[CodeProblem]:
    path = shared_data_dir() / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"HumanEval not found at {path} (set {SHARED_DATA_ENV})")
    return load_humaneval()


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass_and_broken_ones_all_fail(
        humaneval: list[CodeProblem]) -> None:
    assert len(humaneval) == 164
    n = len(humaneval)
    broken = ["    return None\n", "    raise NotImplementedError\n"]
    problems = humaneval * (1 + len(broken))
    completions = [p.canonical_solution for p in humaneval] + [b for b in broken for _ in range(n)]
    results = score_completions(problems, completions, timeout_s=10.0, workers=2)
    canonical = results[:n]
    assert pass_at_1(canonical) == 1.0, [p.task_id for p, ok in zip(humaneval, canonical) if not ok]
    for k in range(len(broken)):
        assert pass_at_1(results[n * (k + 1): n * (k + 2)]) == 0.0, broken[k]


def test_humaneval_program_shape(humaneval: list[CodeProblem]) -> None:
    p = humaneval[0]
    program = p.program("    return False\n")
    assert program.startswith(p.prompt + "    return False\n")
    assert program.rstrip().endswith(f"check({p.entry_point})")


def test_extract_code_stops_and_fences() -> None:
    he = CodeProblem(task_id="t", prompt="def f(x):\n", test="", canonical_solution="")
    body = "    return x + 1\n"
    for tail in ("\ndef g():\n    pass", "\nclass A: pass", "\nif __name__ == '__main__':\n    f(1)",
                 "\nprint(f(2))", "\n# test\nassert f(1) == 2"):
        assert extract_code(body + tail, he) == body
    fenced = "Here you go:\n```python\ndef f(x):\n    return x + 1\n```\nThis adds one."
    assert extract_code(fenced, he) == "def f(x):\n    return x + 1\n"
    assert extract_code("```\nprint(1)\n", he) == "print(1)\n"  # unterminated fence
    mbpp = CodeProblem(task_id="1", prompt="", test="", canonical_solution="", source="mbpp")
    helper = "def helper(a):\n    return a\n\ndef f(x):\n    return helper(x)\n"
    assert extract_code(helper + "\nassert f(1) == 1\n", mbpp) == helper


def _write_mbpp(path: Path) -> None:
    records = [
        {"task_id": 11, "text": "Write a function to add two numbers.",
         "code": "def add(a, b):\n    return a + b",
         "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": ""},
        {"task_id": 12, "text": "Write a function to square the global offset plus x.",
         "code": "def sq(x):\n    return (x + OFFSET) ** 2",
         "test_list": ["assert sq(1) == 4", "assert sq(0) == 1"], "test_setup_code": "OFFSET = 1"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_mbpp_loads_and_scores(tmp_path: Path) -> None:
    path = tmp_path / "mbpp.jsonl"
    _write_mbpp(path)
    problems = load_mbpp(path)
    assert [p.task_id for p in problems] == ["11", "12"]
    assert "assert add(1, 2) == 3" in problems[0].prompt and problems[1].setup_code == "OFFSET = 1"
    good = score_completions(problems, [p.canonical_solution for p in problems], timeout_s=5, workers=2)
    assert pass_at_1(good) == 1.0
    bad = ["def add(a, b):\n    return a - b", "def sq(x):\n    while True:\n        pass"]
    assert score_completions(problems, bad, timeout_s=1, workers=2) == [False, False]


def test_loaders_report_bad_files(tmp_path: Path) -> None:
    with pytest.raises(PLMError, match="not found"):
        load_humaneval(tmp_path / "missing.jsonl.gz")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 1, "text": "x"}\n', encoding="utf-8")
    with pytest.raises(PLMError, match=r"bad.jsonl:1: missing field\(s\) code, test_list"):
        load_mbpp(bad)
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(PLMError, match="bad.jsonl:1: not valid JSON"):
        load_mbpp(bad)
    with pytest.raises(PLMError, match="2 completions for 1 problems"):
        score_completions([CodeProblem("t", "", "", "")], ["a", "b"])
    with pytest.raises(PLMError):
        pass_at_1([])
