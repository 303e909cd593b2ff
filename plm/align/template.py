"""The ARIES refinement template z(x, y): defined once, shared by SFT, preference training,
self-refining inference and evaluation.

ASSUMED (REFERENCE §4): the public record gives no wording; z shows the model the question
and its previous answer as a completed turn, then asks for an improved answer. The
instruction text is a setting.
"""
from __future__ import annotations

DEFAULT_REFINE_INSTRUCTION = (
    "Review your previous answer step by step. If it contains a mistake, correct it; "
    "then give the complete improved answer."
)


def direct_messages(prompt: str, system: str | None = None) -> list[dict]:
    """x as a chat: the context for answering directly."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def refinement_messages(prompt: str, previous: str, instruction: str = DEFAULT_REFINE_INSTRUCTION,
                        system: str | None = None) -> list[dict]:
    """z(x, y_prev) as a chat: the context for refining an earlier answer."""
    return direct_messages(prompt, system) + [
        {"role": "assistant", "content": previous},
        {"role": "user", "content": instruction},
    ]
