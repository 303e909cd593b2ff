"""Procedural arithmetic word problems with worked, verifiable solutions (offline tiny recipe).

Every problem comes with a GSM8K-style solution: numbered steps, each writing out one
computation `a op b = c` with integer operands and result, then a final line `#### N`.
The same generator feeds the pretraining corpus, SFT data, ARIES prompts and the held-out
evaluation, so train and test are split by a hash of the question text: a question belongs
to exactly one split, whatever the seed, and the two can never share a question.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from plm.errors import PLMError

TEST_PERCENT = 10  # share of all possible questions that belong to the held-out split
LEVELS = (1, 2, 3)  # 1: one or two steps, small numbers; 3: three or four steps, larger numbers


@dataclass(frozen=True)
class MathProblem:
    question: str
    solution: str  # numbered steps, then "#### <answer>"
    answer: int
    template: str = ""
    level: int = 0


NAMES = (
    "Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira",
    "Liam", "Maya", "Noah", "Olivia", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor",
    "Wen", "Ximena", "Yusuf", "Zoe", "Aiko", "Bruno", "Carmen", "Dev", "Elena", "Felix",
)
GOODS = (  # (singular, plural)
    ("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"), ("mug", "mugs"),
    ("book", "books"), ("scarf", "scarves"), ("candle", "candles"), ("plant", "plants"),
    ("ticket", "tickets"), ("sandwich", "sandwiches"), ("toy car", "toy cars"), ("lamp", "lamps"),
)
THINGS = ("marbles", "stickers", "cards", "shells", "stamps", "beads", "coins", "buttons")
SNACKS = ("cookies", "muffins", "cupcakes", "brownies", "crackers", "dumplings")
PRODUCTS = ("bottles", "toys", "chairs", "boxes", "shirts", "bricks", "cups", "phone cases")
PLANTS = ("tomato plants", "rose bushes", "carrots", "sunflowers", "lettuces", "pepper plants")
VEHICLES = ("car", "bus", "train", "van", "motorbike")


def _num(rng: random.Random, level: int, small: int = 9, medium: int = 30, large: int = 200, lo: int = 2) -> int:
    """A positive integer whose size grows with the level."""
    return rng.randint(lo, (small, medium, large)[level - 1])


class _Steps:
    """Collects numbered solution steps; each step computes one binary operation."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def op(self, a: int, sym: str, b: int, text: str) -> int:
        if sym == "+":
            c = a + b
        elif sym == "-":
            c = a - b
        elif sym == "*":
            c = a * b
        else:
            assert a % b == 0, (a, b)  # templates construct exact divisions
            c = a // b
        assert c >= 0, (a, sym, b)
        self.lines.append(f"{len(self.lines) + 1}. {text.format(calc=f'{a} {sym} {b} = {c}', c=c)}")
        return c

    def solution(self, answer: int) -> str:
        return "\n".join(self.lines + [f"#### {answer}"])


Template = Callable[[random.Random, int], tuple[str, _Steps, int]]


