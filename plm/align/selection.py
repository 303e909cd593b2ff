"""Choosing (chosen, rejected) from a refinement chain y_0, y_1, ..., y_K and its scores.

* Rule-based selection (ASSUMED: the public record gives no rule): correctness by the verifier; the chosen
  answer is a correct one, ties broken toward the LATER refinement (the latest correct
  answer); the rejected one is an incorrect one, ties broken toward the EARLIER answer (the
  answer that needed refining). No pair unless the chain has both a correct and an incorrect
  answer.
* Reward selection: chosen = highest score (ties: later), rejected = lowest (ties: earlier),
  kept when the score margin is at least `min_margin` (> 0).
"""
from __future__ import annotations

from typing import Sequence

from plm.errors import ConfigError


def select_rule(correct: Sequence[bool | float]) -> tuple[int, int] | None:
    """(chosen index, rejected index) in the chain, or None."""
    good = [i for i, c in enumerate(correct) if c]
    bad = [i for i, c in enumerate(correct) if not c]
    if not good or not bad:
        return None
    return good[-1], bad[0]


def select_reward(scores: Sequence[float], min_margin: float = 1e-6) -> tuple[int, int] | None:
    if len(scores) < 2:
        return None
    hi = max(scores)
    lo = min(scores)
    w = max(i for i, s in enumerate(scores) if s == hi)
    l_ = min(i for i, s in enumerate(scores) if s == lo)
    if hi - lo < max(min_margin, 1e-12):
        return None
    return w, l_


def select_pair(scores: Sequence[float], mode: str = "rule", min_margin: float = 1e-6) -> tuple[int, int] | None:
    if mode == "rule":
        return select_rule([s > 0.5 for s in scores])
    if mode == "reward":
        return select_reward(scores, min_margin)
    raise ConfigError(f"aries.selection must be rule or reward, got {mode!r}")
