"""The HTTP application (Starlette): OpenAI routes over a Scheduler.

  GET  /health               {"status": "ok" | "draining", ...}; never needs the API key
  GET  /v1/models            the served model
  POST /v1/completions       prompt -> text, streamed (SSE) or not
  POST /v1/chat/completions  messages (ChatML) -> assistant message, streamed or not
  POST /v1/responses         OpenAI's Responses API over the same (plm.serve.responses);
  GET, DELETE /v1/responses/{id}   the responses kept for previous_response_id (and
  GET /v1/responses/{id}/input_items   their input items)
  GET  /metrics              Prometheus text
  POST /tokenize             text (or chat messages) -> token ids  (vLLM's shape; lm-eval's
  POST /detokenize           token ids -> text                      "remote" tokenizer uses
  GET  /tokenizer_info       special tokens, chat template, window  these three)

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}. A generation
response watches its connection: a client that disconnects, mid-stream or while waiting for a
whole reply, cancels its request, and the scheduler frees the slot at its next iteration.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field, replace

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from plm.data.chat import CHATML_TEMPLATE_PLAIN, TOOL_CALL_OPEN, parse_tool_calls
from plm.errors import PLMError
from plm.infer.generate import GenerationConfig
from plm.serve.metrics import Metrics
from plm.serve.responses import ResponsesReply, ResponseStore, api_param, list_items, parse_request
from plm.serve.protocol import (APIError, Reply, Sampling, bool_field, parse_json, parse_messages,
                                parse_model, parse_prompts, parse_sampling, parse_tools)
from plm.serve.scheduler import Draining, Event, QueueFull, Request, Scheduler

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
          "/detokenize", "/tokenizer_info")


@dataclass
class AppState:
    scheduler: Scheduler
    tokenizer: object  # plm.data.tokenizer.Tokenizer
    model_names: list[str]  # the first is the id /v1/models lists
    context: int  # prompt + max_tokens may not exceed this
    api_key: str | None = None
    runtime: str = ""
    started: float = 0.0
    cors: tuple[list[str], str | None] | None = None  # (origins, origin regex) browser pages may read replies from
    responses: ResponseStore = field(default_factory=ResponseStore)  # kept for previous_response_id

    @property
    def metrics(self) -> Metrics:
        return self.scheduler.metrics


def error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


# ---- generation -----------------------------------------------------------------------------

def _grammar(tokenizer, sp: Sampling):
    """The grammar the request's replies must stay inside (None: free text): an extension
    field's (`grammar`, `guided_*`), tool calls when tools may be called (tool_choice auto: text
    or calls, the text in the response format when one is set), else the response format's JSON."""
    from plm.model.grammar import Grammar, GrammarError, tool_call_grammar
    main = "tools" if sp.calls_tools else sp.constraint[0] if sp.constraint else "response_format"
    param = main
    kind, schema = sp.response_format
    schema = {"type": "object"} if kind == "json_object" else schema
    ws = sp.json_whitespace
    try:
        if ws is not None:  # compiled alone first, so a bad expression is named as such
            param = "guided_whitespace_pattern"
            Grammar.regex(ws, tokenizer)
            param = main
        if sp.constraint is not None:
            _, how, value = sp.constraint
            if how == "json":
                return Grammar.json_schema(value, tokenizer, ws)
            make = {"gbnf": Grammar.gbnf, "regex": Grammar.regex, "choice": Grammar.choice}
            return make[how](value, tokenizer)
        if sp.calls_tools:
            text_schema = schema if kind != "text" else None
            # the format is compiled alone only to name its fault: on a failure, or where a
            # calls-only grammar (tool_choice required or named) leaves it out
            failed = None
            try:
                g = tool_call_grammar(sp.tools, tokenizer, sp.tool_choice, sp.parallel_tool_calls, text_schema, ws)
            except GrammarError as e:
                failed = e
            if text_schema is not None and (failed or sp.tool_choice != "auto"):
                param = "response_format"
                Grammar.json_schema(text_schema, tokenizer, ws)
                param = "tools"
            if failed:
                raise failed
            return g
        if kind != "text":
            return Grammar.json_schema(schema, tokenizer, ws)
    except GrammarError as e:  # a schema the engine cannot compile
        raise APIError(400, str(e), param=param, code="invalid_schema") from None
    except PLMError as e:  # no engine installed
        raise APIError(400, f"{e}; this server cannot constrain replies", param=param,
                       code="unsupported_parameter") from None
    return None


