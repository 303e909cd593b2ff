"""Chats as text: ChatML (the one place a list of {role, content} becomes model input) and the
ARIES refinement template z(x, y), shared by SFT, preference training, self-refining inference
and evaluation.

ASSUMED: the public record gives no wording for z; it shows the model the question and its
previous answer as a completed turn, then asks for an improved answer. The instruction text
is a setting.
"""
from __future__ import annotations

from typing import Sequence

from plm.errors import PLMError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Jinja ChatML template, as Qwen2 ships it, for tools that render chats themselves.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{% if default_system %}{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The template above with no default system prompt: what we write into tokenizer_config.json.
CHATML_TEMPLATE_PLAIN = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """ChatML text for a list of {role, content}; the one place chats become text."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PLMError(f"chat message {i} must be an object with 'role' and 'content', got {m!r}")
        out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def chat_prompt(messages: Sequence[dict]) -> str:
    """The text that asks for the next assistant turn of `messages`."""
    return render_chatml(messages, add_generation_prompt=True)


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
