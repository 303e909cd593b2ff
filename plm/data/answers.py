"""Final-number extraction and comparison for math word problems.

Shared by GSM8K evaluation and the ARIES math verifier, so both grade the same way.
Numbers are compared exactly as fractions: "3.50" equals "3.5", "1,000" equals "1000".
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from plm.errors import PLMError

# One number as written in prose: optional sign and "$", thousands commas only in proper
# groups ("1,2,3" stays three numbers), optional decimals, optional "/denominator".
# The look-behind keeps "10-5" from reading as "-5" and "x2" from reading as "2";
# "- 5" is not negative either, so "10 - 5" ends in 5.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\$\s?)?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?!\d)")
_GSM8K_MARK = re.compile(r"####([^\n]*)")
# No capture of the rest of the line: two markers on one line must both be found.
_ANSWER_IS = re.compile(r"answer\s*(?:is|was|:|=)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_FRAC = re.compile(r"\\d?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
# Typographic variants models emit for "-" and thousands separators.
_TRANSLATE = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2009": "", "\u202f": ""})


def parse_number(text: str) -> Fraction | None:
    """Exact value of one written number ("$1,200.50", "-3", "3/4"), or None if it is not one."""
    s = text.translate(_TRANSLATE).strip().rstrip(".").replace(",", "").replace("$", "")
    s = s.replace(" ", "")
    if s.startswith("--"):
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(Decimal(num)) / Fraction(Decimal(den))
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text for a value: "18", "3.5", "-0.25", or "1/3" when no finite decimal exists."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".")


def _first_number(text: str) -> Fraction | None:
    text = _FRAC.sub(r"\1/\2", text)
    for match in _NUMBER.finditer(text.translate(_TRANSLATE)):
        value = parse_number(match.group())
        if value is not None:
            return value
    return None


def extract_reference_answer(gsm8k_answer_field: str) -> str:
    """The canonical final answer of a GSM8K ``answer`` field (the text after '####')."""
    if "####" not in gsm8k_answer_field:
        raise PLMError(f"GSM8K answer field has no '####' final answer: {gsm8k_answer_field[-80:]!r}")
    tail = gsm8k_answer_field.rsplit("####", 1)[1].strip()
    value = parse_number(tail)
    # A non-numeric reference is kept as text; numbers_equal then compares it literally.
    return format_number(value) if value is not None else tail.replace(",", "")


def extract_final_number(model_output: str) -> str | None:
    """The final numeric answer in a model's output, canonicalised, or None if it has none.

    Precedence: the first '#### N' (GSM8K format; text after it is a runaway continuation),
    then the last '\\boxed{N}', then the last 'the answer is N', then the last number anywhere.
    The later markers take the last occurrence so a self-correction wins.
    """
    marks = [_first_number(m.group(1)) for m in _GSM8K_MARK.finditer(model_output)]
    candidates = [v for v in marks[:1] if v is not None]
    if not candidates:
        boxed = [_first_number(m.group(1)) for m in _BOXED.finditer(model_output)]
        candidates = [v for v in boxed if v is not None][-1:]
    if not candidates:
        said = [_first_number(model_output[m.end():].split("\n", 1)[0])
                for m in _ANSWER_IS.finditer(model_output)]
        candidates = [v for v in said if v is not None][-1:]
    if not candidates:
        numbers = [parse_number(m.group()) for m in _NUMBER.finditer(model_output.translate(_TRANSLATE))]
        candidates = [v for v in numbers if v is not None][-1:]
    return format_number(candidates[0]) if candidates else None


def _as_fraction(x: str | float | int | Fraction) -> Fraction | None:
    if isinstance(x, str):
        return parse_number(x)
    try:
        return Fraction(x)
    except (ValueError, OverflowError):  # nan, inf
        return None


def numbers_equal(a: str | float | int | Fraction | None, b: str | float | int | Fraction | None,
                  rel_tol: float = 1e-9, abs_tol: float = 1e-6) -> bool:
    """True when both parse as numbers within tolerance; unparseable text must match exactly.

    The tolerances only absorb float noise: an off-by-one answer is wrong even at 2.8 million.
    """
    if a is None or b is None:
        return False
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is None or fb is None:
        return fa is None and fb is None and str(a).strip() == str(b).strip()
    tolerance = max(Fraction(abs_tol), Fraction(rel_tol) * max(abs(fa), abs(fb)))
    return abs(fa - fb) <= tolerance


def score_math(output: str, reference: str) -> bool:
    """Whether ``output``'s final number matches ``reference``.

    ``reference`` is a bare answer ("18") or a whole GSM8K answer field ("... #### 18").
    """
    if "####" in reference:
        reference = extract_reference_answer(reference)
    return numbers_equal(extract_final_number(output), reference)


# "a op b (op c ...) = r" written in a solution: plain numbers (thousands commas allowed)
# joined by + - * / x ×, then "=" and the result. Only such spelled-out steps are checked.
_OPERAND = r"\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_STEP = re.compile(rf"(?<![\w.])({_OPERAND}(?:\s*[-+*/x×]\s*{_OPERAND})+)\s*=\s*(-?{_OPERAND})(?![\d])")


def _eval_expr(expr: str) -> Fraction | None:
    """Exact value of "3 + 4 * 2" (usual precedence, left to right), or None."""
    tokens = re.findall(rf"{_OPERAND}|[-+*/x×]", expr)
    values, ops = [], []
    for t in tokens:
        if t in "+-*/x×":
            ops.append("*" if t in "x×" else t)
        else:
            v = parse_number(t)
            if v is None:
                return None
            values.append(v)
    if len(values) != len(ops) + 1:
        return None
    # fold * and / first, then + and -
    terms, signs = [values[0]], []
    for op, v in zip(ops, values[1:]):
        if op in "*/":
            if op == "/" and v == 0:
                return None
            terms[-1] = terms[-1] * v if op == "*" else terms[-1] / v
        else:
            terms.append(v)
            signs.append(op)
    total = terms[0]
    for op, v in zip(signs, terms[1:]):
        total = total + v if op == "+" else total - v
    return total


def steps_consistent(solution: str) -> bool:
    """Whether every spelled-out arithmetic step "a op b = r" in ``solution`` is right (results
    may be rounded to the precision written, e.g. "10 / 3 = 3.33"). A solution without such
    steps is consistent: this checks the work shown, not that work is shown."""
    text = solution.translate(_TRANSLATE)
    text = re.sub(r"<<[^<>]*>>", "", text)  # GSM8K calculator annotations repeat the step
    for m in _STEP.finditer(text):
        got, want = _eval_expr(m.group(1)), parse_number(m.group(2))
        if got is None or want is None:
            continue
        digits = len(m.group(2).split(".", 1)[1]) if "." in m.group(2) else 0
        wrong = abs(got - want) > Fraction(1, 2 * 10 ** digits) if digits else got != want
        if wrong:
            return False
    return True
