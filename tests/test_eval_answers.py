"""Final-number extraction: unit cases, then every GSM8K test record round-trips."""

from __future__ import annotations

import json
import re

import pytest

from plm.errors import PLMError
from plm.data.answers import (extract_final_number, extract_reference_answer, numbers_equal,
                              score_math)
from plm.eval.code_tasks import SHARED_DATA_ENV, shared_data_dir


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 1,450,000", "1450000"),
    ("The answer is $1,234.50.", "1234.5"),
    ("So the final answer is: -7 degrees", "-7"),
    ("Thus \\boxed{42}.", "42"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\boxed{\\$1,000}", "1000"),
    ("It costs 3.50 dollars.", "3.5"),
    ("First 10 - 5 = 5, then 5 + 3 = 8.", "8"),
    ("He ends with 12.", "12"),
    ("The answer is 5. Wait, no: the answer is 6.", "6"),
    ("#### 8\n\nQuestion: Tom has 5 cats and 3 dogs.", "8"),  # runaway continuation ignored
    ("The answer is 8 \\boxed{9}", "9"),  # boxed beats 'the answer is'
    ("1,2,3", "3"),  # not a thousands group
    ("Half of it is 1/3 left", "1/3"),
    ("It was \u22124 outside", "-4"),
    ("no number here", None),
    ("", None),
])
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


def test_extract_reference_answer() -> None:
    assert extract_reference_answer("work <<2*3=6>>6\n#### 6") == "6"
    assert extract_reference_answer("blah\n#### 2,125") == "2125"
    assert extract_reference_answer("#### -3") == "-3"
    with pytest.raises(PLMError, match="####"):
        extract_reference_answer("no marker 5")


@pytest.mark.parametrize("a, b, equal", [
    ("3.50", "3.5", True), ("1,000", "1000", True), ("$5", "5", True), ("5.", "5", True),
    ("-2", "2", False), ("0.1", 0.1, True), (0.1 + 0.2, "0.3", True), ("3/4", "0.75", True),
    ("2880000", "2880001", False), ("18", "19", False), (None, "1", False), ("abc", "abc", True),
    ("abc", "1", False), (float("nan"), "1", False),
])
def test_numbers_equal(a: object, b: object, equal: bool) -> None:
    assert numbers_equal(a, b) is equal  # type: ignore[arg-type]


def test_score_math_accepts_bare_or_field_reference() -> None:
    assert score_math("so the answer is 18", "18")
    assert score_math("so the answer is 18", "Janet ... #### 18")
    assert not score_math("so the answer is 17", "18")
    assert not score_math("I don't know", "18")


def _gsm8k_records() -> list[dict[str, str]]:
    path = shared_data_dir() / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K test set not found at {path} (set {SHARED_DATA_ENV})")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_FINAL = re.compile(r"####\s*(.*)$")


def test_gsm8k_references_round_trip_and_perturbations_fail() -> None:
    records = _gsm8k_records()
    assert len(records) == 1319
    refs = [extract_reference_answer(r["answer"]) for r in records]
    assert all(re.fullmatch(r"-?\d+", ref) for ref in refs)
    failures = []
    for i, (record, ref) in enumerate(zip(records, refs)):
        answer = record["answer"]
        other = next(r for r in refs[i + 1:] + refs[:i] if r != ref)  # some other record's answer
        plus_one = _FINAL.sub(f"#### {int(ref) + 1}", answer)
        replaced = _FINAL.sub(f"#### {other}", answer)
        if not score_math(answer, ref):
            failures.append((i, "own answer rejected"))
        if score_math(plus_one, ref):
            failures.append((i, "+1 accepted"))
        if score_math(replaced, ref):
            failures.append((i, f"{other} accepted"))
    assert not failures, failures[:10]
