"""OpenAI's Responses API (`POST /v1/responses`) over the chat machinery.

A request's `input` items (messages, earlier function calls and their outputs), `instructions`,
function `tools` and `text.format` become a chat request (ChatML messages, chat-shaped tools, a
`response_format`), which runs exactly as `/v1/chat/completions` does; the reply comes back as
a Response: output items (an assistant message of `output_text`, function calls), `status`
completed or incomplete, and, streamed, the API's typed events (`response.created`,
`response.output_text.delta`, ..., `response.completed`). Completed responses are kept in
memory (the last `ResponseStore.keep`, unless `store` is false) for `previous_response_id`,
`item_reference` input items and `GET /v1/responses/{id}`.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from plm.serve.protocol import APIError, Reply, _int, _type_name, bad, logprob_entries, parse_messages

# Fields of a Responses request that have no chat counterpart or a different name; the rest
# (temperature, top_p, stream, parallel_tool_calls and the extensions: seed, stop, top_k, ...)
# pass to the chat parser unchanged.
OWN_FIELDS = ("input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "include", "top_logprobs",
              "previous_response_id", "store", "metadata", "reasoning", "truncation", "user", "background",
              "stream_options", "service_tier", "prompt_cache_key", "safety_identifier", "max_tool_calls",
              "conversation", "prompt", "n", "messages", "max_tokens", "max_completion_tokens", "logprobs",
              "response_format")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# The Responses API's names for the chat request's fields, for errors the chat machinery raises
CHAT_NAMES = {"response_format": "text.format", "max_completion_tokens": "max_output_tokens",
              "messages": "input", "logprobs": "include"}


def api_param(param: str | None) -> str | None:
    """An error's `param` as the Responses request names it (a message's index under `messages`
    does not map to one of `input`: instructions and earlier turns come first)."""
    if param is None:
        return None
    for chat, own in CHAT_NAMES.items():
        if param == chat or param.startswith((chat + "[", chat + ".")):
            return own
    return param


def _hex() -> str:
    return uuid.uuid4().hex[:24]


class ResponseStore:
    """The last `keep` completed responses: id -> (the Response object, its input items: those of
    the earlier turns chained by previous_response_id and their outputs, then the request's own).
    A continuation's history is those items and the output, as chat messages; the instructions
    are not among them, as a continuation does not inherit them."""

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, rid: str, response: dict, items: list[dict]) -> None:
        self._items[rid] = (response, items)
        self._items.move_to_end(rid)
        while len(self._items) > self.keep:
            self._items.popitem(last=False)

    def get(self, rid: str, param: str = "response_id") -> tuple[dict, list[dict]]:
        if rid not in self._items:
            raise APIError(404, f"no response with id {rid!r} is kept on this server (it keeps the last {self.keep} "
                                f"with store true, in memory, until it restarts)", param=param, code="not_found")
        return self._items[rid]

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self._items[rid]

    def find_item(self, iid: str) -> dict | None:
        """The item with id `iid` among the kept responses' output and input items, newest first."""
        for response, items in reversed(self._items.values()):
            for it in response["output"] + items:
                if it.get("id") == iid:
                    return it
        return None


def resolve_references(items: Any, store: ResponseStore) -> Any:
    """A request's `input` with each item reference (`{"type": "item_reference", "id": ...}`, or
    the shorthand `{"id": ...}`) replaced by the item it names: an output or input item of a
    response this server keeps."""
    if not isinstance(items, list):
        return items
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and (item.get("type") == "item_reference" or set(item) == {"id"}):
            iid = item.get("id")
            if not isinstance(iid, str):
                raise bad(f"'input[{i}].id' must be a string, got {_type_name(iid)}", f"input[{i}].id")
            item = store.find_item(iid)
            if item is None:
                raise APIError(404, f"'input[{i}]' refers to item {iid!r}, which no response kept on this server "
                                    f"holds", param=f"input[{i}].id", code="not_found")
        out.append(item)
    return out


def _text_parts(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"'{where}.content' must be a string or an array of text parts, got {_type_name(content)}",
                  f"{where}.content")
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("input_text", "output_text", "text", "refusal") or not isinstance(p.get(key), str):
            raise bad(f"'{where}.content[{j}]' must be a text part ({{\"type\": \"input_text\", \"text\": ...}} or "
                      f"output_text; this model reads text only)", f"{where}.content")
        parts.append(p[key])
    return "".join(parts)


def input_items(items: Any) -> list[dict]:
    """A request's `input` as the API lists it back: items with a type and an id (a string is
    one user message of one `input_text` part). Call after input_messages has checked it."""
    if isinstance(items, str):
        items = [{"role": "user", "content": [{"type": "input_text", "text": items}]}]
    prefix = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}
    out = []
    for item in items:
        kind = item.get("type", "message")
        it = {"type": kind, "id": item.get("id") or prefix[kind] + _hex(), **{k: v for k, v in item.items()
                                                                           if k not in ("type", "id")}}
        if kind == "message" and isinstance(it.get("content"), str):
            part = "output_text" if it.get("role") == "assistant" else "input_text"
            it["content"] = [{"type": part, "text": it["content"]}]
        out.append(it)
    return out


