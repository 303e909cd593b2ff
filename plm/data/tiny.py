"""Offline SFT data and ARIES prompts for the tiny embedded default (no network, any Python).

* `tiny_general`: "general" phase-1 chats: explanations drawn from the Python documentation that
  ships with the interpreter (pydoc topics, builtin and str/list/dict method docstrings,
  stdlib module docstrings) plus simple verifiable instruction-following templates.
* `arith`: worked arithmetic word problems (plm.data.arith, train split) as chats.
* `tiny_code`: small "write a Python function" tasks with reference solutions; `tiny_code_tasks`
  gives the same tasks with unit tests for code scoring.
"""
from __future__ import annotations

import builtins
import importlib
import random
import re
from dataclasses import dataclass
from typing import Callable

from plm.data import arith as arith_gen
from plm.errors import ConfigError

Chat = list[dict]

WORDS = ("river", "mountain", "lamp", "garden", "pencil", "window", "orange", "silver", "cloud", "rabbit",
         "forest", "castle", "bread", "planet", "guitar", "winter", "candle", "harbor", "market", "dragon",
         "yellow", "ocean", "bridge", "kitten", "paper", "rocket", "island", "coffee", "tiger", "violet")
CATEGORIES = {
    "colors": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"),
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "kiwi"),
    "animals": ("cat", "dog", "horse", "rabbit", "tiger", "lion", "zebra", "otter", "eagle", "whale"),
    "Python keywords": ("def", "class", "return", "if", "else", "for", "while", "import", "yield", "lambda"),
    "planets": ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"),
}
MODULES = ("json", "os", "re", "math", "random", "string", "collections", "itertools", "functools",
           "pathlib", "datetime", "textwrap", "statistics", "fractions", "decimal", "heapq", "bisect",
           "copy", "csv", "argparse", "logging", "shutil", "tempfile", "glob", "fnmatch", "hashlib",
           "base64", "struct", "difflib", "pprint", "enum", "dataclasses", "typing", "abc", "operator",
           "contextlib", "time", "calendar", "zlib", "gzip", "pickle", "queue", "threading", "uuid", "html")


def _excerpt(text: str, limit: int = 420) -> str:
    """The first paragraphs of a doc text, cut at a sentence end near `limit` characters."""
    text = re.sub(r"\n[*=\-]{3,}\n", "\n", text.strip())
    paras = [p.strip("\n").rstrip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out = ""
    for p in paras:
        if out and len(out) + len(p) > limit:
            break
        out = f"{out}\n\n{p}" if out else p
    if len(out) > limit:
        cut = out.rfind(". ", 0, limit)
        out = out[: cut + 1] if cut > limit // 3 else out[:limit]
    return out.strip()


def doc_chats() -> list[Chat]:
    """Explanations from the interpreter's own documentation."""
    from pydoc_data.topics import topics
    chats = []
    asks = ("Explain the Python topic: {t}.", "What does the Python reference say about {t}?",
            "Give a short description of {t} in Python.")
    for i, (key, text) in enumerate(sorted(topics.items())):
        title = text.strip().splitlines()[0].strip() or key
        chats.append(_chat(asks[i % len(asks)].format(t=title), _excerpt(text)))
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        doc = getattr(obj, "__doc__", None)
        if name.startswith("_") or not callable(obj) or not doc or isinstance(obj, type) and issubclass(obj, BaseException):
            continue
        chats.append(_chat(f"What does the built-in `{name}` do in Python?", _excerpt(doc, 360)))
    for tname, typ in (("str", str), ("list", list), ("dict", dict)):
        for m in sorted(vars(typ)):
            doc = getattr(getattr(typ, m), "__doc__", None)
            if m.startswith("_") or not doc:
                continue
            chats.append(_chat(f"What does the method `{tname}.{m}` do?", _excerpt(doc, 300)))
    for mod in MODULES:
        try:
            doc = importlib.import_module(mod).__doc__
        except ImportError:
            continue
        if doc:
            chats.append(_chat(f"What is the Python module `{mod}` for?", _excerpt(doc, 360)))
    return [c for c in chats if c[1]["content"]]


def _chat(user: str, assistant: str) -> Chat:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def instruction_chat(rng: random.Random) -> Chat:
    """One simple, verifiable instruction-following exchange."""
    kind = rng.randrange(10)
    ws = rng.sample(WORDS, rng.randint(3, 6))
    nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 7))]
    nums_s = ", ".join(map(str, nums))
    if kind == 0:
        w, k = rng.choice(WORDS), rng.randint(2, 5)
        return _chat(f"Repeat the word \"{w}\" {k} times, separated by spaces.", " ".join([w] * k))
    if kind == 1:
        return _chat(f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws)))
    if kind == 2:
        return _chat(f"Rewrite this in capital letters: {' '.join(ws)}", " ".join(ws).upper())
    if kind == 3:
        return _chat(f"Sort these numbers from smallest to largest: {nums_s}", ", ".join(map(str, sorted(nums))))
    if kind == 4:
        return _chat(f"Which is the largest number in this list: {nums_s}?", f"The largest number is {max(nums)}.")
    if kind == 5:
        return _chat(f"How many words are in this sentence: \"{' '.join(ws)}\"?", f"There are {len(ws)} words.")
    if kind == 6:
        return _chat(f"Write the first letter of each word: {' '.join(ws)}", " ".join(w[0] for w in ws))
    if kind == 7:
        cat = rng.choice(sorted(CATEGORIES))
        k = rng.randint(2, 5)
        items = rng.sample(CATEGORIES[cat], k)
        return _chat(f"List {k} {cat}.", "\n".join(f"{i + 1}. {x}" for i, x in enumerate(items)))
    if kind == 8:
        return _chat(f"Join these words with commas: {' '.join(ws)}", ", ".join(ws))
    w = rng.choice(WORDS)
    return _chat(f"Spell the word \"{w}\" letter by letter.", "-".join(w))