def _shopping(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    name = rng.choice(NAMES)
    (s1, p1), (s2, p2) = rng.sample(GOODS, 2)
    n1, c1 = _num(rng, level, 6, 12, 40), _num(rng, level, 9, 25, 80, lo=1)
    st = _Steps()
    a = st.op(n1, "*", c1, f"The {p1} cost {{calc}} dollars.")
    if level == 1:
        q = f"{name} buys {n1} {p1} that cost {c1} dollars each. How many dollars does {name} spend?"
        return q, st, a
    n2, c2 = _num(rng, level, 6, 12, 40), _num(rng, level, 9, 25, 80, lo=1)
    b = st.op(n2, "*", c2, f"The {p2} cost {{calc}} dollars.")
    total = st.op(a, "+", b, f"Altogether {name} spends {{calc}} dollars.")
    q = f"{name} buys {n1} {p1} at {c1} dollars each and {n2} {p2} at {c2} dollars each."
    if level == 2:
        return q + f" How many dollars does {name} spend in total?", st, total
    bill = (total // 100 + 1 + rng.randint(0, 2)) * 100
    change = st.op(bill, "-", total, f"The change from {bill} dollars is {{calc}} dollars.")
    return q + f" {name} pays with {bill} dollars. How much change does {name} get?", st, change


def _sharing(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    name, friend = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    k = rng.randint(2, (4, 8, 12)[level - 1])
    each = _num(rng, level, 6, 15, 60) + (2 if level == 3 else 0)
    total = k * each
    st = _Steps()
    if level == 1:
        q = f"{name} has {total} {thing} and shares them equally among {k} friends. How many {thing} does each friend get?"
        return q, st, st.op(total, "/", k, f"Each friend gets {{calc}} {thing}.")
    got = rng.randint(1, total - 1)
    had = total - got
    st.op(had, "+", got, f"{name} has {{calc}} {thing} after {friend}'s gift.")
    share = st.op(total, "/", k, f"Each friend gets {{calc}} {thing}.")
    q = (f"{name} has {had} {thing}. {friend} gives {name} {got} more. {name} then shares all "
         f"the {thing} equally among {k} friends.")
    if level == 2:
        return q + f" How many {thing} does each friend get?", st, share
    lost = rng.randint(1, share - 1)
    left = st.op(share, "-", lost, f"Each friend keeps {{calc}} {thing}.")
    return q + f" Each friend loses {lost} of theirs. How many {thing} does each friend have left?", st, left


def _production(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    product = rng.choice(PRODUCTS)
    rate, hours = _num(rng, level, 9, 30, 120), rng.randint(2, (5, 8, 12)[level - 1])
    st = _Steps()
    daily = st.op(rate, "*", hours, f"In one day the machine makes {{calc}} {product}.")
    q = f"A machine makes {rate} {product} every hour and runs for {hours} hours a day."
    if level == 1:
        return q + f" How many {product} does it make in a day?", st, daily
    days = rng.randint(2, (5, 7, 14)[level - 1])
    if level == 2:
        total = st.op(daily, "*", days, f"In {days} days it makes {{calc}} {product}.")
        return q + f" How many {product} does it make in {days} days?", st, total
    bad = rng.randint(1, daily - 1)
    good = st.op(daily, "-", bad, f"Each day {{calc}} {product} are good.")
    total = st.op(good, "*", days, f"In {days} days there are {{calc}} good {product}.")
    return (q + f" Each day {bad} of them are faulty. How many good {product} does it make in {days} days?",
            st, total)


def _travel(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    vehicle = rng.choice(VEHICLES)
    s1, t1 = _num(rng, level, 30, 60, 110, lo=10), rng.randint(2, (4, 5, 6)[level - 1])
    st = _Steps()
    d1 = st.op(s1, "*", t1, f"First the {vehicle} covers {{calc}} km.")
    q = f"A {vehicle} travels at {s1} km per hour for {t1} hours."
    if level == 1:
        return q + " How many kilometres does it travel?", st, d1
    s2, t2 = _num(rng, level, 30, 60, 110, lo=10), rng.randint(2, 5)
    d2 = st.op(s2, "*", t2, "Then it covers {calc} km.")
    both = st.op(d1, "+", d2, "Together that is {calc} km.")
    q += f" Then it travels at {s2} km per hour for {t2} hours."
    if level == 2:
        return q + " How many kilometres does it travel in total?", st, both
    trip = both + rng.randint(5, 400)
    left = st.op(trip, "-", both, "The distance still to go is {calc} km.")
    return q + f" The whole trip is {trip} km. How many kilometres are left?", st, left


def _savings(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    name = rng.choice(NAMES)
    weekly, weeks = _num(rng, level, 9, 25, 90), rng.randint(2, (6, 12, 20)[level - 1])
    st = _Steps()
    saved = st.op(weekly, "*", weeks, f"{name} saves {{calc}} dollars.")
    q = f"{name} saves {weekly} dollars every week for {weeks} weeks."
    if level == 1:
        return q + f" How many dollars does {name} save?", st, saved
    if level == 2:
        spent = rng.randint(1, saved - 1)
        left = st.op(saved, "-", spent, f"After the purchase {name} has {{calc}} dollars.")
        return q + f" Then {name} spends {spent} dollars on a bike. How many dollars are left?", st, left
    k = rng.randint(2, min(5, saved - 1))  # saved >= 4, so k < saved and something is spent
    spent = saved - k * rng.randint(1, (saved - 1) // k)
    left = st.op(saved, "-", spent, f"After the purchase {name} has {{calc}} dollars.")
    part = st.op(left, "/", k, f"Each of the {k} siblings gets {{calc}} dollars.")
    return (q + f" Then {name} spends {spent} dollars on a bike and shares the rest equally with "
            f"{k} siblings, giving all of it away. How many dollars does each sibling get?", st, part)


def _garden(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    name = rng.choice(NAMES)
    plant = rng.choice(PLANTS)
    rows, per_row = rng.randint(2, (6, 12, 30)[level - 1]), _num(rng, level, 9, 20, 40)
    st = _Steps()
    total = st.op(rows, "*", per_row, f"The garden has {{calc}} {plant}.")
    q = f"{name} plants {rows} rows of {plant} with {per_row} in each row."
    if level == 1:
        return q + f" How many {plant} are there?", st, total
    if level == 2:
        died = rng.randint(1, total - 1)
        alive = st.op(total, "-", died, f"{{calc}} {plant} survive.")
        return q + f" {died} of them do not survive. How many {plant} are left?", st, alive
    groups = rng.randint(2, min(6, total - 1))  # total >= 4, so at least one plant dies
    died = total - groups * rng.randint(1, (total - 1) // groups)
    alive = st.op(total, "-", died, f"{{calc}} {plant} survive.")
    each = st.op(alive, "/", groups, f"Each neighbour gets {{calc}} {plant}.")
    return (q + f" {died} of them do not survive, and {name} gives the rest equally to {groups} "
            f"neighbours. How many {plant} does each neighbour get?", st, each)


def _bakery(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    snack = rng.choice(SNACKS)
    per_box, boxes = rng.choice((4, 6, 8, 10, 12)), _num(rng, level, 9, 30, 80)
    baked = per_box * boxes
    st = _Steps()
    n_boxes = st.op(baked, "/", per_box, "The bakery fills {calc} boxes.")
    q = f"A bakery bakes {baked} {snack} and packs them in boxes of {per_box}."
    if level == 1:
        return q + " How many boxes does it fill?", st, n_boxes
    price = _num(rng, level, 9, 15, 30, lo=3)
    revenue = st.op(n_boxes, "*", price, "Selling every box brings in {calc} dollars.")
    q += f" Each box sells for {price} dollars."
    if level == 2:
        return q + " How many dollars does the bakery make by selling all the boxes?", st, revenue
    cost = rng.randint(1, revenue - 1)
    profit = st.op(revenue, "-", cost, "The profit is {calc} dollars.")
    return q + f" The ingredients cost {cost} dollars. What is the profit in dollars?", st, profit


def _collection(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    name, friend = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    start = _num(rng, level, 20, 80, 500, lo=5)
    packs, per_pack = rng.randint(2, (4, 8, 15)[level - 1]), _num(rng, level, 6, 12, 25)
    st = _Steps()
    bought = st.op(packs, "*", per_pack, f"The packs hold {{calc}} {thing}.")
    now = st.op(start, "+", bought, f"{name} then has {{calc}} {thing}.")
    q = f"{name} has {start} {thing} and buys {packs} packs with {per_pack} {thing} in each."
    if level <= 2:
        return q + f" How many {thing} does {name} have now?", st, now
    given = rng.randint(1, now - 1)
    left = st.op(now, "-", given, f"After giving some to {friend}, {name} has {{calc}} {thing}.")
    return q + f" Then {name} gives {given} {thing} to {friend}. How many {thing} does {name} have left?", st, left


def _reading(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    name = rng.choice(NAMES)
    per_day, days = _num(rng, level, 9, 25, 40, lo=3), rng.randint(2, (5, 8, 10)[level - 1])
    st = _Steps()
    read = st.op(per_day, "*", days, f"{name} reads {{calc}} pages.")
    if level == 1:
        q = f"{name} reads {per_day} pages a day for {days} days. How many pages does {name} read?"
        return q, st, read
    faster = per_day + rng.randint(1, 10)
    rest_days = rng.randint(1, (1, 6, 12)[level - 1])
    pages = read + faster * rest_days
    q = f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days."
    left = st.op(pages, "-", read, "{calc} pages are left.")
    if level == 2:
        return q + " How many pages are left?", st, left
    more = st.op(left, "/", faster, f"At {faster} pages a day the rest takes {{calc}} days.")
    return q + f" Then {name} reads {faster} pages a day. How many more days does {name} need to finish?", st, more


def _school_trip(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    classes, per_class = rng.randint(2, (4, 6, 10)[level - 1]), _num(rng, level, 12, 30, 35, lo=8)
    st = _Steps()
    students = st.op(classes, "*", per_class, "There are {calc} students.")
    q = f"A school sends {classes} classes of {per_class} students on a trip."
    if level == 1:
        return q + " How many students go on the trip?", st, students
    seats = rng.choice([s for s in (10, 12, 15, 20, 25, 30, 40, 50) if s <= students])
    buses = -(-(students + 1) // seats)  # enough full buses to fit everyone plus some teachers
    teachers = buses * seats - students
    people = st.op(students, "+", teachers, "With the teachers that is {calc} people.")
    q += f" {teachers} teachers go with them."
    if level == 2:
        return q + " How many people go on the trip?", st, people
    n = st.op(people, "/", seats, f"Full buses of {seats} people make {{calc}} buses.")
    return q + f" Every bus carries exactly {seats} people and all buses are full. How many buses are there?", st, n


def _wages(rng: random.Random, level: int) -> tuple[str, _Steps, int]:
    name = rng.choice(NAMES)
    wage, hours = _num(rng, level, 9, 20, 45, lo=5), rng.randint(2, (6, 8, 10)[level - 1])
    st = _Steps()
    pay = st.op(wage, "*", hours, "Regular pay is {calc} dollars.")
    q = f"{name} earns {wage} dollars an hour and works {hours} hours."
    if level == 1:
        return q + f" How many dollars does {name} earn?", st, pay
    extra = rng.randint(1, (1, 5, 8)[level - 1])
    if level == 2:
        bonus = _num(rng, level, 9, 50, 100, lo=5)
        total = st.op(pay, "+", bonus, f"With the bonus {name} earns {{calc}} dollars.")
        return q + f" {name} also gets a bonus of {bonus} dollars. How many dollars does {name} earn in total?", st, total
    rate = st.op(wage, "*", 2, "The overtime rate is {calc} dollars an hour.")
    over = st.op(rate, "*", extra, "Overtime pay is {calc} dollars.")
    total = st.op(pay, "+", over, f"In total {name} earns {{calc}} dollars.")
    return (q + f" {name} also works {extra} hours of overtime at twice the hourly rate. "
            f"How many dollars does {name} earn in total?", st, total)


TEMPLATES: dict[str, Template] = {
    "shopping": _shopping,
    "sharing": _sharing,
    "production": _production,
    "travel": _travel,
    "savings": _savings,
    "garden": _garden,
    "bakery": _bakery,
    "collection": _collection,
    "reading": _reading,
    "school_trip": _school_trip,
    "wages": _wages,
}


def split_of(question: str) -> str:
    """'test' or 'train', a pure function of the question text (so the splits never overlap)."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def make_problem(rng: random.Random, level: int, template: str | None = None) -> MathProblem:
    """One problem from `rng` (any split)."""
    name = template or rng.choice(sorted(TEMPLATES))
    if name not in TEMPLATES:
        raise PLMError(f"arith: unknown template {name!r}; choose from {', '.join(sorted(TEMPLATES))}")
    question, steps, answer = TEMPLATES[name](rng, level)
    return MathProblem(question, steps.solution(answer), answer, template=name, level=level)


def generate(n: int, seed: int = 0, split: str = "train", difficulty: int | None = None,
             templates: Iterable[str] | None = None) -> list[MathProblem]:
    """`n` distinct problems of `split`, deterministic from `seed`.

    difficulty: 1, 2 or 3, or None for an even mix. Candidates from the other split are
    skipped, so train and test drawn with the same seed (or any seeds) are disjoint.
    """
    if split not in ("train", "test"):
        raise PLMError(f"arith: split must be 'train' or 'test', got {split!r}")
    if difficulty is not None and difficulty not in LEVELS:
        raise PLMError(f"arith: difficulty must be 1, 2, 3 or None (mixed), got {difficulty!r}")
    if n < 0:
        raise PLMError(f"arith: n must be >= 0, got {n}")
    names = sorted(templates) if templates is not None else sorted(TEMPLATES)
    for name in names:
        if name not in TEMPLATES:
            raise PLMError(f"arith: unknown template {name!r}; choose from {', '.join(sorted(TEMPLATES))}")
    # Seed the stream per split so test does not just replay (and reject) train's candidates.
    rng = random.Random(f"plm-arith:{seed}:{split}")
    out: list[MathProblem] = []
    seen: set[str] = set()
    misses, max_misses = 0, 20_000  # a long dry run means the question space is used up
    while len(out) < n:
        if misses >= max_misses:
            raise PLMError(
                f"arith: only {len(out)} distinct {split} problems found ({max_misses} tries in a row "
                f"gave none new); ask for fewer or widen difficulty/templates"
            )
        level = difficulty if difficulty is not None else rng.choice(LEVELS)
        problem = make_problem(rng, level, rng.choice(names))
        if problem.question in seen or split_of(problem.question) != split:
            misses += 1
            continue
        misses = 0
        seen.add(problem.question)
        out.append(problem)
    return out


def to_jsonl(problems: Iterable[MathProblem], path: str | Path) -> Path:
    """GSM8K layout: one {"question", "answer"} object a line, answer = solution ending '#### N'."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"question": p.question, "answer": p.solution}, ensure_ascii=False) + "\n")
    return path


def as_chat(problem: MathProblem, system: str | None = None) -> list[dict[str, str]]:
    """[system?], user question, assistant worked solution."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "content": problem.solution},
    ]


def is_correct(problem: MathProblem, text: str) -> bool:
    """Verifier for rule-based selection and evaluation: final-number match (the same
    extraction GSM8K evaluation uses)."""
    from plm.data.answers import score_math
    return score_math(text, str(problem.answer))
