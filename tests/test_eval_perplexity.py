"""The paired perplexity comparison the edge benchmark's quality targets use, against values
worked out by hand."""
from __future__ import annotations

import math

import pytest

from plm.eval.perplexity import paired_perplexity_ratio


def test_paired_ratio_by_hand():
    # sequence means of a - b: (0.1 + 0.3) / 2 = 0.2 and (0.0 + 0.2) / 2 = 0.1; mean 0.15;
    # their sample standard deviation |0.2 - 0.1| / sqrt(2) = 0.0707107, over sqrt(2): 0.05
    a = [[1.1, 2.3], [0.5, 0.9]]
    b = [[1.0, 2.0], [0.5, 0.7]]
    r = paired_perplexity_ratio(a, b)
    assert r["log_ratio"] == pytest.approx(0.15)
    assert r["ratio"] == pytest.approx(math.exp(0.15))
    assert r["se"] == pytest.approx(0.05)
    assert r["ci95"] == pytest.approx([math.exp(0.15 - 0.098), math.exp(0.15 + 0.098)])
    assert r["sequences"] == 2
    # the ratio is the ratio of the two perplexities (equal-length sequences)
    ppl = [math.exp(sum(map(sum, x)) / 4) for x in (a, b)]
    assert r["ratio"] == pytest.approx(ppl[0] / ppl[1])


def test_a_constant_shift_has_no_spread():
    r = paired_perplexity_ratio([[1.0, 2.0], [3.0, 4.0]], [[0.9, 1.9], [2.9, 3.9]])
    assert r["ratio"] == pytest.approx(math.exp(0.1))
    assert r["se"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(paired_perplexity_ratio([[1.0]], [[2.0]])["se"])  # one sequence: no spread to measure


@pytest.mark.parametrize("a,b", [([[1.0, 2.0]], [[1.0]]), ([1.0, 2.0], [1.0, 2.0]), ([[]], [[]])])
def test_mismatched_or_empty_inputs_are_refused(a, b):
    with pytest.raises(ValueError, match="paired_perplexity_ratio needs two equal, non-empty"):
        paired_perplexity_ratio(a, b)
