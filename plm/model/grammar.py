"""Constrained decoding: a grammar every generated token must keep the reply inside, so a reply
is valid JSON, matches a JSON schema, or is a well-formed tool call by construction rather than
by the model's luck (small models often break JSON). Before each sampling step the matcher of a
sequence gives the set of tokens that keep the text a prefix of the language; the others get a
logit of -inf; the chosen token then advances the matcher. Once the grammar can only end, the
reply ends.

The engine is llguidance (an Earley parser over the tokenizer's byte trie, the one behind
OpenAI's, vLLM's and llama.cpp's structured outputs), an optional dependency: `pip install
'plm[serve]'`. Grammars are its dialect of Lark, JSON schemas (with `x-guidance` options) and
regular expressions.

JSON is generated compactly, as Python's `json.dumps` writes it (`", "` between items, `": "`
after keys, no other whitespace): flexible whitespace would let a model pad a reply with newlines
until max_tokens runs out. Object properties come in the schema's order.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any

import torch

from plm.errors import PLMError

# llguidance's JSON compiler options, set in each schema as "x-guidance"
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(PLMError):
    """A grammar or schema the engine cannot compile, or a token it refused."""


def _llg():
    try:
        import llguidance
    except ImportError:
        raise PLMError("constrained output (a JSON schema, a grammar, tool calls) needs the llguidance package: "
                       "pip install 'plm[serve]' (or pip install llguidance)") from None
    return llguidance


@functools.lru_cache(maxsize=4)
def _engine_tokenizer(tokenizer) -> Any:
    """llguidance's view of a plm Tokenizer (its token trie; about a second to build, so kept);
    the tokenizer's stop tokens are the grammar's end of text."""
    return _llg().LLTokenizer(tokenizer.hf.to_str(), eos_token=list(tokenizer.stop_token_ids))


@functools.lru_cache(maxsize=64)
def _compiled(source: str, tokenizer) -> Any:
    """The start state of `source` compiled for `tokenizer`, kept for the next request that
    sends the same grammar (agents send the same tools and schemas every time; compiling costs
    0.8-3 ms). Shared: only ever copied (Grammar.matcher), never advanced."""
    return _llg().LLMatcher(_engine_tokenizer(tokenizer), source, log_level=0)


def styled_schema(schema: dict, whitespace: str | None = None) -> dict:
    """`schema` with the compact JSON style, or with `whitespace` (a regular expression) allowed
    around every separator and bracket instead; the schema's own `x-guidance` options win."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    style = JSON_STYLE if whitespace is None else {"whitespace_flexible": True, "whitespace_pattern": whitespace,
                                                   "item_separator": ",", "key_separator": ":"}
    return {**schema, "x-guidance": {**style, **(schema.get("x-guidance") or {})}}


class Grammar:
    """A compiled grammar for one tokenizer; `matcher()` gives each sequence its own state (a
    copy of a matcher at the start, so the grammar is compiled once, not once per sequence)."""

    def __init__(self, source: str, tokenizer, what: str = "grammar") -> None:
        self.source, self.what = source, what
        self._start = _compiled(source, tokenizer)
        if self._start.is_error():
            raise GrammarError(f"the {what} cannot be compiled: {self._start.get_error().strip()}")

    @classmethod
    def json_schema(cls, schema: dict | None, tokenizer, whitespace: str | None = None) -> "Grammar":
        """Replies that are JSON documents valid under `schema` (None: any JSON object), compact,
        or with `whitespace` (a regular expression) around separators and brackets."""
        schema = {"type": "object"} if schema is None else schema
        try:
            source = _llg().LLMatcher.grammar_from_json_schema(styled_schema(schema, whitespace))
        except ValueError as e:
            raise GrammarError(f"the JSON schema cannot be compiled: {e}") from None
        return cls(source, tokenizer, "JSON schema")

    @classmethod
    def lark(cls, text: str, tokenizer) -> "Grammar":
        """Replies in the language of a Lark grammar (llguidance's dialect: `start` is the top
        rule, `%json {...}` embeds a schema)."""
        return cls(_llg().LLMatcher.grammar_from_lark(text), tokenizer, "Lark grammar")

    @classmethod
    def regex(cls, pattern: str, tokenizer) -> "Grammar":
        """Replies that match a regular expression in full (Rust `regex` syntax)."""
        return cls(_llg().LLMatcher.grammar_from_regex(pattern), tokenizer, "regular expression")

    @classmethod
    def gbnf(cls, text: str, tokenizer) -> "Grammar":
        """Replies in the language of a GBNF grammar (llama.cpp's format, `root` the top rule),
        translated to Lark by llguidance."""
        _llg()  # a clear error when the engine is missing
        from llguidance.gbnf_to_lark import gbnf_to_lark
        try:
            lark = gbnf_to_lark(text)
        except Exception as e:  # the translator raises plain exceptions on syntax errors
            raise GrammarError(f"the GBNF grammar cannot be read: {e}") from None
        return cls(_llg().LLMatcher.grammar_from_lark(lark), tokenizer, "GBNF grammar")

    @classmethod
    def choice(cls, options: list[str], tokenizer) -> "Grammar":
        """Replies that are exactly one of `options`."""
        alts = " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
        return cls.lark(f"start: {alts}", tokenizer)

    def matcher(self) -> "Matcher":
        return Matcher(self._start.deep_copy())


