"""The OpenAI API's request fields and response shapes, as far as `plm serve` implements them.

Requests are checked field by field: a known field of the wrong type or out of range is a 400
naming the field (`param`); unknown fields are ignored, as OpenAI-compatible servers do; fields
of features we do not have (suffix, echo on chat, best_of other than n) are refused when set to
anything but their neutral value, rather than silently ignored.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# ---- typed field readers ---------------------------------------------------------------------

def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _int(body: dict, name: str, default=None, lo: int | None = None, hi: int | None = None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {_type_name(v)}", name)
    if lo is not None and v < lo or hi is not None and v > hi:
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"'{name}' must be {rng}, got {v}", name)
    return v


def _num(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number, got {_type_name(v) if not isinstance(v, float) else v}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}", name)
    return float(v)


def bool_field(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {_type_name(v)}", name)
    return v


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if any(s == "" for s in stops):
        raise bad("'stop' strings must not be empty", "stop")
    if len(stops) > 16:
        raise bad(f"'stop' takes at most 16 strings, got {len(stops)}", "stop")
    return stops


def _refuse(body: dict, name: str, neutral: tuple, what: str) -> None:
    if name in body and body[name] not in neutral:
        raise bad(f"'{name}' is not supported by this server ({what})", name, "unsupported_parameter")


@dataclass
class Sampling:
    max_tokens: int | None  # None: up to the context window
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k best
    min_p: float = 0.0  # an extension: 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    echo: bool = False  # completions: the prompt before the reply (with logprobs: its tokens' too)
    n: int = 1  # choices per prompt
    # structured output: ("text", None), ("json_object", None) or ("json_schema", schema)
    response_format: tuple[str, dict | None] = ("text", None)
    constraint: tuple[str, str, Any] | None = None  # (field, kind, value): `grammar`, `guided_*` (EXTRA_CONSTRAINTS)
    json_whitespace: str | None = None  # vLLM's guided_whitespace_pattern: None = compact JSON
    tools: list[dict] = field(default_factory=list)  # chat: OpenAI function tools
    tool_choice: str = "auto"  # none | auto | required | a tool's name
    parallel_tool_calls: bool = True

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def constrained(self) -> bool:
        """Replies are generated under a grammar (tool calls or a JSON response format)."""
        return self.calls_tools or self.response_format[0] != "text" or self.constraint is not None


MAX_TOP_LOGPROBS = {True: 20, False: 5}  # chat's top_logprobs, completions' logprobs (OpenAI's limits)


def _logprobs(body: dict, chat: bool) -> int | None:
    """Chat: `logprobs` (bool) and `top_logprobs` (0-20); completions: `logprobs` (0-5)."""
    hi = MAX_TOP_LOGPROBS[chat]
    if not chat:
        return _int(body, "logprobs", None, lo=0, hi=hi)
    top = _int(body, "top_logprobs", None, lo=0, hi=hi)
    if not bool_field(body, "logprobs"):
        if top:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return top or 0


def _logit_bias(body: dict) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad(f"'logit_bias' must be an object mapping token ids to numbers, got {_type_name(v)}", "logit_bias")
    out = {}
    for k, b in v.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise bad(f"'logit_bias' keys must be token ids, got {k!r}", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad(f"'logit_bias' values must be numbers in [-100, 100], got {b!r} for token {k}", "logit_bias")
        out[int(k)] = float(b)
    return out


def _response_format(body: dict) -> tuple[str, dict | None]:
    """OpenAI's `response_format`: {"type": "text" | "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}} (a schema is always enforced, strict or not)."""
    v = body.get("response_format")
    if v is None:
        return "text", None
    kinds = ("text", "json_object", "json_schema")
    if not isinstance(v, dict) or v.get("type") not in kinds:
        raise bad(f"'response_format' must be an object with 'type' one of {', '.join(kinds)}, got {v!r}"[:300],
                  "response_format")
    if v["type"] != "json_schema":
        return v["type"], None
    spec = v.get("json_schema")
    if not isinstance(spec, dict):
        raise bad("'response_format.json_schema' must be an object {\"name\", \"schema\"}", "response_format")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise bad(f"'response_format.json_schema.schema' must be a JSON schema object, got {_type_name(schema)}",
                  "response_format")
    return "json_schema", schema