def _config(state: AppState, prompt_tokens: int, sp: Sampling, grammar=None, budget: str = "max_tokens") -> GenerationConfig:
    """The request's generation settings, after the context check (`budget`: the request's name
    for max_tokens)."""
    ctx = state.context
    if sp.max_tokens is None:  # as much as the window leaves
        if prompt_tokens >= ctx:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, {prompt_tokens - ctx + 1} more than this "
                                f"model's context window of {ctx} tokens allows (it must leave room for one token)",
                           param="messages", code="context_length_exceeded")
        max_new = ctx - prompt_tokens
    else:
        max_new = sp.max_tokens
        if prompt_tokens + max_new > ctx:
            over = prompt_tokens + max_new - ctx
            raise APIError(400, f"this model's context window is {ctx} tokens; the request needs {prompt_tokens + max_new} "
                                f"({prompt_tokens} in the prompt + {max_new} {budget}), {over} too many: lower "
                                f"{budget} or shorten the prompt",
                           param=budget, code="context_length_exceeded")
    vocab = state.tokenizer.vocab_size
    outside = [t for t in sp.logit_bias if t >= vocab]
    if outside:
        raise APIError(400, f"'logit_bias' names token ids outside the vocabulary (0..{vocab - 1}): {outside[:5]}",
                       param="logit_bias")
    return GenerationConfig(max_new_tokens=max_new, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                            min_p=sp.min_p, seed=sp.seed, stop_strings=list(sp.stop),
                            stop_token_ids=list(state.tokenizer.stop_token_ids),
                            presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
                            repetition_penalty=sp.repetition_penalty, logit_bias=dict(sp.logit_bias),
                            grammar=grammar)