class Matcher:
    """One sequence's position in a grammar."""

    def __init__(self, m) -> None:
        self.m = m  # an llguidance LLMatcher

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., V] with every token the grammar forbids at -inf (ids the
        engine's tokenizer does not know, such as padded embedding rows, always)."""
        import numpy as np
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little").view(np.bool_)
        width = logits.shape[-1]
        n = min(width, bits.shape[0])
        rows = logits.detach().float().reshape(-1, width).numpy()
        out = np.full(rows.shape, -np.inf, dtype=np.float32)
        # a numpy masked copy: cheaper than torch.masked_fill on a 152k-wide row
        np.copyto(out[:, :n], rows[:, :n], where=bits[:n])
        return torch.from_numpy(out).reshape(logits.shape)

    def advance(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise GrammarError(f"token {token} does not continue the grammar: {self.m.get_error()[:300]}")

    def forced(self, limit: int) -> list[int]:
        """The next tokens the grammar allows no alternative to (at most `limit`; the engine's
        canonical tokenization of the forced text), consumed: the caller appends them."""
        ff = self.m.compute_ff_tokens()[:max(limit, 0)]
        if ff and not self.m.consume_tokens(ff):
            raise GrammarError(f"forced tokens {ff} do not continue the grammar: {self.m.get_error()[:300]}")
        return ff

    @property
    def stopped(self) -> bool:
        """Nothing can follow but the end of the reply."""
        return self.m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is a whole sentence of the grammar."""
        return self.m.is_accepting()


def _arguments(fn: dict) -> dict:
    """The schema of a call's arguments: the function's `parameters`, where an object that lists
    its properties and says nothing of others takes no others (else a model can pad a call with
    made-up keys until max_tokens); no `parameters`: no arguments, `{}`."""
    params = fn.get("parameters")
    if not params:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if "properties" in params and "additionalProperties" not in params:
        return {**params, "additionalProperties": False}
    return params


def _not_starting_with(word: str) -> str:
    """A regular expression (no lookahead: the engine has none) for the non-empty texts that do
    not begin with `word`: they leave it at some character, or are a proper prefix of it."""
    def lit(t: str) -> str:
        return "".join(re.escape(c) for c in t)
    leave = "|".join(f"{lit(word[:i])}[^{re.escape(word[i])}]" for i in range(len(word)))
    prefixes = "|".join(lit(word[:i]) for i in range(1, len(word)))
    return f"(({leave})(.|\\n)*|{prefixes})"


def tool_call_grammar(tools: list[dict], tokenizer, choice: str = "auto", parallel: bool = True,
                      text_schema: dict | None = None, whitespace: str | None = None) -> Grammar:
    """Replies that call `tools` (OpenAI's `[{"type": "function", "function": {name, parameters}}]`)
    in the <tool_call> format of plm.data.chat, the arguments valid under each function's
    `parameters` schema (no undeclared keys unless it allows them: `_arguments`). choice "auto":
    plain text (not starting with "<tool_call>") or calls; "required": calls only; a function's
    name: calls of that function only. `parallel`: one call or several. `text_schema` (a
    response format beside the tools, as agent frameworks send for a typed final answer): with
    "auto", the reply that is not calls is a JSON document valid under it instead of free text.
    `whitespace`: the JSON's whitespace, as Grammar.json_schema's."""
    from plm.data.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
    fns = [t["function"] for t in tools]
    if choice not in ("auto", "required"):
        fns = [f for f in fns if f["name"] == choice]
    variants = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": _arguments(f)},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
    if not variants:
        raise GrammarError(f"no tool is named {choice!r}")
    schema = styled_schema(variants[0] if len(variants) == 1 else {"anyOf": variants}, whitespace)
    if choice != "auto":
        start = "start: calls"
    elif text_schema is not None:  # JSON begins with "{", never with the call's "<"
        start = f"start: calls | %json {json.dumps(styled_schema(text_schema, whitespace), ensure_ascii=False)}"
    else:
        start = "start: TEXT? | calls"
    lines = [
        start,
        'calls: call ("\\n" call)*' if parallel else "calls: call",
        f'call: "{TOOL_CALL_OPEN}\\n" %json {json.dumps(schema, ensure_ascii=False)} "\\n{TOOL_CALL_CLOSE}"',
    ]
    if choice == "auto" and text_schema is None:
        lines.append(f"TEXT: /{_not_starting_with(TOOL_CALL_OPEN)}/")
    return Grammar.lark("\n".join(lines), tokenizer)
