"""Multiple-choice tasks: each Hugging Face record layout converts to the prompt lm-eval builds;
local files load with --limit and few-shot; missing data says where it should be."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plm.errors import PLMError
from plm.eval.mc_tasks import MC_TASKS, build_context, convert_record, evaluate_mc, load_split, select_shots

# One record per task, shaped as the Hugging Face dataset serves it, with the expected conversion.
HF_RECORDS = {
    "arc_easy": ({"id": "Mercury_1", "question": "Which is a metal?",
                  "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]}, "answerKey": "B"},
                 "Question: Which is a metal?\nAnswer:", ["wood", "iron", "glass"], 1),
    "arc_challenge": ({"id": "x", "question": "Pick 2.", "choices": {"text": ["1", "2"], "label": ["1", "2"]},
                       "answerKey": "2"}, "Question: Pick 2.\nAnswer:", ["1", "2"], 1),
    "hellaswag": ({"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
                   "ctx_b": "the man", "endings": [" drives off [title] now.", "stops."], "label": "1"},
                  "Removing ice from car: Then, the man writes over the snow. The man",
                  ["drives off. now.", "stops."], 1),
    "piqa": ({"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the jar", "label": 0},
             "Question: Open a jar\nAnswer:", ["Twist the lid", "Eat the jar"], 0),
    "boolq": ({"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
              "The sky is blue.\nQuestion: is the sky blue?\nAnswer:", ["no", "yes"], 1),
    "mmlu": ({"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
              "answer": 1}, "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", ["A", "B", "C", "D"], 1),
    "cmmlu": ({"Question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "Answer": "B", "subject": "agronomy"},
              "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：", ["A", "B", "C", "D"], 1),
    "ceval": ({"id": 0, "question": "2+2=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "D",
               "explanation": "", "subject": "accountant"},
              "2+2=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：", ["A", "B", "C", "D"], 3),
    "logiqa": ({"label": "c", "context": "All cats sleep.", "question": "Does Tom sleep?",
                "options": ["no", "maybe", "yes", "never"]},
               "Passage: All cats sleep.\nQuestion: Does Tom sleep?\nChoices:\nA. no\nB. maybe\nC. yes\nD. never\nAnswer:",
               ["no", "maybe", "yes", "never"], 2),
    "mathqa": ({"Problem": "what is 10 % of 50 ?", "Rationale": "", "options": "a ) 5 , b ) 10 , c ) 2.5 , d ) 1 , e ) none",
                "correct": "a", "annotated_formula": "", "linear_formula": "", "category": "gain"},
               "Question: what is 10 % of 50 ?\nAnswer:", ["5", "10", "2.5", "1", "none"], 0),
}


@pytest.mark.parametrize("task", sorted(MC_TASKS))
def test_hf_record_converts_like_lm_eval(task: str) -> None:
    record, query, choices, gold = HF_RECORDS[task]
    ex = convert_record(MC_TASKS[task], record, "test")
    assert (ex.query, ex.choices, ex.gold) == (query, choices, gold)


def test_alternative_hf_layouts() -> None:
    ex = convert_record(MC_TASKS["boolq"], {"question": "q", "passage": "p", "answer": False}, "google/boolq")
    assert ex.gold == 0
    ex = convert_record(MC_TASKS["logiqa"], {"context": "c", "query": "q", "options": ["a", "b"],
                                             "correct_option": 1}, "lucasmccabe/logiqa")
    assert ex.gold == 1 and "Question: q\n" in ex.query
    ex = convert_record(MC_TASKS["mmlu"], {"question": "q", "choices": ["a", "b", "c", "d"], "answer": "C"}, "x")
    assert ex.gold == 2


def test_bad_records_name_the_place() -> None:
    with pytest.raises(PLMError, match=r"f\.jsonl:3: .*answerKey"):
        convert_record(MC_TASKS["arc_easy"], {"question": "q", "choices": {"text": [], "label": []}}, "f.jsonl:3")
    with pytest.raises(PLMError, match="gold index 5"):
        convert_record(MC_TASKS["piqa"], {"query": "q", "choices": ["a", "b"], "gold": 5}, "f.jsonl:1")
    with pytest.raises(PLMError, match="five choices"):
        convert_record(MC_TASKS["mathqa"], {"Problem": "p", "options": "a ) 1 , b ) 2", "correct": "a"}, "x")


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_local_layout_limit_and_subject_fewshot(tmp_path: Path) -> None:
    test = [{"question": f"Q{i}", "subject": s, "choices": ["a", "b", "c", "d"], "answer": i % 4}
            for i, s in enumerate(["anatomy", "virology", "anatomy"])]
    dev = [{"question": f"D{i}", "subject": s, "choices": ["w", "x", "y", "z"], "answer": 0}
           for i, s in enumerate(["virology", "anatomy", "anatomy", "virology"])]
    _write(tmp_path / "mmlu" / "test.jsonl", test)
    _write(tmp_path / "mmlu" / "dev.jsonl", dev)
    task = MC_TASKS["mmlu"]
    exs, where = load_split(task, "test", tmp_path, "local", limit=2)
    assert len(exs) == 2 and where.endswith("mmlu/test.jsonl")
    pool, _ = load_split(task, "dev", tmp_path, "local")
    shots = select_shots(exs[0], pool, 2)
    assert [s.query.split("\n")[0] for s in shots] == ["D1", "D2"]  # first n of the same subject
    ctx = build_context(task, exs[0], shots)
    assert ctx == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                   "D1\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
                   "D2\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
                   "Q0\nA. a\nB. b\nC. c\nD. d\nAnswer:")

    class First:
        def loglikelihood(self, requests, desc=None):
            return [(0.0 if cont == " A" else -1.0, True) for _, cont in requests]

    with pytest.raises(PLMError, match="3-shot needs 3 few-shot examples for subject 'anatomy'"):
        evaluate_mc(First(), task, exs, pool, 3)
    metrics, _ = evaluate_mc(First(), task, exs, pool, 2)
    assert metrics["acc"] == 0.5 and metrics["num_fewshot"] == 2


def test_chinese_descriptions_use_subject_names(tmp_path: Path) -> None:
    ex = convert_record(MC_TASKS["cmmlu"], HF_RECORDS["cmmlu"][0], "x")
    assert build_context(MC_TASKS["cmmlu"], ex, []).startswith("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n")
    ex = convert_record(MC_TASKS["ceval"], HF_RECORDS["ceval"][0], "x")
    assert build_context(MC_TASKS["ceval"], ex, []).startswith("以下是中国关于注册会计师的单项选择题")


def test_missing_local_data_says_where(tmp_path: Path) -> None:
    with pytest.raises(PLMError, match=r"no local data at .*hellaswag/validation\.jsonl.*Rowan/hellaswag"):
        load_split(MC_TASKS["hellaswag"], "validation", tmp_path, "local")


def test_normalised_layout_and_gzip(tmp_path: Path) -> None:
    import gzip
    p = tmp_path / "piqa" / "validation.jsonl.gz"
    p.parent.mkdir()
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"query": "Question: q\nAnswer:", "choices": ["x", "y"], "gold": 1, "id": 7}) + "\n")
    (ex,), where = load_split(MC_TASKS["piqa"], "validation", tmp_path, "auto")
    assert ex.gold == 1 and ex.id == "7" and where == str(p)
