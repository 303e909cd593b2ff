"""Procedural arithmetic problems: determinism, correct worked solutions, disjoint splits."""
import json
import re

import pytest

from plm.data.arith import (
    TEMPLATES, MathProblem, as_chat, generate, is_correct, split_of, to_jsonl,
)
from plm.errors import PLMError

CALC = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def check_solution(p: MathProblem) -> None:
    lines = p.solution.split("\n")
    assert lines[-1] == f"#### {p.answer}", p.solution
    last = None
    for i, line in enumerate(lines[:-1], start=1):
        assert line.startswith(f"{i}. "), line
        calcs = CALC.findall(line)
        assert len(calcs) == 1, line  # one written-out computation per step
        a, op, b, c = calcs[0]
        a, b, c = int(a), int(b), int(c)
        if op == "/":
            assert b != 0 and a % b == 0 and a // b == c, line
        else:
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, line
        last = c
    assert last == p.answer, p.solution


@pytest.fixture(scope="module")
def train():
    return generate(1000, seed=0, split="train")


def test_deterministic(train):
    assert generate(1000, seed=0, split="train") == train
    assert generate(50, seed=1) != train[:50]
    assert generate(20, seed=5, split="test", difficulty=2) == generate(20, seed=5, split="test", difficulty=2)


def test_solutions_are_correct(train):
    for p in train:
        check_solution(p)
    for level in (1, 2, 3):
        for p in generate(200, seed=3, difficulty=level):
            assert p.level == level
            check_solution(p)
    for p in generate(300, seed=3, split="test"):
        check_solution(p)


def test_difficulty_grows():
    def mean_steps(level):
        ps = generate(300, seed=4, difficulty=level)
        return sum(p.solution.count("\n") for p in ps) / len(ps)

    def mean_answer(level):
        ps = generate(300, seed=4, difficulty=level)
        return sum(p.answer for p in ps) / len(ps)

    assert mean_steps(1) < mean_steps(2) < mean_steps(3)
    assert mean_answer(1) < mean_answer(3)


def test_train_test_disjoint(train):
    test = generate(300, seed=0, split="test")
    # Same seed, other seeds, other difficulties: membership depends only on the question text.
    more_train = train + generate(1000, seed=7, split="train", difficulty=3)
    assert not {p.question for p in test} & {p.question for p in more_train}
    assert all(split_of(p.question) == "test" for p in test)
    assert all(split_of(p.question) == "train" for p in more_train)


def test_variety(train):
    assert len({p.question for p in train}) == 1000  # distinct within a call
    assert {p.template for p in train} == set(TEMPLATES) and len(TEMPLATES) >= 8
    assert {p.level for p in train} == {1, 2, 3}
    assert len({p.answer for p in train}) > 200


def test_jsonl_and_chat(tmp_path, train):
    path = to_jsonl(train[:5], tmp_path / "gsm.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"question", "answer"}] * 5
    assert rows[0]["question"] == train[0].question
    assert rows[0]["answer"].endswith(f"#### {train[0].answer}")
    chat = as_chat(train[0], system="You are helpful.")
    assert [m["role"] for m in chat] == ["system", "user", "assistant"]
    assert chat[2]["content"] == train[0].solution
    assert [m["role"] for m in as_chat(train[0])] == ["user", "assistant"]


def test_answer_extraction(train):
    p = train[0]
    assert is_correct(p, p.solution)
    assert not is_correct(p, f"#### {p.answer + 1}")


def test_bad_settings():
    with pytest.raises(PLMError, match="split"):
        generate(1, split="dev")
    with pytest.raises(PLMError, match="difficulty"):
        generate(1, difficulty=4)
    with pytest.raises(PLMError, match="template"):
        generate(1, templates=["algebra"])
    with pytest.raises(PLMError, match="distinct"):
        generate(5000, seed=0, difficulty=1, templates=["sharing"])  # space too small