def tiny_general(n: int = 2000, seed: int = 0, docs_share: float = 0.35) -> list[Chat]:
    """Phase-1 chats: documentation explanations (cycled) and instruction templates."""
    rng = random.Random(f"tiny-general:{seed}")
    n_docs = int(round(n * docs_share))
    docs = doc_chats() if n_docs else []
    rng.shuffle(docs)
    out = [docs[i % len(docs)] for i in range(n_docs)]
    out += [instruction_chat(rng) for _ in range(n - n_docs)]
    rng.shuffle(out)
    return out


def arith_problems(n: int, seed: int = 0, skip: int = 0, split: str = "train",
                   difficulty: int | None = None) -> list[arith_gen.MathProblem]:
    """Problems [skip, skip + n) of the deterministic stream for (seed, split, difficulty):
    with the same seed and difficulty, `skip` = the SFT source's n gives problems SFT never saw."""
    return arith_gen.generate(skip + n, seed=seed, split=split, difficulty=difficulty)[skip:]


def arith(n: int = 3000, seed: int = 1, skip: int = 0, difficulty: int | None = None,
          refine: float = 0.0, refine_keep: float = 0.0) -> list[Chat]:
    """Worked arithmetic problems (train split) as user question -> assistant solution chats.

    refine: for this fraction of the problems, also a refinement chat z(x, y_l) -> y_w (the
    ARIES-SFT form, plm.data.chat) where y_l is a wrong answer made from the correct one
    (a miscomputed or miscopied last step, or another problem's solution) and y_w the worked
    solution; y_l is context only (no loss). refine_keep: the share of those whose earlier
    answer is already correct, so the model also learns to keep a right answer."""
    problems = arith_problems(n, seed, skip, "train", difficulty)
    out = [arith_gen.as_chat(p) for p in problems]
    if refine > 0:
        from plm.data.chat import refinement_messages
        rng = random.Random(f"arith-refine:{seed}:{skip}")
        for i in sorted(rng.sample(range(len(problems)), int(round(refine * len(problems))))):
            p = problems[i]
            other = problems[rng.randrange(len(problems))]
            earlier = p.solution if rng.random() < refine_keep else corrupt_solution(p, other, rng)
            z = refinement_messages(p.question, earlier)
            z[-2]["train"] = False  # the earlier (wrong) answer is context, never a target
            out.append(z + [{"role": "assistant", "content": p.solution}])
    return out