# Constraint fields of other servers, beside OpenAI's response_format: llama.cpp's `grammar`
# (GBNF) and vLLM's guided decoding (`guided_grammar` read as GBNF, as its xgrammar backend
# does); field -> kind. vLLM's newer `structured_outputs` object holds the same under its keys.
EXTRA_CONSTRAINTS = {"grammar": "gbnf", "guided_grammar": "gbnf", "guided_json": "json", "guided_regex": "regex",
                     "guided_choice": "choice"}
STRUCTURED_OUTPUTS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "gbnf", "json_object": "json"}


def _constraint(body: dict, response_format: tuple[str, dict | None], tools: bool) -> tuple[str, str, Any] | None:
    """(field, kind, value) of the one extension constraint set (None: none set)."""
    given = [(k, kind, body[k]) for k, kind in EXTRA_CONSTRAINTS.items() if body.get(k) is not None]
    so = body.get("structured_outputs")
    if so is not None:
        keys = [k for k in STRUCTURED_OUTPUTS if so.get(k) not in (None, False)] if isinstance(so, dict) else []
        if len(keys) != 1:
            raise bad(f"'structured_outputs' must be an object setting one of {', '.join(STRUCTURED_OUTPUTS)}, "
                      f"got {json.dumps(so)[:200]}", "structured_outputs")
        k = keys[0]
        given.append((f"structured_outputs.{k}", STRUCTURED_OUTPUTS[k],
                      {"type": "object"} if k == "json_object" else so[k]))
    if not given:
        return None
    name, kind, v = given[0]
    if len(given) > 1 or response_format[0] != "text":
        other = given[1][0] if len(given) > 1 else "response_format"
        raise bad(f"'{name}' and '{other}' both constrain the reply: set one", other)
    if tools:
        raise bad(f"'{name}' with 'tools' is not supported: use 'response_format' for the text beside tool calls",
                  name, "unsupported_parameter")
    if kind == "json" and isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise bad(f"'{name}' is not valid JSON ({e})", name) from None
    if kind == "json" and not isinstance(v, dict):
        raise bad(f"'{name}' must be a JSON schema object, got {_type_name(v)}", name)
    if kind in ("gbnf", "regex") and not (isinstance(v, str) and v.strip()):
        raise bad(f"'{name}' must be a non-empty string, got {_type_name(v)}", name)
    if kind == "choice" and not (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)):
        raise bad(f"'{name}' must be a non-empty array of non-empty strings, got {json.dumps(v)[:200]}", name)
    return name, kind, v


def _json_whitespace(body: dict) -> str | None:
    """vLLM's `guided_whitespace_pattern`: a regular expression for the whitespace of constrained
    JSON (None: the compact style)."""
    v = body.get("guided_whitespace_pattern")
    if v is not None and not (isinstance(v, str) and v):
        raise bad(f"'guided_whitespace_pattern' must be a non-empty regular expression, got {_type_name(v)}",
                  "guided_whitespace_pattern")
    return v


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128