async def _wait_disconnect(receive) -> None:
    """Returns when the client has gone away (the request body was read before)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


class GenerationResponse:
    """ASGI response for the submitted requests of one call, one per choice (prompts x n): SSE
    chunks, each naming its choice's index, or one JSON body; a disconnect cancels them all."""

    def __init__(self, state: AppState, reqs: list[Request], events: asyncio.Queue, reply: Reply, sp: Sampling,
                 echo: list[str | None]) -> None:
        self.state, self.reqs, self.events, self.reply, self.sp = state, reqs, events, reply, sp
        self.echo = list(echo)  # per choice: its prompt's text, sent ahead of the reply's first piece
        self.failed = False  # a choice failed: the others are cancelled, not disconnected
        # tools: replies are parsed for calls; streamed, a reply's text is held while it may be one
        self.tools = [t["function"]["name"] for t in sp.tools] if sp.calls_tools else None
        self.held: list[str | None] = ["" if self.tools else None for _ in reqs]
        self.held_lps: list[list] = [[] for _ in reqs]

    def _calls(self, text: str, finish_reason: str) -> tuple[str, str, list | None]:
        """(content, finish_reason, calls or None) of a whole reply."""
        if self.tools is None:
            return text, finish_reason, None
        content, calls = parse_tool_calls(text, self.tools)
        if not calls:
            return text, finish_reason, None
        return content, "tool_calls" if finish_reason == "stop" else finish_reason, calls

    def _lps(self, i: int, entries: list | None) -> list | None:
        return entries if self.reqs[i].logprobs is not None else None

    def _text(self, i: int, text: str) -> str:
        if self.echo[i] is not None:
            text, self.echo[i] = self.echo[i] + text, None
        return text

    def usage(self) -> dict:
        """Summed over the choices; a prompt shared by n choices counts once, as OpenAI counts."""
        u = [r.usage for r in self.reqs]
        prompt = sum(x["prompt_tokens"] for x in u[::self.sp.n])
        out = sum(x["completion_tokens"] for x in u)
        cached = sum(x["prompt_tokens_details"]["cached_tokens"] for x in u[::self.sp.n])
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def __call__(self, scope, receive, send) -> None:
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            if self.sp.stream:
                await self._stream(send, gone)
            else:
                await self._whole(scope, send, gone)
        finally:
            gone.cancel()
            left = [r for r in self.reqs if r.state != "done"]
            for r in left:
                self.state.scheduler.cancel(r)
            if left and not self.failed:  # the client went away (after an error: its siblings)
                self.state.metrics.inc("client_disconnects_total")

    async def _next(self, gone: asyncio.Future) -> tuple[int, Event] | None:
        """The next (choice, event), or None once the client has disconnected."""
        get = asyncio.ensure_future(self.events.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        return None

    async def _whole(self, scope, send, gone) -> None:
        k = len(self.reqs)
        pieces: list[list[str]] = [[] for _ in range(k)]
        lps = [[] if r.logprobs is not None else None for r in self.reqs]
        finish: list[str | None] = [None] * k
        while None in finish:
            got = await self._next(gone)
            if got is None:
                return  # nobody to answer
            i, ev = got
            if ev.kind == "text":
                pieces[i].append(self._text(i, ev.text))
                if lps[i] is not None:
                    lps[i] += ev.logprobs or []
            elif ev.kind == "error":
                self.failed = True
                await error_response(APIError(500, f"generation failed: {ev.text}", "server_error"))(scope, None, send)
                return
            else:
                finish[i] = ev.finish_reason
        choices = []
        for i in range(k):
            text, reason, calls = self._calls(self._text(i, "".join(pieces[i])), finish[i])
            choices.append((text, reason, lps[i], calls))
        await JSONResponse(self.reply.full(choices, self.usage()))(scope, None, send)

    async def _stream(self, send, gone) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        left = len(self.reqs)
        try:
            data = self.reply.opening(left)
            if data:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            while True:
                got = await self._next(gone)
                if got is None:
                    return
                i, ev = got
                if ev.kind == "text" and self.held[i] is not None:
                    data = self._hold(i, ev)
                elif ev.kind == "text":
                    data = self.reply.piece(self._text(i, ev.text), ev.logprobs, i)
                elif ev.kind == "error":
                    data = self.reply.failure(APIError(500, f"generation failed: {ev.text}", "server_error"))
                    left, self.failed = 0, True
                else:
                    data, reason, held = b"", ev.finish_reason, (None, None, None)
                    if self.echo[i] is not None:  # nothing was generated: the prompt still goes first
                        data = self.reply.piece(self._text(i, ""), None, i)
                    if self.held[i]:  # the held reply: tool calls, or text after all
                        content, reason, calls = self._calls(self.held[i], reason)
                        held = (content, calls, self._lps(i, self.held_lps[i]))
                    data += self.reply.finish(i, reason, *held)
                    left -= 1
                    if not left:
                        data += self.reply.closing(self.usage(), self.sp.include_usage)
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": left > 0})
                if not left:
                    return
        except OSError:  # the connection broke while sending
            return

    def _hold(self, i: int, ev: Event) -> bytes:
        """Streamed text of a reply that may call tools: held while it is, or may begin, a
        <tool_call> (sent whole at the end, as parsed calls); sent once it cannot be one."""
        self.held[i] += ev.text
        self.held_lps[i] += ev.logprobs or []
        start = self.held[i].lstrip()
        if start.startswith(TOOL_CALL_OPEN) or TOOL_CALL_OPEN.startswith(start):
            return b""
        text, lps = self.held[i], self._lps(i, self.held_lps[i])
        self.held[i] = None
        return self.reply.piece(text, lps, i)


async def _submit(state: AppState, prompts: list[list[int]], sp: Sampling, reply: Reply | ResponsesReply, route: str,
                  echo: list[str | None] | None = None, budget: str = "max_tokens") -> GenerationResponse:
    """One request per choice (each prompt n times, choice i = prompt i // n); all queued, or
    none (429 / 503)."""
    echo = echo or [None] * len(prompts)
    # compiled off the event loop (the first grammar also builds the engine's token trie: ~1 s)
    grammar = await run_in_threadpool(_grammar, state.tokenizer, sp) if sp.constrained else None
    cfgs = [_config(state, len(p), sp, grammar, budget) for p in prompts]  # the window check before anything runs
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emitter(i: int):
        def emit(ev: Event) -> None:  # called on the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (i, ev))
            except RuntimeError:  # the event loop is gone (a forced shutdown): nobody to tell
                pass
        return emit

    reqs = []
    for p, (prompt, cfg) in enumerate(zip(prompts, cfgs)):
        for j in range(sp.n):
            # n > 1 with a seed: choice j samples with seed + j, so the choices differ and repeat
            c = cfg if j == 0 else replace(cfg, seed=None if cfg.seed is None else cfg.seed + j)
            reqs.append(Request(prompt, c, emit=emitter(len(reqs)), route=route, logprobs=sp.logprobs,
                                score_prompt=echo[p] is not None and sp.logprobs is not None))
    try:
        for i, req in enumerate(reqs):
            state.scheduler.submit(req)
    except (QueueFull, Draining) as e:
        for req in reqs[:i]:
            state.scheduler.cancel(req)
        if isinstance(e, Draining):
            raise APIError(503, f"{e}; retry on another server", "server_error", code="shutting_down") from None
        raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                       code="rate_limit_exceeded") from None
    state.metrics.inc("requests_total", route=route)
    return GenerationResponse(state, reqs, events, reply, sp, [e for e in echo for _ in range(sp.n)])