_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def corrupt_solution(p: arith_gen.MathProblem, other: arith_gen.MathProblem, rng: random.Random) -> str:
    """A plausible wrong answer to `p`: its last step miscomputed or with a miscopied operand,
    or (a third of the time) the solution of another problem; the final answer always differs."""
    lines = p.solution.split("\n")
    kind = rng.randrange(3)
    if kind == 2 and other.answer != p.answer:
        return other.solution
    last = len(lines) - 2  # the last numbered step, before "#### N"
    m = _STEP.search(lines[last])
    if not m:
        return other.solution if other.answer != p.answer else f"{p.solution.rsplit('####', 1)[0]}#### {p.answer + 1}"
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    if kind == 0:  # miscomputed result
        wrong = c + rng.choice([-1, 1]) * rng.randint(1, max(2, c // 4 + 1))
        wrong = wrong if wrong >= 0 and wrong != c else c + 1
        new_step = f"{a} {op} {b} = {wrong}"
    else:  # miscopied operand, correctly computed
        a2 = a + rng.choice([-1, 1]) * rng.randint(1, max(2, a // 3 + 1))
        a2 = a2 if a2 > 0 and a2 != a else a + 1
        wrong = {"+": a2 + b, "-": a2 - b, "*": a2 * b, "/": a2 // b if b else a2}[op]
        if wrong == c or wrong < 0:
            wrong = c + 1
            new_step = f"{a} {op} {b} = {wrong}"
        else:
            new_step = f"{a2} {op} {b} = {wrong}"
    lines[last] = lines[last][:m.start()] + new_step + lines[last][m.end():]
    lines[-1] = f"#### {wrong}"
    return "\n".join(lines)


# ---- code ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeTemplate:
    ask: str  # with {f}
    body: str  # with {f}; the reference solution
    tests: tuple[str, ...]  # asserts with {f}


CODE_TEMPLATES = (
    CodeTemplate("Write a Python function `{f}(a, b)` that returns the sum of a and b.",
                 "def {f}(a, b):\n    return a + b", ("assert {f}(2, 3) == 5", "assert {f}(-1, 1) == 0")),
    CodeTemplate("Write a Python function `{f}(xs)` that returns the sum of the numbers in the list xs.",
                 "def {f}(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total",
                 ("assert {f}([1, 2, 3]) == 6", "assert {f}([]) == 0")),
    CodeTemplate("Write a Python function `{f}(xs)` that returns the largest number in the list xs.",
                 "def {f}(xs):\n    best = xs[0]\n    for x in xs[1:]:\n        if x > best:\n            best = x\n    return best",
                 ("assert {f}([3, 9, 2]) == 9", "assert {f}([-5, -2]) == -2")),
    CodeTemplate("Write a Python function `{f}(s)` that returns the string s reversed.",
                 "def {f}(s):\n    return s[::-1]", ("assert {f}('abc') == 'cba'", "assert {f}('') == ''")),
    CodeTemplate("Write a Python function `{f}(n)` that returns True if n is even and False otherwise.",
                 "def {f}(n):\n    return n % 2 == 0", ("assert {f}(4) is True", "assert {f}(7) is False")),
    CodeTemplate("Write a Python function `{f}(n)` that returns the factorial of n.",
                 "def {f}(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
                 ("assert {f}(0) == 1", "assert {f}(5) == 120")),
    CodeTemplate("Write a Python function `{f}(s)` that counts the vowels in the string s.",
                 "def {f}(s):\n    return sum(1 for c in s.lower() if c in 'aeiou')",
                 ("assert {f}('banana') == 3", "assert {f}('xyz') == 0")),
    CodeTemplate("Write a Python function `{f}(xs)` that returns a list of the squares of the numbers in xs.",
                 "def {f}(xs):\n    return [x * x for x in xs]", ("assert {f}([1, 2, 3]) == [1, 4, 9]", "assert {f}([]) == []")),
    CodeTemplate("Write a Python function `{f}(xs)` that returns only the even numbers of the list xs.",
                 "def {f}(xs):\n    return [x for x in xs if x % 2 == 0]",
                 ("assert {f}([1, 2, 3, 4]) == [2, 4]", "assert {f}([1, 3]) == []")),
    CodeTemplate("Write a Python function `{f}(a, b)` that returns the larger of a and b.",
                 "def {f}(a, b):\n    if a > b:\n        return a\n    return b", ("assert {f}(2, 9) == 9", "assert {f}(4, -1) == 4")),
    CodeTemplate("Write a Python function `{f}(s)` that returns True if the string s is a palindrome.",
                 "def {f}(s):\n    return s == s[::-1]", ("assert {f}('level') is True", "assert {f}('abc') is False")),
    CodeTemplate("Write a Python function `{f}(xs)` that returns the average of the numbers in xs.",
                 "def {f}(xs):\n    return sum(xs) / len(xs)", ("assert {f}([2, 4]) == 3", "assert {f}([5]) == 5")),
)
FUNC_NAMES = ("solve", "compute", "result", "answer", "func", "helper", "calc", "process", "do_it", "run_task")


def _code_task(rng: random.Random) -> tuple[str, str, str]:
    t = rng.choice(CODE_TEMPLATES)
    f = rng.choice(FUNC_NAMES)
    return t.ask.format(f=f), "```python\n" + t.body.format(f=f) + "\n```", "\n".join(x.format(f=f) for x in t.tests)


def tiny_code(n: int = 300, seed: int = 0) -> list[Chat]:
    rng = random.Random(f"tiny-code:{seed}")
    return [_chat(q, a) for q, a, _ in (_code_task(rng) for _ in range(n))]


def tiny_code_tasks(n: int = 50, seed: int = 0) -> list[dict]:
    """{prompt, solution, tests} for code scoring: tests are asserts run in the sandbox."""
    rng = random.Random(f"tiny-code:{seed}")
    return [{"prompt": q, "solution": a, "tests": t} for q, a, t in (_code_task(rng) for _ in range(n))]


BUILDERS: dict[str, Callable[..., list[Chat]]] = {
    "tiny_general": tiny_general,
    "arith": arith,
    "tiny_code": tiny_code,
}


def check_builder(name: str) -> Callable[..., list[Chat]]:
    if name not in BUILDERS:
        raise ConfigError(f"unknown SFT data builder {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name]