def list_items(items: list[dict], query: dict) -> dict:
    """GET /v1/responses/{id}/input_items: OpenAI's list page (`order` asc | desc, the default
    desc; `limit` 1-100, default 20; `after` / `before` an item id: the items past it / before it
    in that order, the page the nearest `limit` of them)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad(f"'order' must be asc or desc, got {order!r}", "order")
    limit = query.get("limit", "20")
    if not (limit.isdigit() and 1 <= int(limit) <= 100):
        raise bad(f"'limit' must be an integer from 1 to 100, got {limit!r}", "limit")
    n = int(limit)
    seq = items if order == "asc" else items[::-1]
    ids = [it["id"] for it in seq]
    for cursor in ("after", "before"):
        if query.get(cursor) is not None and query[cursor] not in ids:
            raise bad(f"'{cursor}' names no input item of this response: {query[cursor]!r}", cursor)
    if query.get("after") is not None:
        seq = seq[ids.index(query["after"]) + 1:]
        ids = ids[ids.index(query["after"]) + 1:]
    if query.get("before") is not None:
        if query["before"] not in ids:
            raise bad(f"'before' {query['before']!r} does not come after 'after' {query.get('after')!r}", "before")
        seq = seq[:ids.index(query["before"])]
        page, more = seq[-n:], len(seq) > n
    else:
        page, more = seq[:n], len(seq) > n
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": more}


def input_messages(items: Any) -> list[dict]:
    """Chat messages of a Responses `input`: a string (one user message) or an array of items:
    messages (role user / assistant / system / developer, text content), `function_call` items
    (joined to the assistant turn they follow) and `function_call_output` items (tool messages).
    `reasoning` items are skipped: this model writes none."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise bad(f"'input' must be a string or an array of items, got {_type_name(items)}", "input")
    msgs: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"'{where}' must be an object, got {_type_name(item)}", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad(f"'{where}.role' must be user, assistant, system or developer, got {role!r}", f"{where}.role")
            msgs.append({"role": role, "content": _text_parts(item.get("content"), where)})
        elif kind == "function_call":
            fields = {k: item.get(k) for k in ("call_id", "name", "arguments")}
            for k, v in fields.items():
                if not isinstance(v, str):
                    raise bad(f"'{where}.{k}' must be a string, got {_type_name(v)}", f"{where}.{k}")
            call = {"id": fields["call_id"], "type": "function",
                    "function": {"name": fields["name"], "arguments": fields["arguments"]}}
            if msgs and msgs[-1]["role"] == "assistant":  # the same turn: its text, then its calls
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad(f"'{where}.call_id' must be a string", f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _text_parts(output, where) if isinstance(output, list) else None
            if text is None:
                raise bad(f"'{where}.output' must be a string or an array of text parts", f"{where}.output")
            msgs.append({"role": "tool", "content": text, "tool_call_id": item["call_id"]})
        elif kind != "reasoning":
            raise bad(f"'{where}.type' {kind!r} is not supported: message, function_call, function_call_output or "
                      f"item_reference", f"{where}.type", "unsupported_parameter")
    return msgs


def _tools(body: dict) -> tuple[list[dict] | None, Any]:
    """Function tools and tool_choice in the chat shape ({"type": "function", "function": {...}})."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad(f"'tools' must be an array, got {_type_name(tools)}", "tools")
        out = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else t
                raise bad(f"'tools[{i}]': only function tools are supported here, got {kind!r}", "tools",
                          "unsupported_parameter")
            out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                         if t.get(k) is not None}})
        tools = out
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                      "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _format(body: dict) -> dict | None:
    """`text.format` as a chat response_format."""
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad(f"'text' must be an object {{\"format\": ...}}, got {_type_name(text)}", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("'text.format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": "
                  "\"json_schema\", \"name\", \"schema\"}", "text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise bad(f"'text.format.schema' must be a JSON schema object, got {_type_name(schema)}", "text.format")
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": schema,
                                                   "strict": fmt.get("strict")}}


@dataclass
class ResponsesRequest:
    chat: dict  # the equivalent chat request body (for parse_sampling)
    messages: list[dict]  # the prompt's messages, instructions first
    items: list[dict]  # the input items, earlier turns' first, as GET .../input_items lists them
    echo: dict  # the request's settings a Response repeats
    store: bool


def parse_request(body: dict, store: ResponseStore) -> ResponsesRequest:
    """A Responses request checked and turned into a chat request."""
    if "input" not in body:
        raise bad("'input' is required: a string or an array of items", "input")
    for name, neutral, what in [("background", (None, False), "replies are not run in the background"),
                                ("truncation", (None, "disabled"), "a prompt past the window is a 400, not cut"),
                                ("conversation", (None,), "no stored conversations; use previous_response_id"),
                                ("prompt", (None,), "no stored prompt templates"), ("n", (None, 1), "one output")]:
        if body.get(name) not in neutral:
            raise bad(f"'{name}' is not supported by this server ({what})", name, "unsupported_parameter")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad(f"'instructions' must be a string, got {_type_name(instructions)}", "instructions")
    keep = body.get("store", True)
    if not isinstance(keep, bool):
        raise bad(f"'store' must be a boolean, got {_type_name(keep)}", "store")
    inherited: list[dict] = []  # the earlier turns' items: the kept response's input items and output
    prev = body.get("previous_response_id")
    if prev is not None:
        if not isinstance(prev, str):
            raise bad(f"'previous_response_id' must be a string, got {_type_name(prev)}", "previous_response_id")
        kept, kept_items = store.get(prev, "previous_response_id")
        inherited = kept_items + kept["output"]
    given = resolve_references(body["input"], store)
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + \
        input_messages(inherited) + input_messages(given)
    if not messages:
        raise bad("'input' is empty: give at least one message", "input")
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
        raise bad("'include' must be an array of strings", "include")
    tools, choice = _tools(body)
    chat = {k: v for k, v in body.items() if k not in OWN_FIELDS}
    chat.update({"messages": parse_messages({"messages": messages}), "tools": tools, "tool_choice": choice,
                 "response_format": _format(body), "max_completion_tokens": _int(body, "max_output_tokens", None, lo=1)})
    if LOGPROBS_INCLUDE in include:
        chat.update(logprobs=True, top_logprobs=body.get("top_logprobs"))
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad(f"'metadata' must be an object, got {_type_name(metadata)}", "metadata")
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "metadata": metadata or {}, "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "previous_response_id": prev, "store": keep, "temperature": body.get("temperature", 1.0),
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_logprobs": body.get("top_logprobs"), "top_p": body.get("top_p", 1.0), "truncation": "disabled",
            "user": body.get("user"), "reasoning": {"effort": None, "summary": None}}
    return ResponsesRequest(chat, messages, inherited + input_items(given), echo, keep)


def _usage(u: dict) -> dict:
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": u["prompt_tokens_details"],
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


def _status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class ResponsesReply:
    """One Response, whole or as its event stream: the reply interface of
    plm.serve.app.GenerationResponse (one choice). `on_done(response)` runs when it completes."""

    def __init__(self, model: str, token_bytes: Callable[[int], bytes], echo: dict,
                 on_done: Callable[[dict], None] | None = None) -> None:
        self.model, self.token_bytes, self.echo, self.on_done = model, token_bytes, echo, on_done
        self.id = "resp_" + _hex()
        self.created = int(time.time())
        self.seq = 0  # events' sequence_number
        self.output: list[dict] = []  # finished output items (streamed)
        self.msg: dict | None = None  # the message being streamed: {"id", "text", "logprobs"}
        self.reason = "stop"

    def _object(self, status: str, output: list[dict], usage: dict | None = None, error: dict | None = None) -> dict:
        done = status in ("completed", "incomplete")
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": self.model, "output": output, **self.echo, "usage": _usage(usage) if done else None}

    def _final(self, output: list[dict], usage: dict, reason: str) -> dict:
        obj = self._object(_status(reason), output, usage)
        if self.on_done is not None:
            self.on_done(obj)
        return obj

    def _event(self, kind: str, **fields) -> bytes:
        data = json.dumps({"type": kind, "sequence_number": self.seq, **fields}, ensure_ascii=False,
                          separators=(",", ":"))
        self.seq += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def _logprobs(self, entries: list | None) -> list[dict]:
        return logprob_entries(self.token_bytes, entries or [])

    @staticmethod
    def _message(mid: str, text: str, logprobs: list[dict], status: str) -> dict:
        return {"id": mid, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}

    @staticmethod
    def _calls(calls: list[dict] | None) -> list[dict]:
        """function_call items of parsed calls (ids and arguments as chat's tool_calls have them)."""
        return [{"id": "fc_" + _hex(), "type": "function_call", "status": "completed", "call_id": c["id"],
                 "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in Reply.tool_calls(calls or [])]

    # ---- whole --------------------------------------------------------------------------------

    def full(self, choices: list[tuple[str, str, list | None, list | None]], usage: dict) -> dict:
        text, reason, lps, calls = choices[0]
        output = [self._message("msg_" + _hex(), text, self._logprobs(lps), _status(reason))] if text or not calls else []
        return self._final(output + self._calls(calls), usage, reason)

    # ---- streamed -----------------------------------------------------------------------------

    def opening(self, k: int) -> bytes:
        r = self._object("in_progress", [])
        return self._event("response.created", response=r) + self._event("response.in_progress", response=r)

    def _open(self) -> bytes:
        """The message item's start: its added events, before its first text."""
        self.msg = {"id": "msg_" + _hex(), "text": "", "logprobs": []}
        at = len(self.output)
        return (self._event("response.output_item.added", output_index=at,
                            item={**self._message(self.msg["id"], "", [], "in_progress"), "content": []})
                + self._event("response.content_part.added", item_id=self.msg["id"], output_index=at, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))

    def piece(self, text: str, logprobs: list | None, index: int = 0) -> bytes:
        if not text and not logprobs:
            return b""
        at = len(self.output)
        data = self._open() if self.msg is None else b""
        entries = self._logprobs(logprobs)
        self.msg["text"] += text
        self.msg["logprobs"] += entries
        return data + self._event("response.output_text.delta", item_id=self.msg["id"], output_index=at,
                                  content_index=0, delta=text, logprobs=entries)

    def finish(self, index: int, reason: str, content: str | None = None, calls: list | None = None,
               logprobs: list | None = None) -> bytes:
        self.reason = reason
        data = self.piece(content, logprobs) if content else b""
        if self.msg is None and not calls:  # an empty reply is still a message
            data += self._open()
        if self.msg is not None:
            m, at = self.msg, len(self.output)
            item = self._message(m["id"], m["text"], m["logprobs"], _status(reason))
            data += self._event("response.output_text.done", item_id=m["id"], output_index=at, content_index=0,
                                text=m["text"], logprobs=m["logprobs"])
            data += self._event("response.content_part.done", item_id=m["id"], output_index=at, content_index=0,
                                part=item["content"][0])
            data += self._event("response.output_item.done", output_index=at, item=item)
            self.output.append(item)
            self.msg = None
        for c in self._calls(calls):
            at = len(self.output)
            data += self._event("response.output_item.added", output_index=at,
                                item={**c, "arguments": "", "status": "in_progress"})
            data += self._event("response.function_call_arguments.delta", item_id=c["id"], output_index=at,
                                delta=c["arguments"])
            data += self._event("response.function_call_arguments.done", item_id=c["id"], output_index=at,
                                name=c["name"], arguments=c["arguments"])
            data += self._event("response.output_item.done", output_index=at, item=c)
            self.output.append(c)
        return data

    def closing(self, usage: dict, include_usage: bool = False) -> bytes:
        obj = self._final(self.output, usage, self.reason)
        return self._event("response." + obj["status"], response=obj)

    def failure(self, e: APIError) -> bytes:
        err = {"code": "server_error", "message": e.message}
        return self._event("response.failed", response=self._object("failed", self.output, error=err))