def parse_tools(body: dict) -> tuple[list[dict], str, bool]:
    """Chat's `tools` (function tools), `tool_choice` and `parallel_tool_calls`."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad(f"'tools' must be an array of at most {MAX_TOOLS} tools", "tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise bad(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad(f"'tools[{i}].function.name' must be 1-64 letters, digits, _ or -, got {name!r}", "tools")
        if name in names:
            raise bad(f"'tools' names the function {name!r} twice", "tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"'tools[{i}].function.parameters' must be a JSON schema object", "tools")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise bad(f"'tools[{i}].function.description' must be a string", "tools")
        names.append(name)
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                      "{\"name\": ...}}", "tool_choice")
        choice = fn["name"]
        if choice not in names:
            raise bad(f"'tool_choice' names {choice!r}, which is not in 'tools'", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise bad(f"'tool_choice' must be none, auto, required or a function, got {choice!r}", "tool_choice")
    if choice == "required" and not names:
        raise bad("'tool_choice' is required but no 'tools' are given", "tool_choice")
    return tools, choice, bool_field(body, "parallel_tool_calls", True)


def parse_sampling(body: dict, chat: bool = False) -> Sampling:
    n = _int(body, "n", 1, lo=1, hi=MAX_CHOICES)
    best_of = _int(body, "best_of", None, lo=1)
    if best_of not in (None, n):
        raise bad(f"'best_of' other than n is not supported (every sampled choice is returned), got {best_of}",
                  "best_of", "unsupported_parameter")
    if chat:
        _refuse(body, "echo", (None, False), "chat does not echo the prompt")
    _refuse(body, "suffix", (None, ""), "no insertion")
    if not chat:
        _refuse(body, "tools", (None, []), "tools are for chat completions")
    tools, tool_choice, parallel = parse_tools(body) if chat else ([], "auto", True)
    response_format = _response_format(body)
    constraint = _constraint(body, response_format, bool(tools) and tool_choice != "none")
    max_tokens = _int(body, "max_completion_tokens" if chat else "max_tokens", None, lo=1)
    if max_tokens is None and chat:
        max_tokens = _int(body, "max_tokens", None, lo=1)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    stream = bool_field(body, "stream")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, lo=0),  # an extension (llama.cpp, vLLM); 0 = off
        min_p=_num(body, "min_p", 0.0, 0.0, 1.0),  # an extension (llama.cpp, vLLM); 0 = off
        seed=_int(body, "seed", None, lo=-(2 ** 63), hi=2 ** 63 - 1),
        stop=_stops(body),
        stream=stream,
        include_usage=bool(opts and bool_field(opts, "include_usage")),
        logprobs=_logprobs(body, chat),
        presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_num(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),  # an extension
        logit_bias=_logit_bias(body),
        echo=not chat and bool_field(body, "echo"),
        n=n,
        response_format=response_format,
        constraint=constraint,
        json_whitespace=_json_whitespace(body),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
    )


def parse_model(body: dict, served: list[str]) -> str:
    """The model the request names (None/missing: the one served); unknown: 404."""
    name = body.get("model")
    if name is None:
        return served[0]
    if not isinstance(name, str):
        raise bad(f"'model' must be a string, got {_type_name(name)}", "model")
    if name not in served:
        raise APIError(404, f"the model '{name}' does not exist; this server serves "
                            f"{', '.join(repr(s) for s in served)}", param="model", code="model_not_found")
    return name


MAX_CHOICES = 64  # prompts x n per request


def parse_prompts(body: dict, n: int = 1) -> list[str | list[int]]:
    """Completion prompts: a string, an array of token ids, or an array of either (a batch); at
    most MAX_CHOICES choices in all with n per prompt."""
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    p = body["prompt"]
    if isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(t) for t in p)):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and x and all(_is_id(t) for t in x))
                                         for x in p):
        if len(p) * n > MAX_CHOICES:
            raise bad(f"at most {MAX_CHOICES} choices per request (prompts x n), got {len(p)} x {n}", "prompt")
        return list(p)
    raise bad("'prompt' must be a string, an array of token ids, or an array of those", "prompt")


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(body: dict) -> list[dict]:
    """Chat messages as {role, content: str}; text parts of a content array are joined."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object, got {_type_name(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}} "
                              f"(this model reads text only)", f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string or an array of text parts, got {_type_name(content)}",
                      f"{where}.content")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _message_calls(m["tool_calls"], where)
        out.append(msg)
    return out


def _message_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's earlier `tool_calls`: [{id, type, function: {name, arguments}}]."""
    if not isinstance(calls, list):
        raise bad(f"'{where}.tool_calls' must be an array", f"{where}.tool_calls")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments"), (str, dict)):
            raise bad(f"'{where}.tool_calls[{j}]' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                      f"\"arguments\"}}}}", f"{where}.tool_calls")
    return calls


# ---- responses ----------------------------------------------------------------------------

def _entry(token_bytes: Callable[[int], bytes], t: int, lp: float) -> dict:
    b = token_bytes(t)
    return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}


