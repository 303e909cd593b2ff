"""The embedded offline corpus for the tiny recipe: it exists on any machine with Python.

* code: the running interpreter's standard-library sources (`.py`), in sorted order
* docs: the Python language and library reference topics that ship in `pydoc_data`
* math: procedurally generated arithmetic word problems with worked solutions (`plm.data.arith`),
  train split only; the held-out test split is written separately for evaluation.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from plm.data import arith
from plm.errors import PLMError


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def write_code(out: Path, max_bytes: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    root = stdlib_dir()
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
                   and "idlelib" not in p.parts)
    total, n = 0, 0
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        if total + len(text) > max_bytes:
            break
        (out / (str(p.relative_to(root)).replace("/", "__"))).write_text(text, encoding="utf-8")
        total += len(text)
        n += 1
    if n == 0:
        raise PLMError(f"no readable standard-library sources under {root}")
    return {"files": n, "chars": total, "root": str(root)}


def write_docs(out: Path) -> dict:
    from pydoc_data.topics import topics

    out.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(topics.items()):
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
    return {"files": len(topics), "chars": sum(map(len, topics.values()))}


def math_document(p: arith.MathProblem) -> str:
    return f"Question: {p.question}\nAnswer: {p.solution}\n"


def write_math(out: Path, n: int, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    problems = arith.generate(n, seed=seed, split="train")
    with (out / "problems.jsonl").open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"text": math_document(p)}) + "\n")
    return {"problems": n, "chars": sum(len(math_document(p)) for p in problems)}


def write_embedded_corpus(out_dir: str | Path, code_bytes: int = 6_000_000, math_problems: int = 20_000,
                          math_test: int = 500, seed: int = 0) -> dict:
    """Write code/, docs/, math/ (pretraining text) and math_test.jsonl (held out, GSM8K layout)."""
    out = Path(out_dir)
    info = {"code": write_code(out / "code", code_bytes), "docs": write_docs(out / "docs"),
            "math": write_math(out / "math", math_problems, seed)}
    arith.to_jsonl(arith.generate(math_test, seed=seed, split="test"), out / "math_test.jsonl")
    info["math_test"] = {"problems": math_test}
    (out / "corpus.json").write_text(json.dumps(info, indent=2))
    return info