MAX_BODY = 16 << 20  # bytes; far beyond any context window's worth of text


async def _body(http: HTTPRequest) -> dict:
    size = http.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"the request body is {int(size)} bytes; at most {MAX_BODY} are read",
                       code="request_too_large")
    return parse_json(await http.body())


async def _encode(state: AppState, text: str) -> list[int]:
    # off the event loop: a long prompt would hold up every other connection
    return await run_in_threadpool(state.tokenizer.encode, text)


async def completions(http: HTTPRequest):
    state: AppState = http.app.state.plm
    body = await _body(http)
    model = parse_model(body, state.model_names)
    sp = parse_sampling(body)
    tok = state.tokenizer
    prompts, echo = [], []
    given = parse_prompts(body, sp.n)
    for k, prompt in enumerate(given):
        where = "'prompt'" if len(given) == 1 else f"'prompt[{k}]'"
        if isinstance(prompt, str):
            ids = await _encode(state, prompt)
        else:
            ids = prompt
            bad_ids = [t for t in ids if not 0 <= t < tok.vocab_size]
            if bad_ids:
                raise APIError(400, f"{where} holds token ids outside the vocabulary (0..{tok.vocab_size - 1}): "
                                    f"{bad_ids[:5]}", param="prompt")
        if not ids:
            raise APIError(400, f"{where} is empty: give at least one token", param="prompt")
        prompts.append(ids)
        echo.append((prompt if isinstance(prompt, str) else tok.decode(ids)) if sp.echo else None)
    return await _submit(state, prompts, sp, Reply(model, chat=False, token_bytes=tok.token_bytes), "completions",
                         echo)


async def chat_completions(http: HTTPRequest):
    state: AppState = http.app.state.plm
    body = await _body(http)
    model = parse_model(body, state.model_names)
    sp = parse_sampling(body, chat=True)
    messages = parse_messages(body)
    text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tools=sp.tools if sp.calls_tools else None)
    ids = await _encode(state, text)
    return await _submit(state, [ids], sp, Reply(model, chat=True, token_bytes=state.tokenizer.token_bytes), "chat")


async def responses(http: HTTPRequest):
    """OpenAI's Responses API: the request becomes a chat request (plm.serve.responses), the
    reply a Response; completed ones are kept (store) for previous_response_id."""
    state: AppState = http.app.state.plm
    body = await _body(http)
    model = parse_model(body, state.model_names)
    try:
        req = parse_request(body, state.responses)
        sp = parse_sampling(req.chat, chat=True)
        text = state.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True,
                                                   tools=sp.tools if sp.calls_tools else None)
        ids = await _encode(state, text)

        def keep(response: dict) -> None:
            state.responses.put(response["id"], response, req.items)

        reply = ResponsesReply(model, state.tokenizer.token_bytes, req.echo, keep if req.store else None)
        return await _submit(state, [ids], sp, reply, "responses", budget="max_output_tokens")
    except APIError as e:  # the chat machinery's errors under the Responses API's names
        e.param = api_param(e.param)
        raise


async def kept_response(http: HTTPRequest):
    """GET /v1/responses/{id}: a kept Response; DELETE: forget it."""
    state: AppState = http.app.state.plm
    rid = http.path_params["rid"]
    if http.method == "DELETE":
        state.responses.delete(rid)
        return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})
    return JSONResponse(state.responses.get(rid)[0])


async def kept_input_items(http: HTTPRequest):
    """GET /v1/responses/{id}/input_items: a kept request's input items, a list page."""
    state: AppState = http.app.state.plm
    return JSONResponse(list_items(state.responses.get(http.path_params["rid"])[1], dict(http.query_params)))


# ---- the tokenizer (vLLM's routes) -------------------------------------------------------------

async def tokenize(http: HTTPRequest):
    """{"prompt": text} or {"messages": [...], "add_generation_prompt": true, "tools": [...]} ->
    {"tokens", "count", "max_model_len"}. Special-token text always becomes its id, as in prompts."""
    state: AppState = http.app.state.plm
    body = await _body(http)
    if "messages" in body:
        tools, choice, _ = parse_tools(body)
        text = state.tokenizer.apply_chat_template(parse_messages(body), bool_field(body, "add_generation_prompt", True),
                                                   tools=tools if choice != "none" else None)
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise APIError(400, "'prompt' (a string) or 'messages' is required", param="prompt")
    ids = await _encode(state, text)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.context})