def logprob_entries(token_bytes: Callable[[int], bytes], entries: list) -> list[dict]:
    """Chat's (and the Responses API's) per-token entries: {token, logprob, bytes, top_logprobs}."""
    return [{**_entry(token_bytes, e.token, e.logprob), "top_logprobs": [_entry(token_bytes, t, v) for t, v in e.top]}
            for e in entries]


def _token_text(token_bytes: Callable[[int], bytes], t: int) -> str:
    return _entry(token_bytes, t, 0.0)["token"]


@dataclass
class Reply:
    """Identity of one response, shared by its chunks. `token_bytes` (a tokenizer's) renders
    log-probabilities; `offsets` counts each choice's characters sent, for `text_offset`."""
    model: str
    chat: bool
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))
    token_bytes: Callable[[int], bytes] | None = None
    offsets: dict[int, int] = field(default_factory=dict)  # per choice: characters sent (text_offset)

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, entries: list | None, index: int = 0) -> dict | None:
        """OpenAI's logprobs object for the tokens behind one piece of text (None: not asked for).
        Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: the parallel
        lists tokens, token_logprobs, top_logprobs ({token: logprob}) and text_offset."""
        if entries is None:
            return None
        tb = self.token_bytes
        if self.chat:
            return {"content": logprob_entries(tb, entries), "refusal": None}
        tokens = [_token_text(tb, e.token) for e in entries]
        offsets, at = [], self.offsets.get(index, 0)
        for t in tokens:
            offsets.append(at)
            at += len(t)
        self.offsets[index] = at
        # an echoed prompt's first token has no log-probability: null, as OpenAI gives it
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else {_token_text(tb, t): v for t, v in e.top}
                                 for e in entries],
                "text_offset": offsets}

    @staticmethod
    def tool_calls(calls: list[dict]) -> list[dict]:
        """OpenAI's `tool_calls` for parsed calls ({"name", "arguments"}), each with a fresh id."""
        return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for c in calls]

    def full(self, choices: list[tuple[str, str, list | None, list | None]], usage: dict) -> dict:
        """The whole response: choices of (text, finish_reason, log-probability entries or None,
        chat: tool calls or None; with calls, `text` is the content before them)."""
        out = []
        for i, (text, finish_reason, lps, calls) in enumerate(choices):
            if self.chat:
                message = {"role": "assistant", "content": text}
                if calls:
                    message = {"role": "assistant", "content": text or None, "tool_calls": self.tool_calls(calls)}
                out.append({"index": i, "message": message, "logprobs": self.logprobs(lps, i),
                            "finish_reason": finish_reason})
            else:
                out.append({"index": i, "text": text, "logprobs": self.logprobs(lps, i), "finish_reason": finish_reason})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": out, "usage": usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False,
              logprobs: list | None = None, index: int = 0, calls: list[dict] | None = None) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            if calls:  # each call whole, in one delta, as a streamed call's pieces add up to
                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(self.tool_calls(calls))]
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs, index),
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": self.logprobs(logprobs, index),
                  "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

    # The stream, as plm.serve.app.GenerationResponse writes it (plm.serve.responses.ResponsesReply
    # has the same methods for the Responses API's events).
    def opening(self, k: int) -> bytes:
        """Before any text: chat sends each choice's role first, as OpenAI does."""
        return b"".join(sse(self.chunk(first=True, index=i)) for i in range(k)) if self.chat else b""

    def piece(self, text: str, logprobs: list | None, index: int = 0) -> bytes:
        return sse(self.chunk(text, logprobs=logprobs, index=index))

    def finish(self, index: int, reason: str, content: str | None = None, calls: list | None = None,
               logprobs: list | None = None) -> bytes:
        """A choice's end: the text held back until now (tool calls, or text after all), then
        its finish reason."""
        held = sse(self.chunk(content, logprobs=logprobs, index=index, calls=calls)) if content or calls else b""
        return held + sse(self.chunk(finish_reason=reason, index=index))

    def closing(self, usage: dict, include_usage: bool) -> bytes:
        return (sse(self.usage_chunk(usage)) if include_usage else b"") + sse("[DONE]")

    def failure(self, e: APIError) -> bytes:
        return sse(e.body())


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
