"""Chats as text: ChatML (the one place a list of {role, content} becomes model input) and the
ARIES refinement template z(x, y), shared by SFT, preference training, self-refining inference
and evaluation.

ASSUMED: the public record gives no wording for z; it shows the model the question and its
previous answer as a completed turn, then asks for an improved answer. The instruction text
is a setting.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

from plm.errors import PLMError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Tool calls. ASSUMED: PLM's released template has no tool syntax; tools use the convention of
# Qwen2-tokenizer chat models (Hermes' format, as Qwen2.5 ships it): the function signatures as
# JSON lines inside <tools></tools> in the system turn, each call the model makes as
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, and tool results returned in a
# user turn inside <tool_response></tool_response>.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_INSTRUCTION = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def tool_call_text(name: str, arguments) -> str:
    """One call as the model writes it; `arguments` an object, or its JSON text taken as it is."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{TOOL_CALL_CLOSE}'


_TOOLS_HEAD, _TOOLS_TAIL = TOOLS_INSTRUCTION.format(tools="\0").split("\0")

# What we write into tokenizer_config.json: the ChatML template with no default system prompt,
# and the tool-call convention, as render_chatml renders both (`tools`, `tool_calls`, `tool`
# messages), for transformers' apply_chat_template and other tools that render chats themselves.
# (JSON's string escapes are valid in a Jinja string literal.)
CHATML_TEMPLATE_PLAIN = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- " + json.dumps(_TOOLS_HEAD) + " }}"
    "{%- for tool in tools %}{%- if not loop.first %}{{- '\\n' }}{%- endif %}{{- tool | tojson }}{%- endfor %}"
    "{{- " + json.dumps(_TOOLS_TAIL) + " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user\\n' }}"
    "{%- else %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- set text = message['content'] or '' %}{{- '<|im_start|>assistant\\n' + text }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if text or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _with_tools(messages: list[dict], tools: Sequence[dict]) -> list[dict]:
    block = TOOLS_INSTRUCTION.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}] + messages[1:]
    return [{"role": "system", "content": block}] + messages


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False,
                  tools: Sequence[dict] | None = None) -> str:
    """ChatML text for a list of {role, content}; the one place chats become text.

    With `tools` (OpenAI's `[{"type": "function", "function": {...}}]`) their signatures go into
    the system turn; an assistant message's `tool_calls` (OpenAI's shape) follow its content, and
    consecutive `tool` messages share one user turn (the tool-call convention above)."""
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PLMError(f"chat message {i} must be an object with 'role' and 'content', got {m!r}")
    if tools:
        msgs = _with_tools(msgs, tools)
    out = []
    for i, m in enumerate(msgs):
        role, content = m["role"], m["content"] or ""
        if role == "tool":
            first = i == 0 or msgs[i - 1]["role"] != "tool"
            last = i + 1 == len(msgs) or msgs[i + 1]["role"] != "tool"
            out.append(f"{IM_START}user\n" if first else "\n")
            out.append(f"<tool_response>\n{content}\n</tool_response>")
            out.append(f"{IM_END}\n" if last else "")
            continue
        calls = (m.get("tool_calls") or []) if role == "assistant" else []
        text = content
        for c in calls:
            fn = c.get("function", c)
            text += ("\n" if text else "") + tool_call_text(fn["name"], fn.get("arguments", {}))
        out.append(f"{IM_START}{role}\n{text}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.S)


def parse_tool_calls(text: str, names: Sequence[str] | None = None) -> tuple[str, list[dict]]:
    """(content, calls) of a reply: each well-formed <tool_call> block as {"name", "arguments"}
    (arguments a JSON object), and the text before the first one as content. A reply with any
    malformed block, or naming a function not in `names`, has no calls: all of it is content."""
    calls = []
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return text, []
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
            return text, []
        if names is not None and obj["name"] not in names:
            return text, []
        calls.append({"name": obj["name"], "arguments": obj["arguments"]})
    if not calls:
        return text, []
    return text[:text.index(TOOL_CALL_OPEN)].strip(), calls


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