async def detokenize(http: HTTPRequest):
    state: AppState = http.app.state.plm
    body = await _body(http)
    ids = body.get("tokens")
    vocab = state.tokenizer.vocab_size
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise APIError(400, "'tokens' must be an array of token ids", param="tokens")
    bad_ids = [t for t in ids if not 0 <= t < vocab]
    if bad_ids:
        raise APIError(400, f"'tokens' holds ids outside the vocabulary (0..{vocab - 1}): {bad_ids[:5]}", param="tokens")
    return JSONResponse({"prompt": state.tokenizer.decode(ids)})


async def tokenizer_info(http: HTTPRequest):
    state: AppState = http.app.state.plm
    tok = state.tokenizer
    return JSONResponse({"tokenizer_class": "Qwen2Tokenizer", "eos_token": tok.eos_token, "bos_token": None,
                         "pad_token": tok.pad_token, "chat_template": CHATML_TEMPLATE_PLAIN,
                         "model_max_length": state.context, "vocab_size": tok.vocab_size})


# ---- the rest ---------------------------------------------------------------------------------

async def models(http: HTTPRequest):
    state: AppState = http.app.state.plm
    data = [{"id": state.model_names[0], "object": "model", "created": int(state.started), "owned_by": "plm"}]
    return JSONResponse({"object": "list", "data": data})


async def health(http: HTTPRequest):
    state: AppState = http.app.state.plm
    s = state.scheduler
    return JSONResponse({"status": "draining" if s.draining else "ok", "model": state.model_names[0],
                         "runtime": state.runtime, "running": s.running, "queued": s.queue_depth,
                         "max_batch": s.max_batch})


async def metrics(http: HTTPRequest):
    state: AppState = http.app.state.plm
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def _api_error(http: HTTPRequest, e: APIError):
    return error_response(e)


async def _http_error(http: HTTPRequest, e: HTTPException):
    if e.status_code == 404:
        return error_response(APIError(404, f"no route {http.method} {http.url.path}; this server has "
                                            f"{', '.join(ROUTES)}", code="not_found"))
    if e.status_code == 405:
        return error_response(APIError(405, f"{http.method} is not allowed on {http.url.path}",
                                       code="method_not_allowed"))
    return error_response(APIError(e.status_code, str(e.detail)))


async def _server_error(http: HTTPRequest, e: Exception):
    return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


class Gate:
    """ASGI middleware: the API key (every route but /health) and per-route response counts."""

    def __init__(self, app, state: AppState) -> None:
        self.app, self.state = app, state
        self.key = ("Bearer " + state.api_key).encode() if state.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in ROUTES else "other"

        async def counted(msg):
            if msg["type"] == "http.response.start":
                self.state.metrics.inc("http_responses_total", path=label, status=str(msg["status"]))
            await send(msg)

        if self.key is not None and path != "/health":
            got = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(got, self.key):
                why = "no API key given" if not got else "the API key is wrong"
                resp = error_response(APIError(401, f"{why}: send 'Authorization: Bearer <key>' "
                                                    f"(the server was started with --api-key)",
                                               code="invalid_api_key"))
                return await resp(scope, receive, counted)
        await self.app(scope, receive, counted)


def create_app(state: AppState) -> Starlette:
    state.started = state.started or time.time()
    m = state.metrics
    m.counter("requests_total", "Generation requests accepted, by route.")
    m.counter("client_disconnects_total", "Requests whose client went away before the reply ended.")
    m.counter("http_responses_total", "HTTP responses, by path and status.")
    routes = [Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/responses", responses, methods=["POST"]),
              Route("/v1/responses/{rid}", kept_response, methods=["GET", "DELETE"]),
              Route("/v1/responses/{rid}/input_items", kept_input_items, methods=["GET"]),
              Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
              Route("/tokenizer_info", tokenizer_info)]
    app = Starlette(routes=routes, exception_handlers={APIError: _api_error, HTTPException: _http_error,
                                                       Exception: _server_error})
    app.state.plm = state
    app.add_middleware(Gate, state=state)
    if state.cors is not None:  # outermost: a browser's preflight carries no API key, so it must not reach Gate
        origins, regex = state.cors
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=regex,
                           allow_methods=["GET", "POST"], allow_headers=["*"], max_age=600)
    return app

