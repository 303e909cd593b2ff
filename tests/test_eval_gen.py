"""Generation tasks: prompts from the shipped data, MBPP layouts, and self-refinement rounds
scored through the ARIES template, with scripted fake models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plm.data.chat import DEFAULT_REFINE_INSTRUCTION, direct_messages, refinement_messages
from plm.data.tokenizer import render_chatml
from plm.errors import PLMError
from plm.eval.gen_tasks import GEN_TASKS, GenItem, evaluate_generation, load_gsm8k, load_humaneval_items, load_mbpp_items


class ScriptedLM:
    """Answers ``answer(prompt, call)``, ``call`` counting generate() calls (the rounds);
    records every prompt and stop list."""

    def __init__(self, answer) -> None:
        self.answer, self.prompts, self.stops = answer, [], []

    def chat_prompt(self, messages):
        return render_chatml(messages, add_generation_prompt=True)

    def generate(self, prompts, max_new_tokens, stop=(), desc=None):
        self.prompts.append(list(prompts))
        self.stops.append(tuple(stop))
        return [self.answer(p, len(self.prompts) - 1) for p in prompts]

    def loglikelihood(self, requests, desc=None):  # pragma: no cover - not used here
        raise AssertionError


def test_gsm8k_prompts_from_shipped_data(shared_data: Path) -> None:
    items, where = load_gsm8k(shared_data, "local", limit=3, num_fewshot=2)
    assert len(items) == 3 and where.endswith("gsm8k/test.jsonl")
    train = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").open().readlines()[:2]]
    p = items[0].completion_prompt
    assert p.startswith(f"Question: {train[0]['question']}\nAnswer: ")
    assert "<<" not in p and "#### 72" in p  # calculator annotations gone, final answers kept
    assert p.endswith("\nAnswer:") and p.count("Question:") == 3
    assert items[0].reference == "18"  # Janet's ducks
    zero, _ = load_gsm8k(shared_data, "local", limit=1, num_fewshot=0)
    assert zero[0].request.startswith("Question: Janet") and "####" in zero[0].request


def test_refinement_rounds_use_the_aries_template_and_report_accuracy_per_round(shared_data: Path) -> None:
    items, _ = load_gsm8k(shared_data, "local", limit=4, num_fewshot=0)
    refs = [it.reference for it in items]

    def answer(prompt: str, rnd: int) -> str:
        # direct: only item 0 right; first refinement fixes item 1 and breaks item 0; second fixes 2
        k = next(i for i, it in enumerate(items) if it.request in prompt)
        assert (DEFAULT_REFINE_INSTRUCTION in prompt) == (rnd > 0)
        right = {0: {0}, 1: {1}, 2: {1, 2}}[rnd]
        return f"so the answer is {refs[k] if k in right else int(refs[k]) + 1}"

    lm = ScriptedLM(answer)
    metrics, samples = evaluate_generation(lm, GEN_TASKS["gsm8k"], items, refine=2, max_new_tokens=8)
    assert metrics["mode"] == "chat" and metrics["exact_match"] == 0.25 and metrics["final"] == 0.5
    assert metrics["rounds"] == [{"round": 0, "accuracy": 0.25},
                                 {"round": 1, "accuracy": 0.25, "fixed": 1, "broken": 1},
                                 {"round": 2, "accuracy": 0.5, "fixed": 1, "broken": 0}]
    # round 0 is direct_messages(x); round r shows x and round r-1's answer through z(x, y)
    assert lm.prompts[0][2] == render_chatml(direct_messages(items[2].request), add_generation_prompt=True)
    prev = samples[3]["rounds"][0]["output"]
    assert lm.prompts[1][3] == render_chatml(refinement_messages(items[3].request, prev), add_generation_prompt=True)
    prev = samples[3]["rounds"][1]["output"]
    assert lm.prompts[2][3] == render_chatml(refinement_messages(items[3].request, prev), add_generation_prompt=True)
    assert [r["correct"] for r in samples[1]["rounds"]] == [False, True, True]


def test_completion_mode_uses_task_stops(shared_data: Path) -> None:
    items, _ = load_gsm8k(shared_data, "local", limit=2, num_fewshot=1)
    lm = ScriptedLM(lambda p, _: "#### 18")
    metrics, samples = evaluate_generation(lm, GEN_TASKS["gsm8k"], items)
    assert lm.prompts == [[it.completion_prompt for it in items]]
    assert "Question:" in lm.stops[0]
    assert metrics == {"exact_match": 0.5, "n": 2, "mode": "completion"}
    assert samples[0]["rounds"][0]["extracted"] == "18"


def test_humaneval_chat_refinement_runs_code_in_the_sandbox(shared_data: Path) -> None:
    items, _ = load_humaneval_items(shared_data, "local", limit=3)
    by_request = {it.request: it.reference for it in items}

    def answer(prompt: str, _: int) -> str:
        problem = next(p for r, p in by_request.items() if r in prompt)
        if DEFAULT_REFINE_INSTRUCTION in prompt:  # the refinement gives the real solution, fenced
            return f"Fixed:\n```python\n{problem.prompt}{problem.canonical_solution}```\n"
        return "```python\n    return None\n```"

    metrics, samples = evaluate_generation(ScriptedLM(answer), GEN_TASKS["humaneval"], items, refine=1)
    assert metrics["pass@1"] == 0.0 and metrics["final"] == 1.0
    assert metrics["rounds"][1] == {"round": 1, "accuracy": 1.0, "fixed": 3, "broken": 0}
    assert samples[0]["rounds"][1]["code"].startswith(items[0].reference.prompt)


def _mbpp_record(task_id: int, name: str = "add") -> dict:
    return {"task_id": task_id, "text": f"Write a function {name} that adds two numbers.",
            "code": f"def {name}(a, b):\n    return a + b", "test_list": [f"assert {name}(1, 2) == 3"],
            "test_setup_code": "", "challenge_test_list": []}


def test_mbpp_layouts_and_fewshot(tmp_path: Path) -> None:
    hf = tmp_path / "hf" / "mbpp"
    hf.mkdir(parents=True)
    (hf / "test.jsonl").write_text("".join(json.dumps(_mbpp_record(i)) + "\n" for i in (11, 12)))
    (hf / "prompt.jsonl").write_text("".join(json.dumps(_mbpp_record(i, f"f{i}")) + "\n" for i in (1, 2, 3, 4)))
    items, where = load_mbpp_items(tmp_path / "hf", "local", num_fewshot=3)
    assert [it.id for it in items] == ["11", "12"] and where.endswith("test.jsonl")
    p = items[0].completion_prompt
    assert p.index("def f2(") < p.index("def f3(") < p.index("def f4(") and "def f1(" not in p
    assert p.endswith("Your code should pass these tests:\nassert add(1, 2) == 3\n```python\n")

    orig = tmp_path / "orig" / "mbpp"
    orig.mkdir(parents=True)
    (orig / "mbpp.jsonl").write_text("".join(json.dumps(_mbpp_record(i)) + "\n" for i in (2, 3, 4, 11, 600)))
    items, _ = load_mbpp_items(tmp_path / "orig", "local", num_fewshot=3)
    assert [it.id for it in items] == ["11"]  # test split is ids 11-510

    lm = ScriptedLM(lambda p, _: "def add(a, b):\n    return a + b\n```\nassert add(1, 2) == 3")
    metrics, samples = evaluate_generation(lm, GEN_TASKS["mbpp"], items)
    assert metrics["pass@1"] == 1.0 and samples[0]["rounds"][0]["code"] == "def add(a, b):\n    return a + b"
    with pytest.raises(PLMError, match="needs 5 prompt examples"):
        load_mbpp_items(tmp_path / "orig", "local", num_fewshot=5)


def test_missing_generation_data(tmp_path: Path) -> None:
    with pytest.raises(PLMError, match=r"gsm8k: no local data at .*gsm8k/test\.jsonl"):
        load_gsm8k(tmp_path, "local")
    with pytest.raises(PLMError, match="humaneval: no local data"):
        load_humaneval_items(tmp_path, "local")
    with pytest.raises(PLMError, match="no examples"):
        evaluate_generation(ScriptedLM(lambda p, _: p), GEN_TASKS["gsm8k"], [])
    item = GenItem("0", "p", "x", "1")
    with pytest.raises(PLMError, match="mode"):
        evaluate_generation(ScriptedLM(lambda p, _: p), GEN_TASKS["gsm8k"], [item], mode="bogus")
