"""`plm serve`: live servers on loopback (the real `openai` client and httpx), and the batching
core in-process.

Truth is computed independently: greedy and seeded text from plm.infer.generate.generate on
the reference model (float32), which the float32 server must reproduce exactly whether a
request runs alone or among 8 others.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from collections import OrderedDict

import pytest
import torch

openai = pytest.importorskip("openai", reason="the test extra: pip install -e '.[serve,test]'")
httpx = pytest.importorskip("httpx", reason="the test extra: pip install -e '.[serve,test]'")
pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("starlette", reason="the serve extra: pip install -e '.[serve]'")

from plm.errors import PLMError  # noqa: E402
from plm.infer.generate import GenerationConfig, generate  # noqa: E402
from plm.serve.metrics import parse_prometheus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The Peripheral Language Model", "def fib(n):", "Once upon a time, in a land far away, there lived",
           "1 + 1 =", "Hello", "import torch\nimport numpy as np\n",
           "The quick brown fox jumps over the lazy dog. The quick brown fox", "Q: What is 7 times 8?\nA:"]
N = 24  # tokens per request in the equality checks


# ---- live servers ------------------------------------------------------------------------------

# `python -m plm ...` that Linux kills when the test process dies, even by a signal (a crashed
# pytest left its servers running, each holding a model): prctl(PR_SET_PDEATHSIG, SIGKILL),
# then plm's CLI. Not Popen's preexec_fn, which may deadlock in a process with threads.
DIES_WITH_PARENT = ("import ctypes, os, runpy, sys; ppid = int(os.environ.pop('PLM_TEST_PPID'))\n"
                    "if sys.platform == 'linux':\n"
                    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)\n"
                    "    os.getppid() == ppid or os._exit(1)  # the parent died before prctl took effect\n"
                    "sys.argv[0] = 'plm'; runpy.run_module('plm', run_name='__main__', alter_sys=True)")


class Server:
    """`plm serve` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, *args: str, env: dict | None = None) -> None:
        cmd = [sys.executable, "-c", DIES_WITH_PARENT, "serve", str(model), "--port", "0", "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {}), "PLM_TEST_PPID": str(os.getpid())})
        self.lines: list[str] = []
        self.url = None
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines) + (self.proc.stdout.read() or ""))
        # keep draining its output so it never blocks on a full pipe
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metrics(self, **kw) -> dict[str, float]:
        return parse_prometheus(httpx.get(self.url + "/metrics", **kw).text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def truth_model(qwen2_micro_dir):
    from plm.data.tokenizer import Tokenizer
    from plm.model.modeling import PLMForCausalLM
    return PLMForCausalLM.from_pretrained(qwen2_micro_dir, dtype="float32"), Tokenizer.from_dir(qwen2_micro_dir)


def truth(truth_model, prompt: str, n: int = N, **cfg) -> str:
    model, tok = truth_model
    return generate(model, tok, prompt, GenerationConfig(max_new_tokens=n, **cfg)).texts[0]


def chat_text(truth_model, content: str) -> str:
    return truth_model[1].apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def server(qwen2_micro_dir):
    """float32 (so the reference model is exact truth), 8 slots."""
    s = Server(qwen2_micro_dir, "--runtime", "edge", "--dtype", "float32", "--max-batch", "8", "--model-name", "micro",
               "--allowed-origins", "https://chat.example.org,local")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(qwen2_micro_dir):
    """One slot, one queue place, an API key: queueing, 429, 401 and disconnects."""
    s = Server(qwen2_micro_dir, "--runtime", "edge", "--dtype", "float32", "--max-batch", "1", "--max-queue", "1",
               "--api-key", "sekrit", "--context", "480", "--model-name", "micro")
    yield s
    s.stop()


# ---- OpenAI client: completions and chat, streamed and not --------------------------------------

def test_models_and_health(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["micro"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["runtime"] == "edge" and h["max_batch"] == 8


def test_completion_and_chat_equal_the_reference(server, truth_model):
    client = server.client()
    want = truth(truth_model, PROMPTS[0])
    r = client.completions.create(model="micro", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == N and r.usage.prompt_tokens == len(truth_model[1].encode(PROMPTS[0]))
    pieces = [c.choices[0].text for c in client.completions.create(model="micro", prompt=PROMPTS[0], max_tokens=N,
                                                                     temperature=0, stream=True)]
    assert "".join(pieces) == want and len([p for p in pieces if p]) > 1

    want = truth(truth_model, chat_text(truth_model, "Hi there"))
    r = client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "Hi there"}],
                                       max_tokens=N, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "Hi there"}],
                                                 max_tokens=N, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == N and not chunks[-1].choices


def test_seeded_sampling_is_reproducible(server, truth_model):
    """A seeded sampled request gives the same text again, also while others run; another seed
    another text. (Alone == batched bit for bit is the native runtime's promise, tested below: on
    the PyTorch runtime a batched matmul may round differently in the last bit, and a random
    model's nearly flat next-token distribution turns that into another sampled token.)"""
    client = server.client()
    kw = dict(model="micro", max_tokens=N, temperature=0.9, top_p=0.95, seed=1234)
    alone = client.completions.create(prompt=PROMPTS[2], **kw).choices[0].text
    with ThreadPoolExecutor(6) as ex:
        others = [ex.submit(client.completions.create, prompt=p, **{**kw, "seed": i}) for i, p in enumerate(PROMPTS[:5])]
        [f.result() for f in others]
    assert client.completions.create(prompt=PROMPTS[2], **kw).choices[0].text == alone
    assert alone != truth(truth_model, PROMPTS[2])  # sampled, not greedy
    other = client.completions.create(prompt=PROMPTS[2], **{**kw, "seed": 99}).choices[0].text
    assert other != alone  # the seed matters (a test that could not fail otherwise)


def test_stop_strings_streamed_and_not(server, truth_model):
    client = server.client()
    model, tok = truth_model
    toks = generate(model, tok, PROMPTS[1], GenerationConfig(max_new_tokens=40)).tokens[0]
    full = tok.decode(toks)
    # a stop string across a token boundary: its first half is streamable text until the
    # second half arrives, so a server that does not hold it back leaks it
    for k in range(4, 30):
        head, nxt = tok.decode(toks[:k]), tok.decode(toks[:k + 1])
        stop = head[-2:] + nxt[len(head):][:2]
        if len(stop) == 4 and "\ufffd" not in stop and full.find(stop) == len(head) - 2:
            break
    else:
        pytest.fail("no stop string across a token boundary in the reference output")
    want = full[:full.index(stop)]
    r = client.completions.create(model="micro", prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=[stop, "zzzq"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    pieces = [c.choices[0].text for c in client.completions.create(model="micro", prompt=PROMPTS[1], max_tokens=40,
                                                                     temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == want  # nothing of the stop string was streamed before it completed


def test_eight_concurrent_greedy_requests_equal_one_at_a_time(server, truth_model):
    client = server.client()

    def ask(i: int) -> str:
        if i % 2:
            return client.chat.completions.create(model="micro", messages=[{"role": "user", "content": PROMPTS[i]}],
                                                  max_tokens=N, temperature=0).choices[0].message.content
        return client.completions.create(model="micro", prompt=PROMPTS[i], max_tokens=N, temperature=0).choices[0].text

    before = server.metrics()
    one_at_a_time = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(ask, range(8)))
    want = [truth(truth_model, chat_text(truth_model, p) if i % 2 else p) for i, p in enumerate(PROMPTS)]
    assert one_at_a_time == want
    assert together == want
    after = server.metrics()
    steps = after["plm_batch_size_count"] - before.get("plm_batch_size_count", 0)
    single = after['plm_batch_size_bucket{le="1"}'] - before.get('plm_batch_size_bucket{le="1"}', 0)
    assert steps - single >= N // 2, "the concurrent requests were not decoded in shared batches"
    assert after['plm_batch_size_bucket{le="4"}'] < after['plm_batch_size_bucket{le="8"}'], "never more than 4 at once"


def _reference_logprobs(truth_model, prompt_ids: list[int], reply_ids: list[int]) -> torch.Tensor:
    """log-softmax of the float32 reference model's logits at each reply position [T, V]."""
    model, tok = truth_model
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    logits[:, tok.vocab_size:] = float("-inf")
    return logits.log_softmax(-1)


def test_logprobs_are_the_models_log_softmax(server, truth_model):
    client = server.client()
    model, tok = truth_model
    prompt_ids = tok.encode(PROMPTS[0])
    r = client.completions.create(model="micro", prompt=PROMPTS[0], max_tokens=N, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == N
    ref = _reference_logprobs(truth_model, prompt_ids, generate(model, tok, PROMPTS[0],
                                                                GenerationConfig(max_new_tokens=N)).tokens[0])
    want = ref.max(-1).values  # greedy: the chosen token is the best one
    assert torch.allclose(torch.tensor(lp.token_logprobs), want, atol=1e-4), (lp.token_logprobs, want)
    top = ref.topk(3)
    for j, alts in enumerate(lp.top_logprobs):
        assert list(alts) == [tok.decode([t]) for t in top.indices[j].tolist()]
        assert torch.allclose(torch.tensor(list(alts.values())), top.values[j], atol=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(N)]

    # chat, streamed: every chunk carries its tokens; their bytes join to the text
    chat = [{"role": "user", "content": "Hi there"}]
    chat_ids = tok.encode(chat_text(truth_model, "Hi there"))
    chunks = list(client.chat.completions.create(model="micro", messages=chat, max_tokens=N, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == N and bytes(b for e in entries for b in e.bytes).decode() == text
    ref = _reference_logprobs(truth_model, chat_ids, generate(model, tok, chat_text(truth_model, "Hi there"),
                                                              GenerationConfig(max_new_tokens=N)).tokens[0]).topk(2)
    assert torch.allclose(torch.tensor([e.logprob for e in entries]), ref.values[:, 0], atol=1e-4)
    assert torch.allclose(torch.tensor([[a.logprob for a in e.top_logprobs] for e in entries]), ref.values, atol=1e-4)
    # sampled: still the model's log-probabilities (not the sampler's), so never above the best one
    r = client.chat.completions.create(model="micro", messages=chat, max_tokens=N, temperature=1.0, seed=3,
                                       logprobs=True, top_logprobs=1)
    assert all(e.logprob <= e.top_logprobs[0].logprob + 1e-6 for e in r.choices[0].logprobs.content)
    assert any(e.logprob < e.top_logprobs[0].logprob - 1e-3 for e in r.choices[0].logprobs.content)
    # not asked for: null
    r = client.chat.completions.create(model="micro", messages=chat, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None
    r = client.chat.completions.create(model="micro", messages=chat, max_tokens=4, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[]] * 4


def test_echo_scores_the_prompt(server, truth_model):
    """echo + logprobs (what lm-evaluation-harness's local-completions sends for log-likelihood
    tasks): the prompt's text first, then each prompt token's log-probability given those before
    it (the first: null), equal to the reference model's; then the generated token's."""
    model, tok = truth_model
    ids = tok.encode(PROMPTS[2]) * 6  # past one scoring chunk (64 tokens)
    assert len(ids) > 64
    body = {"model": "micro", "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    with torch.no_grad():
        last = model(torch.tensor([ids])).logits[0, -1, :tok.vocab_size]
    want_next = [int(last.argmax())]
    assert choice["text"] == tok.decode(ids) + tok.decode(want_next)
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _reference_logprobs(truth_model, ids[:1], ids[1:] + want_next)  # rows predict ids[1:], then the reply
    got = torch.tensor(lp["token_logprobs"][1:])
    want = ref[torch.arange(len(ids)), torch.tensor(ids[1:] + want_next)]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.allclose(torch.tensor([max(t.values()) for t in lp["top_logprobs"][1:]]), ref.max(-1).values, atol=1e-4)
    assert r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # streamed: the prompt's text and entries come with the first chunk
    chunks = [json.loads(line[6:]) for line in httpx.post(server.url + "/v1/completions", timeout=120,
                                                           json={**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[0]["choices"][0]["text"].startswith(tok.decode(ids))
    assert [v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"]["token_logprobs"]] \
        == lp["token_logprobs"]
    # echo without logprobs: the text only
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 2, "temperature": 0,
                                                         "echo": True}).json()
    assert r["choices"][0]["text"] == PROMPTS[3] + truth(truth_model, PROMPTS[3], 2)


def test_prompt_batches_and_n_choices(server, truth_model):
    """A batch of prompts gives one choice per prompt, in order, each the reference's; n samples
    per prompt: choice j with seed + j, streamed with their indices."""
    client = server.client()
    r = client.completions.create(model="micro", prompt=[PROMPTS[0], PROMPTS[3], PROMPTS[5]], max_tokens=N,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [truth(truth_model, p) for p in (PROMPTS[0], PROMPTS[3], PROMPTS[5])]
    tok = truth_model[1]
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in (PROMPTS[0], PROMPTS[3], PROMPTS[5]))
    assert r.usage.completion_tokens == 3 * N
    kw = dict(model="micro", prompt=PROMPTS[2], max_tokens=N, temperature=0.9, top_p=0.95)
    three = client.completions.create(n=3, seed=5, **kw)
    assert len(three.choices) == 3 and len({c.text for c in three.choices}) > 1
    # seeded: the same three again (choice j == the request with seed 5 + j alone is the native
    # runtime's bit-for-bit promise: test_native_runtime_server)
    assert [c.text for c in client.completions.create(n=3, seed=5, **kw).choices] == [c.text for c in three.choices]
    assert three.usage.prompt_tokens == len(tok.encode(PROMPTS[2]))  # the shared prompt counts once
    # an error names the prompt it is about: the one, or the batch's k-th
    bad = 10 ** 9
    assert _err(httpx.post(server.url + "/v1/completions", json={"prompt": [1, bad]}), 400).startswith("'prompt' holds")
    assert _err(httpx.post(server.url + "/v1/completions", json={"prompt": ["a", [1, bad]]}), 400).startswith(
        "'prompt[1]' holds")
    chunks = list(client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "Hi there"}],
                                                 max_tokens=N, temperature=0, n=2, stream=True))
    want = truth(truth_model, chat_text(truth_model, "Hi there"))
    for j in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == j]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in mine) == want


def test_tokenizer_routes(server, truth_model):
    tok = truth_model[1]
    text = "Hello wörld <|im_end|>"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    chat = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": chat}).json()
    assert r["tokens"] == tok.encode(chat_text(truth_model, "Hi"))
    assert httpx.post(server.url + "/detokenize", json={"tokens": tok.encode(text)}).json()["prompt"] == text
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and "<|im_start|>" in info["chat_template"]
    _err(httpx.post(server.url + "/tokenize", json={"prompt": 5}), 400, param="prompt")
    _err(httpx.post(server.url + "/detokenize", json={"tokens": [1, 10 ** 9]}), 400, param="tokens")
    _err(httpx.post(server.url + "/detokenize", json={"tokens": "abc"}), 400, param="tokens")


@pytest.mark.parametrize("backend", ["huggingface", "auto"])
def test_lm_eval_local_completions_against_the_server(server, truth_model, qwen2_micro_dir, backend):
    """lm-evaluation-harness's own OpenAI-compatible client (`local-completions`) scores
    log-likelihoods and generates through the server: each equals the reference model's. Its
    tokenizer: the checkpoint's, through transformers, or (auto) the server's own routes."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    model, tok = truth_model
    kw = {"tokenizer": str(qwen2_micro_dir)} if backend == "huggingface" else {}
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="micro", tokenizer_backend=backend,
                             max_retries=1, max_length=480, batch_size=1 if backend == "huggingface" else 4, **kw)
    assert lm.tokenizer_backend == ("huggingface" if backend == "huggingface" else "remote")
    pairs = [("Q: What is 7 times 8?\nA:", " 56"), ("The quick brown fox", " jumps over the lazy dog")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ctx_ids, whole = tok.encode(ctx), tok.encode(ctx + cont)
        ref = _reference_logprobs(truth_model, ctx_ids, whole[len(ctx_ids):])
        cont_ids = torch.tensor(whole[len(ctx_ids):])
        want = ref[torch.arange(len(cont_ids)), cont_ids]
        assert ll == pytest.approx(float(want.sum()), abs=1e-3)
        assert greedy == bool((ref.argmax(-1) == cont_ids).all())
    out = lm.generate_until([Instance("generate_until", {}, (PROMPTS[0], {"until": ["\n\n"], "max_gen_toks": 12}), 0)],
                            disable_tqdm=True)
    want = truth(truth_model, PROMPTS[0], 12)
    assert out == [want.split("\n\n")[0]]


def test_penalties_and_logit_bias_equal_a_hand_loop(server, truth_model):
    """Greedy with OpenAI's presence and frequency penalties, computed here by hand from the
    reference model's logits, and a logit bias that forces one token."""
    client = server.client()
    model, tok = truth_model
    ids = tok.encode(PROMPTS[6])
    counts = torch.zeros(model.config.vocab_size)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(N):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            logits[tok.vocab_size:] = float("-inf")
            t = int((logits - 1.5 * counts - 0.75 * (counts > 0).float()).argmax())
            out.append(t)
            counts[t] += 1
    r = client.completions.create(model="micro", prompt=PROMPTS[6], max_tokens=N, temperature=0,
                                  frequency_penalty=1.5, presence_penalty=0.75)
    assert r.choices[0].text == tok.decode(out)
    assert r.choices[0].text != truth(truth_model, PROMPTS[6])  # the penalties changed the reply
    # the repetition penalty (an extension) as plm generate applies it
    r = client.completions.create(model="micro", prompt=PROMPTS[6], max_tokens=N, temperature=0,
                                  extra_body={"repetition_penalty": 1.5})
    assert r.choices[0].text == truth(truth_model, PROMPTS[6], repetition_penalty=1.5)
    assert r.choices[0].text != truth(truth_model, PROMPTS[6])
    the = tok.encode(" the")[0]
    r = client.completions.create(model="micro", prompt=PROMPTS[6], max_tokens=5, temperature=0.8, seed=1,
                                  logit_bias={str(the): 100})
    assert r.choices[0].text == " the" * 5
    # min_p (an extension) reaches the sampler: 1.0 keeps only the best token, so sampling is greedy
    r = client.completions.create(model="micro", prompt=PROMPTS[6], max_tokens=N, temperature=1.5, seed=3,
                                  extra_body={"min_p": 1.0})
    assert r.choices[0].text == truth(truth_model, PROMPTS[6])


# ---- structured output and tool calls -------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                   "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "required": ["a", "b"], "additionalProperties": False}}}


def test_response_format_json_schema(server, truth_model):
    """The reply is JSON under the schema (checked by jsonschema), and exactly the reference
    model's constrained greedy reply, whole, streamed, and through the client's parse()."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    from pydantic import BaseModel, Field
    from plm.model.grammar import Grammar
    client, tok = server.client(), truth_model[1]
    msgs = [{"role": "user", "content": "Describe a person."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    want = truth(truth_model, chat_text(truth_model, msgs[0]["content"]), n=60, grammar=Grammar.json_schema(PERSON, tok))
    r = client.chat.completions.create(model="micro", messages=msgs, max_tokens=60, temperature=0, response_format=fmt)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(want), PERSON)
    chunks = client.chat.completions.create(model="micro", messages=msgs, max_tokens=60, temperature=0,
                                            response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=150)
    for seed in (1, 2):
        parsed = client.chat.completions.parse(model="micro", messages=msgs, max_tokens=60, seed=seed,
                                               response_format=Person).choices[0].message.parsed
        assert isinstance(parsed, Person) and 0 <= parsed.age <= 150
    # completions too, and json_object: the reply opens an object
    want = truth(truth_model, PROMPTS[4], n=60, grammar=Grammar.json_schema(PERSON, tok))
    r = client.completions.create(model="micro", prompt=PROMPTS[4], max_tokens=60, temperature=0,
                                  extra_body={"response_format": fmt})
    assert r.choices[0].text == want
    r = client.chat.completions.create(model="micro", messages=msgs, max_tokens=8, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


def test_llama_cpp_and_vllm_constraint_fields(server, truth_model):
    """llama.cpp's `grammar` (GBNF) and vLLM's `guided_json` / `guided_regex` / `guided_choice` /
    `guided_grammar`: each reply is the reference model's greedy reply under the same grammar,
    and in its language; conflicting or malformed constraints are 400s naming the field."""
    pytest.importorskip("llguidance")
    from plm.model.grammar import Grammar
    client, tok = server.client(), truth_model[1]
    gbnf = 'root ::= ("yes" | "no") ", " [0-9]{1,3} "."'
    choices = ["red", "green", 'a "blue" one']
    cases = [("grammar", gbnf, Grammar.gbnf(gbnf, tok), r"(yes|no), [0-9]{1,3}\."),
             ("guided_grammar", gbnf, Grammar.gbnf(gbnf, tok), r"(yes|no), [0-9]{1,3}\."),
             ("guided_regex", r"[A-Z][a-z]{2,6}-[0-9]{2}", Grammar.regex(r"[A-Z][a-z]{2,6}-[0-9]{2}", tok),
              r"[A-Z][a-z]{2,6}-[0-9]{2}"),
             ("guided_choice", choices, Grammar.choice(choices, tok), "|".join(re.escape(c) for c in choices)),
             ("guided_json", json.dumps(PERSON), Grammar.json_schema(PERSON, tok), None),
             # vLLM's newer form of the same
             ("structured_outputs", {"choice": choices}, Grammar.choice(choices, tok),
              "|".join(re.escape(c) for c in choices)),
             ("structured_outputs", {"grammar": gbnf}, Grammar.gbnf(gbnf, tok), r"(yes|no), [0-9]{1,3}\."),
             ("structured_outputs", {"json": PERSON}, Grammar.json_schema(PERSON, tok), None)]
    for name, value, grammar, pattern in cases:
        want = truth(truth_model, PROMPTS[2], n=60, grammar=grammar)
        r = client.completions.create(model="micro", prompt=PROMPTS[2], max_tokens=60, temperature=0,
                                      extra_body={name: value})
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop", (name, want)
        if pattern:
            assert re.fullmatch(pattern, want), (name, want)
        else:
            assert set(json.loads(want)) == set(PERSON["properties"])
        msgs = [{"role": "user", "content": PROMPTS[2]}]
        want = truth(truth_model, chat_text(truth_model, PROMPTS[2]), n=60, grammar=grammar)
        r = client.chat.completions.create(model="micro", messages=msgs, max_tokens=60, temperature=0,
                                           extra_body={name: value})
        assert r.choices[0].message.content == want, name
    r = client.completions.create(model="micro", prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                  extra_body={"structured_outputs": {"json_object": True}})
    assert r.choices[0].text.startswith("{")
    url = server.url + "/v1/completions"
    for body, param, code in [
            ({"grammar": gbnf, "guided_regex": "a+"}, "guided_regex", None),
            ({"grammar": gbnf, "response_format": {"type": "json_object"}}, "response_format", None),
            ({"grammar": "root ::= foo"}, "grammar", "invalid_schema"),
            ({"guided_regex": ""}, "guided_regex", None),
            ({"guided_regex": "(unclosed"}, "guided_regex", "invalid_schema"),
            ({"guided_choice": []}, "guided_choice", None),
            ({"guided_choice": ["a", 5]}, "guided_choice", None),
            ({"guided_json": "{not json"}, "guided_json", None),
            ({"guided_json": [1]}, "guided_json", None),
            ({"structured_outputs": {}}, "structured_outputs", None),
            ({"structured_outputs": {"regex": "a+", "choice": ["b"]}}, "structured_outputs", None),
            ({"structured_outputs": "json"}, "structured_outputs", None),
            ({"structured_outputs": {"regex": "a+"}, "guided_regex": "b+"}, "structured_outputs.regex", None),
            ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "invalid_schema")]:
        _err(httpx.post(url, json={"prompt": "x", "max_tokens": 4, **body}), 400, code=code, param=param)
    _err(httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "tools": [ADD], "grammar": gbnf}), 400,
        code="unsupported_parameter", param="grammar")
    # vLLM's guided_whitespace_pattern: the JSON's whitespace, here beside guided_json and response_format
    ws = r"[ \n]{0,2}"
    want = truth(truth_model, PROMPTS[2], n=60, grammar=Grammar.json_schema(PERSON, tok, whitespace=ws))
    assert want != truth(truth_model, PROMPTS[2], n=60, grammar=Grammar.json_schema(PERSON, tok))
    for extra in ({"guided_json": PERSON}, {"response_format": {"type": "json_schema",
                                                                "json_schema": {"name": "p", "schema": PERSON}}}):
        r = client.completions.create(model="micro", prompt=PROMPTS[2], max_tokens=60, temperature=0,
                                      extra_body={**extra, "guided_whitespace_pattern": ws})
        assert r.choices[0].text == want and set(json.loads(want)) == set(PERSON["properties"]), extra
    for pattern, code in [(5, None), ("", None), ("(unclosed", "invalid_schema")]:
        _err(httpx.post(url, json={"prompt": "x", "max_tokens": 4, "guided_json": PERSON,
                                   "guided_whitespace_pattern": pattern}), 400, code=code,
             param="guided_whitespace_pattern")


def test_tool_calls(server, truth_model):
    """Forced calls come back as OpenAI tool_calls whose arguments fit the function's schema, the
    reference model's constrained reply parsed; streamed the same; earlier calls and tool results
    in the messages are rendered in the tool-call format."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    from plm.data.chat import parse_tool_calls
    from plm.model.grammar import tool_call_grammar
    client, tok = server.client(), truth_model[1]
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tools=[WEATHER, ADD])
    for choice, wire in [("required", "required"), ("add", {"type": "function", "function": {"name": "add"}})]:
        want = truth(truth_model, prompt, n=80, grammar=tool_call_grammar([WEATHER, ADD], tok, choice))
        _, want_calls = parse_tool_calls(want)
        r = client.chat.completions.create(model="micro", messages=msgs, tools=[WEATHER, ADD], tool_choice=wire,
                                           max_tokens=80, temperature=0)
        m, fin = r.choices[0].message, r.choices[0].finish_reason
        assert fin == "tool_calls" and m.content is None and m.tool_calls
        got = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in m.tool_calls]
        assert got == want_calls and all(c.type == "function" and c.id.startswith("call_") for c in m.tool_calls)
        for c in got:
            jsonschema.validate(c["arguments"], {"get_weather": WEATHER, "add": ADD}[c["name"]]["function"]["parameters"])
        if choice == "add":
            assert {c["name"] for c in got} == {"add"}
        assert r.usage.prompt_tokens == len(tok.encode(prompt))
        counted = httpx.post(server.url + "/tokenize", json={"messages": msgs, "tools": [WEATHER, ADD]}).json()
        assert counted["tokens"] == tok.encode(prompt)
        chunks = list(client.chat.completions.create(model="micro", messages=msgs, tools=[WEATHER, ADD],
                                                     tool_choice=wire, max_tokens=80, temperature=0, stream=True))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert [{"name": d.function.name, "arguments": json.loads(d.function.arguments)} for d in deltas] == got
        assert [d.index for d in deltas] == list(range(len(got)))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    # one call only
    r = client.chat.completions.create(model="micro", messages=msgs, tools=[WEATHER, ADD], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=80, temperature=0.8, seed=4)
    assert len(r.choices[0].message.tool_calls) == 1
    # auto: this random model writes text (the reference's constrained reply), streamed as text
    want = truth(truth_model, prompt, n=N, grammar=tool_call_grammar([WEATHER, ADD], tok, "auto"))
    assert not want.startswith("<")
    r = client.chat.completions.create(model="micro", messages=msgs, tools=[WEATHER, ADD], max_tokens=N, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.tool_calls is None
    chunks = client.chat.completions.create(model="micro", messages=msgs, tools=[WEATHER, ADD], max_tokens=N,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    # tools and a response format (an agent's typed final answer): calls, or JSON under the format
    answer = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "why": {"type": "string", "maxLength": 12}},
              "required": ["answer", "why"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer}}
    brace = tok.encode("{")[0]  # a nudge towards JSON: this random model otherwise calls a tool
    validated = 0
    for rf, schema, bias in [(fmt, answer, {}), (fmt, answer, {brace: 2.0}), ({"type": "json_object"}, None, {brace: 2.0})]:
        grammar = tool_call_grammar([WEATHER, ADD], tok, "auto", text_schema=schema or {"type": "object"})
        want = truth(truth_model, prompt, n=60, logit_bias=bias, grammar=grammar)
        text, want_calls = parse_tool_calls(want)
        r = client.chat.completions.create(model="micro", messages=msgs, tools=[WEATHER, ADD], response_format=rf,
                                           logit_bias={str(k): v for k, v in bias.items()}, max_tokens=60,
                                           temperature=0)
        m, fin = r.choices[0].message, r.choices[0].finish_reason
        if want_calls:
            assert fin == "tool_calls" and [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                                            for c in m.tool_calls] == want_calls
        else:
            assert m.content == want and m.tool_calls is None and want.startswith("{"), want
            if fin == "stop":  # complete: valid under the format (json_object here runs to max_tokens)
                jsonschema.validate(json.loads(m.content), schema)
                validated += 1
    assert validated, "no reply answered in the format"
    # a conversation that already called a tool; tool_choice none leaves the tools out of the prompt
    history = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model="micro", messages=history, tools=[WEATHER, ADD], max_tokens=4)
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(history, True, tools=[WEATHER, ADD])))
    r = client.chat.completions.create(model="micro", messages=history, tools=[WEATHER, ADD], tool_choice="none",
                                       max_tokens=4)
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(history, True)))


# ---- the Responses API ---------------------------------------------------------------------------

def _flat(tool: dict) -> dict:
    """A chat-shaped tool in the Responses API's flat shape."""
    return {"type": "function", **tool["function"]}


def test_responses_api(server, truth_model):
    """`/v1/responses` through the client's `responses` resource: the reply is the reference
    model's greedy reply to the same conversation rendered as chat (instructions first), whole
    and as the API's event stream (which the client's own accumulator rebuilds); usage; kept
    responses continue with previous_response_id, can be fetched and deleted; log-probabilities
    equal the chat route's."""
    client, tok = server.client(), truth_model[1]

    def want(msgs, n=N, **cfg):
        return truth(truth_model, tok.apply_chat_template(msgs, add_generation_prompt=True), n=n, **cfg)

    r = client.responses.create(model="micro", input="Hi there", max_output_tokens=N, temperature=0)
    msgs = [{"role": "user", "content": "Hi there"}]
    assert r.output_text == want(msgs) and r.object == "response" and r.id.startswith("resp_")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.usage.output_tokens == N and r.usage.input_tokens == len(tok.encode(chat_text(truth_model, "Hi there")))
    assert r.usage.total_tokens == r.usage.input_tokens + N and r.max_output_tokens == N

    # instructions and message items; a stop string (an extension) completes the reply
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Say something."}]}]
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    full = want(sys_msgs)
    stop = full[len(full) // 2:][:3]
    cut = full[:full.index(stop)]
    r = client.responses.create(model="micro", input=items, instructions="Be brief.", max_output_tokens=N,
                                temperature=0, extra_body={"stop": [stop]})
    assert r.output_text == cut and r.status == "completed" and r.instructions == "Be brief."
    # streamed: the raw events in the API's order, and the client's accumulator
    events = list(client.responses.create(model="micro", input=items, instructions="Be brief.", max_output_tokens=N,
                                          temperature=0, stream=True, extra_body={"stop": [stop]}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == cut
    assert events[-1].response.output_text == cut and events[-1].response.usage.output_tokens > 0
    with client.responses.stream(model="micro", input=items, instructions="Be brief.", max_output_tokens=N,
                                 temperature=0, extra_body={"stop": [stop]}) as stream:
        assert "".join(e.delta for e in stream if e.type == "response.output_text.delta") == cut
        final = stream.get_final_response()
    assert final.output_text == cut
    # out of tokens while streaming: response.incomplete
    events = list(client.responses.create(model="micro", input="Hi there", max_output_tokens=N, temperature=0,
                                          stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == want(msgs)

    # kept: fetched, continued (the conversation resent for us; instructions not inherited), deleted
    first = client.responses.create(model="micro", input="Hi there", max_output_tokens=8, temperature=0)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    listed = client.responses.input_items.list(first.id).data
    assert [(i.type, i.role, i.content[0].text) for i in listed] == [("message", "user", "Hi there")]
    nxt = client.responses.create(model="micro", input="And then?", previous_response_id=first.id,
                                  max_output_tokens=8, temperature=0)
    turns = msgs + [{"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And then?"}]
    assert nxt.output_text == want(turns, n=8) and nxt.previous_response_id == first.id
    assert nxt.usage.input_tokens == len(tok.encode(tok.apply_chat_template(turns, add_generation_prompt=True)))
    # its input items: the earlier turn's input and output, then its own
    chain = client.responses.input_items.list(nxt.id, order="asc").data
    assert [i.id for i in chain[:2]] == [listed[0].id, first.output[0].id] and chain[1].role == "assistant"
    assert [i.content[0].text for i in chain] == ["Hi there", first.output_text, "And then?"]
    # the same turns through item references to the kept input and output items (typed, and
    # the bare-id shorthand), listed back as the items they name
    refs = [{"type": "item_reference", "id": listed[0].id}, {"id": first.output[0].id},
            {"role": "user", "content": "And then?"}]
    again = client.responses.create(model="micro", input=refs, max_output_tokens=8, temperature=0)
    assert again.output_text == nxt.output_text and again.usage.input_tokens == nxt.usage.input_tokens
    assert [i.id for i in client.responses.input_items.list(again.id, order="asc").data[:2]] == \
        [listed[0].id, first.output[0].id]
    client.responses.delete(first.id)
    assert client.responses.create(model="micro", input=refs[1:2], max_output_tokens=2, store=False)  # in again's input
    client.responses.delete(again.id)
    assert client.responses.create(model="micro", input=refs[1:2], max_output_tokens=2, store=False)  # and nxt's
    client.responses.delete(nxt.id)
    with pytest.raises(openai.NotFoundError):  # gone with the last response that held it
        client.responses.create(model="micro", input=refs[1:2], max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="micro", input="x", previous_response_id=first.id, max_output_tokens=2)
    unkept = client.responses.create(model="micro", input="Hi there", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)

    # log-probabilities: the chat route's, in output_text's shape
    r = client.responses.create(model="micro", input="Hi there", max_output_tokens=6, temperature=0, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    c = client.chat.completions.create(model="micro", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    got = [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in r.output[0].content[0].logprobs]
    assert got == [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                   for e in c.choices[0].logprobs.content]


def test_responses_api_tools_and_formats(server, truth_model):
    """Function tools in the flat shape: forced calls are function_call items equal to the
    reference's constrained reply, whole and streamed; a function_call_output continues the
    conversation (resent, or through previous_response_id: the same prompt); `text.format`'s
    JSON schema gives the reference's constrained reply; the client's parse() fills a model."""
    pytest.importorskip("llguidance")
    from pydantic import BaseModel, Field
    from plm.data.chat import parse_tool_calls
    from plm.model.grammar import Grammar, tool_call_grammar
    client, tok = server.client(), truth_model[1]
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tools=[WEATHER, ADD])
    _, want_calls = parse_tool_calls(truth(truth_model, prompt, n=80,
                                           grammar=tool_call_grammar([WEATHER, ADD], tok, "required")))
    tools = [_flat(WEATHER), _flat(ADD)]
    r = client.responses.create(model="micro", input=msgs, tools=tools, tool_choice="required", max_output_tokens=80,
                                temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls] == want_calls
    assert r.status == "completed" and all(c.call_id.startswith("call_") and c.id.startswith("fc_") for c in calls)
    with client.responses.stream(model="micro", input=msgs, tools=tools, tool_choice="required", max_output_tokens=80,
                                 temperature=0) as stream:
        streamed = [o for o in stream.get_final_response().output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in streamed] == [(c["name"], c["arguments"]) for c in want_calls]
    # a named function
    r2 = client.responses.create(model="micro", input=msgs, tools=tools, tool_choice={"type": "function", "name": "add"},
                                 max_output_tokens=80, temperature=0)
    assert {o.name for o in r2.output if o.type == "function_call"} == {"add"}
    # the tool's result: resent by the client, or continued from the kept response
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "5"} for c in calls]
    resent = client.responses.create(model="micro", input=msgs + [c.model_dump() for c in calls] + outputs,
                                     tools=tools, max_output_tokens=4, temperature=0)
    history = msgs + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}]
    history += [{"role": "tool", "content": "5"} for _ in calls]
    text = tok.apply_chat_template(history, add_generation_prompt=True, tools=[WEATHER, ADD])
    assert resent.usage.input_tokens == len(tok.encode(text))
    # its input items listed back in order, a page at a time
    sent = msgs + [c.model_dump() for c in calls] + outputs
    page = client.responses.input_items.list(resent.id, order="asc", limit=1)
    assert page.has_more and page.data[0].type == "message" and page.data[0].content[0].text == msgs[0]["content"]
    rest = client.responses.input_items.list(resent.id, order="asc", after=page.data[0].id).data
    assert [i.type for i in rest] == [i["type"] for i in sent[1:]] and not rest[-1].model_dump().get("role")
    newest = client.responses.input_items.list(resent.id).data  # desc by default
    assert [i.id for i in newest] == [i.id for i in rest][::-1] + [page.data[0].id]
    assert [c.call_id for c in rest if c.type == "function_call_output"] == [c.call_id for c in calls]
    back = client.responses.input_items.list(resent.id, order="asc", limit=2, extra_query={"before": rest[-1].id})
    assert [i.id for i in back.data] == [i.id for i in rest[-3:-1]] and back.has_more
    for query, param in [({"order": "up"}, "order"), ({"limit": "0"}, "limit"), ({"after": "x"}, "after"),
                         ({"before": "x"}, "before"),
                         ({"order": "asc", "after": rest[-1].id, "before": rest[0].id}, "before")]:
        _err(httpx.get(f"{server.url}/v1/responses/{resent.id}/input_items", params=query), 400, param=param)
    cont = client.responses.create(model="micro", input=outputs, previous_response_id=r.id, tools=tools,
                                   max_output_tokens=4, temperature=0)
    assert cont.usage.input_tokens == resent.usage.input_tokens and cont.output_text == resent.output_text
    # continued: the same items as resent (the kept request's input and its calls, then the outputs)
    chained = client.responses.input_items.list(cont.id, order="asc").data
    assert [i.type for i in chained] == [i.get("type", "message") for i in sent]
    # text.format: a JSON schema
    want = truth(truth_model, chat_text(truth_model, "Describe a person."), n=60,
                 grammar=Grammar.json_schema(PERSON, tok))
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    r = client.responses.create(model="micro", input="Describe a person.", text=fmt, max_output_tokens=60,
                                temperature=0)
    assert r.output_text == want and r.status == "completed" and r.text.format.type == "json_schema"

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=150)
    parsed = client.responses.parse(model="micro", input="Describe a person.", text_format=Person,
                                    max_output_tokens=60, temperature=0.7).output_parsed
    assert isinstance(parsed, Person) and 0 <= parsed.age <= 150


def test_responses_errors_name_the_responses_fields():
    """An error the chat machinery raises names the field as the Responses request has it."""
    from plm.serve.responses import api_param
    assert [api_param(p) for p in ("response_format", "max_completion_tokens", "messages[3].content", "messages",
                                   "logprobs", "temperature", "input[0].id", "messages_extra", None)] == \
        ["text.format", "max_output_tokens", "input", "input", "include", "temperature", "input[0].id",
         "messages_extra", None]


def test_responses_events_of_an_empty_reply_and_a_failure():
    """Edge cases of the event stream, without a model: a reply with no text is still a message
    (added, done, empty text); a failed generation ends in response.failed with the error."""
    from plm.serve.protocol import APIError
    from plm.serve.responses import ResponsesReply
    kept = []
    usage = {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3, "prompt_tokens_details": {"cached_tokens": 0}}

    def events(data: bytes) -> list[dict]:
        out = []
        for block in data.decode().strip().split("\n\n"):
            kind, payload = block.split("\n")
            assert kind == "event: " + json.loads(payload[6:])["type"]
            out.append(json.loads(payload[6:]))
        return out

    r = ResponsesReply("m", lambda t: b"x", {"store": True}, kept.append)
    evs = events(r.opening(1) + r.finish(0, "stop") + r.closing(usage))
    assert [e["type"] for e in evs] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.content_part.added", "response.output_text.done",
                                        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in evs] == list(range(8))
    done = evs[-1]["response"]
    assert done["output"][0]["content"][0]["text"] == "" and done["status"] == "completed" and kept == [done]
    assert done["usage"]["input_tokens"] == 3 and done["usage"]["output_tokens"] == 0
    r = ResponsesReply("m", lambda t: b"x", {}, kept.append)
    evs = events(r.opening(1) + r.piece("Hi", None) + r.failure(APIError(500, "boom", "server_error")))
    assert evs[-1]["type"] == "response.failed" and evs[-1]["response"]["error"]["message"] == "boom"
    assert evs[-1]["response"]["status"] == "failed" and len(kept) == 1  # a failed response is not kept


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": 3}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": 5}]}, "input[0].id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[0].output"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools"),
    ({"input": "x", "tool_choice": {"type": "mcp"}}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "x", "text": "json"}, "text"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "instructions": 5}, "instructions"),
    ({"input": "x", "store": "yes"}, "store"),
    ({"input": "x", "previous_response_id": 7}, "previous_response_id"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "n": 2}, "n"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "include": "all"}, "include"),
    ({"input": "x", "max_output_tokens": 10 ** 6}, "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                                      "maximum": 1}}}}, "text.format"),
])
def test_bad_responses_requests_are_400(server, body, param):
    _err(httpx.post(server.url + "/v1/responses", json=body), 400, param=param)


# ---- errors ----------------------------------------------------------------------------------------

def _err(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code is not None:
        assert e["code"] == code, e
    if param is not None:
        assert e["param"] == param, e
    return e["message"]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, 2, 10 ** 9]}, "prompt"),
    ({"prompt": "x", "n": 65}, "n"),
    ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
    ({"prompt": ["a", 5]}, "prompt"),
    ({"prompt": ["a", [1, 10 ** 9]]}, "prompt"),
    ({"prompt": ["a"] * 8, "n": 9}, "prompt"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "model": 7}, "model"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "tools": [ADD]}, "tools"),
    ({"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
])
def test_wrong_field_types_are_400(server, body, param):
    _err(httpx.post(server.url + "/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize("body,param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": "many"}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": "x"}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [ADD, ADD]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [ADD],
      "tool_choice": {"type": "function", "function": {"name": "sub"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [ADD], "parallel_tool_calls": "yes"},
     "parallel_tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [ADD],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [ADD], "tool_choice": "required",
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}}}, "response_format"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages[0].tool_calls"),
])
def test_bad_chat_requests_are_400(server, body, param):
    _err(httpx.post(server.url + "/v1/chat/completions", json=body), 400, param=param)


def test_malformed_json_unknown_model_and_routes(server):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        _err(httpx.post(server.url + "/v1/chat/completions", content=raw), 400, code="invalid_json")
    msg = _err(httpx.post(server.url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404,
               code="model_not_found", param="model")
    assert "gpt-9" in msg and "micro" in msg
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    _err(httpx.get(server.url + "/v1/nothing"), 404, code="not_found")
    _err(httpx.get(server.url + "/v1/completions"), 405)
    # content parts and unknown fields are fine
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2,
        "temperature": 0, "user": "someone", "metadata": {"a": 1}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_structured_output_without_the_engine_is_a_clear_400(qwen2_micro_dir, tmp_path):
    """A server whose Python has no llguidance still serves text, and answers a JSON schema or
    tools with a 400 that says what to install."""
    (tmp_path / "llguidance.py").write_text("raise ImportError('llguidance is blocked in this test')\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    s = Server(qwen2_micro_dir, "--runtime", "edge", "--dtype", "float32", "--model-name", "micro",
               env={"PYTHONPATH": path})
    try:
        msgs = [{"role": "user", "content": "x"}]
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200
        for extra, param in [({"response_format": {"type": "json_object"}}, "response_format"),
                             ({"tools": [ADD], "tool_choice": "required"}, "tools"),
                             ({"grammar": 'root ::= "a"'}, "grammar"), ({"guided_choice": ["a"]}, "guided_choice")]:
            r = httpx.post(s.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, **extra})
            assert "pip install 'plm[serve]'" in _err(r, 400, "unsupported_parameter", param)
    finally:
        s.stop()


def test_context_window_check_says_by_how_much(server, truth_model):
    # the model's window: 512 tokens
    n = len(truth_model[1].encode(PROMPTS[2]))
    msg = _err(httpx.post(server.url + "/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 512}), 400,
               code="context_length_exceeded", param="max_tokens")
    assert "512" in msg and f"{n} too many" in msg
    long = " ".join(["word"] * 600)
    msg = _err(httpx.post(server.url + "/v1/completions", json={"prompt": long}), 400, code="context_length_exceeded")
    over = len(truth_model[1].encode(long)) - 512 + 1
    assert f"{over} more" in msg
    with pytest.raises(openai.BadRequestError, match="too many"):
        server.client().completions.create(model="micro", prompt=PROMPTS[2], max_tokens=600)
    # without max_tokens a request may use what the window leaves
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "temperature": 0, "stop": ["e"]})
    assert r.status_code == 200


def test_api_key(small_server):
    url = small_server.url
    assert httpx.get(url + "/health").status_code == 200  # no key needed
    for path in ("/v1/models", "/metrics"):
        _err(httpx.get(url + path), 401, code="invalid_api_key")
        _err(httpx.get(url + path, headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        assert httpx.get(url + path, headers={"Authorization": "Bearer sekrit"}).status_code == 200
    _err(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 401)
    with pytest.raises(openai.AuthenticationError):
        small_server.client(api_key="wrong").completions.create(model="x", prompt="x")
    # the --context limit applies
    _err(httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 480},
                    headers={"Authorization": "Bearer sekrit"}), 400, code="context_length_exceeded")


AUTH = {"Authorization": "Bearer sekrit"}


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_browser_pages_by_origin(server, small_server):
    """CORS: a page's preflight is answered before the API key is asked for (a browser sends
    none with it); replies carry Access-Control-Allow-Origin for allowed origins only."""
    body = {"prompt": "Hi", "max_tokens": 2}
    # default (local): pages served from this machine, any port
    for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8080"):
        r = _preflight(small_server.url, origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert {"authorization", "content-type"} <= {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
        assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.post(small_server.url + "/v1/completions", json=body, headers={**AUTH, "Origin": "http://localhost:5173"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = httpx.get(small_server.url + "/v1/models", headers={"Origin": "http://localhost:5173"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:5173"  # readable error
    for origin in ("https://chat.example.org", "http://localhost.evil.example", "https://evil.example"):
        assert _preflight(small_server.url, origin).status_code == 400
        r = httpx.post(small_server.url + "/v1/completions", json=body, headers={**AUTH, "Origin": origin})
        assert "access-control-allow-origin" not in r.headers
    # a list of origins plus local
    for origin in ("https://chat.example.org", "http://localhost:5173"):
        assert _preflight(server.url, origin).headers["access-control-allow-origin"] == origin
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                          headers={"Origin": origin}) as r:
            assert r.headers["access-control-allow-origin"] == origin and "data: [DONE]" in r.read().decode()
    assert _preflight(server.url, "https://other.example.org").status_code == 400


def test_allowed_origins_option():
    from plm.serve.server import LOCAL_ORIGINS, ServeOptions, cors_origins
    assert cors_origins("none") is None and cors_origins("*") == (["*"], None)
    assert cors_origins("local") == ([], LOCAL_ORIGINS)
    assert cors_origins(" http://localhost:3000, https://chat.example.org/ ") == \
        (["http://localhost:3000", "https://chat.example.org"], None)
    for bad in ("chat.example.org", "http://a.org/path", "", ",", "file:///x"):
        with pytest.raises(PLMError, match="--allowed-origins"):
            ServeOptions(model="m", allowed_origins=bad).validate()


def _wait(cond, timeout: float = 20.0) -> bool:
    t = time.time() + timeout
    while time.time() < t:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_queue_full_is_429_and_a_disconnect_frees_the_slot(small_server):
    """One slot and one queue place: a third request is refused; a streaming client that goes
    away mid-reply frees its slot at once (the metrics show it) and the queued one runs."""
    url, client = small_server.url, small_server.client(api_key="sekrit")
    m = lambda: small_server.metrics(headers=AUTH)  # noqa: E731
    before = m()
    first = httpx.Client(timeout=60)
    long = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with first.stream("POST", url + "/v1/completions", json=long, headers=AUTH) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # running: the slot is taken
        with ThreadPoolExecutor(1) as ex:
            queued = ex.submit(httpx.post, url + "/v1/completions", headers=AUTH, timeout=60,
                               json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
            assert _wait(lambda: m()["plm_queue_depth"] == 1)
            msg = _err(httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=AUTH), 429,
                       code="rate_limit_exceeded")
            assert "--max-queue 1" in msg
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="micro", prompt="x")
            t0 = time.time()
            r.close()  # the client goes away mid-stream
            first.close()
            assert queued.result().status_code == 200  # the queued request got the slot
            freed = time.time() - t0
    after = m()
    key = 'plm_requests_finished_total{finish_reason="cancelled",route="completions"}'
    assert after.get(key, 0) - before.get(key, 0) == 1
    assert after["plm_client_disconnects_total"] - before.get("plm_client_disconnects_total", 0) == 1
    assert after["plm_running_sequences"] == 0 and after["plm_queue_depth"] == 0
    generated = after["plm_generation_tokens_total"] - before.get("plm_generation_tokens_total", 0)
    assert generated < 200, f"the abandoned request kept decoding ({generated} tokens)"
    assert freed < 5, f"the slot took {freed:.1f}s to free"


@pytest.mark.slow
def test_disconnect_while_waiting_for_a_whole_reply(small_server):
    """A non-streaming client that gives up is cancelled too."""
    url = small_server.url
    m = lambda: small_server.metrics(headers=AUTH)  # noqa: E731
    before = m()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 400, "temperature": 0},
                   headers=AUTH, timeout=0.5)
    key = 'plm_requests_finished_total{finish_reason="cancelled",route="completions"}'
    assert _wait(lambda: m().get(key, 0) - before.get(key, 0) == 1, 5)
    assert m()["plm_running_sequences"] == 0


@pytest.mark.slow
def test_sigterm_drains_running_requests_then_exits(qwen2_micro_dir, truth_model):
    s = Server(qwen2_micro_dir, "--runtime", "edge", "--dtype", "float32", "--max-batch", "2", "--model-name", "micro")
    try:
        client = s.client()
        results: dict[int, tuple[str, str]] = {}
        started = threading.Barrier(3)

        def ask(i: int) -> None:
            pieces, reason = [], None
            stream = client.completions.create(model="micro", prompt=PROMPTS[i], max_tokens=120, temperature=0,
                                               stream=True)
            for j, c in enumerate(stream):
                if j == 0:
                    started.wait(30)
                pieces.append(c.choices[0].text)
                reason = c.choices[0].finish_reason or reason
            results[i] = ("".join(pieces), reason)

        threads = [threading.Thread(target=ask, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        started.wait(30)
        s.proc.send_signal(signal.SIGTERM)
        assert _wait(lambda: "draining" in "".join(s.lines), 10)
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # no new connections
            for _ in range(50):
                r = httpx.get(s.url + "/health", timeout=2)
                assert r.json()["status"] == "draining"  # only before the listener closed
                time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert s.proc.wait(60) == 0
        for i in (0, 1):
            assert results[i] == (truth(truth_model, PROMPTS[i], 120), "length"), i
        assert "stopped" in "".join(s.lines)
    finally:
        s.stop()


@pytest.mark.slow
def test_native_runtime_server(qwen2_micro_dir):
    """The same server on the native decoder: concurrent greedy requests equal one at a time."""
    from plm.serve.backend import native_unavailable
    why = native_unavailable()
    if why:
        pytest.skip(f"native decoder: {why}")
    s = Server(qwen2_micro_dir, "--runtime", "native", "--max-batch", "8", "--model-name", "micro")
    try:
        assert httpx.get(s.url + "/health").json()["runtime"] == "native"
        client = s.client()

        def ask(i: int) -> str:
            return client.completions.create(model="micro", prompt=PROMPTS[i], max_tokens=N,
                                             temperature=0).choices[0].text

        alone = [ask(i) for i in range(8)]
        with ThreadPoolExecutor(8) as ex:
            assert list(ex.map(ask, range(8))) == alone
        assert len(set(alone)) == 8 and all(alone)

        def sample(i: int) -> str:  # seeded sampling: batched equals alone too (row-independent arithmetic)
            return client.completions.create(model="micro", prompt=PROMPTS[i % 5], max_tokens=N, temperature=0.9,
                                             top_p=0.95, seed=i).choices[0].text

        alone = [sample(i) for i in range(8)]
        with ThreadPoolExecutor(8) as ex:
            assert list(ex.map(sample, range(8))) == alone
        assert len(set(alone)) == 8
        m = s.metrics()
        assert m['plm_batch_size_bucket{le="4"}'] < m['plm_batch_size_bucket{le="8"}']

        # the prompt cache: the second turn of a chat resends the first; its cache is reused
        def chat(messages):
            r = client.chat.completions.create(model="micro", messages=messages, max_tokens=12, temperature=0)
            return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens

        first = [{"role": "user", "content": "Tell me about the Peripheral Language Model."}]
        reply, n1, _ = chat(first)
        second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And its cache?"}]
        text, n2, cached = chat(second)
        assert n1 <= cached < n2  # at least the whole first prompt came from the cache
        assert s.metrics()["plm_prompt_tokens_cached_total"] >= cached
        for i in range(8):  # other prompts push the chat's caches out (4 are kept)
            client.completions.create(model="micro", prompt=PROMPTS[i] + " again", max_tokens=2, temperature=0)
        again, _, cached = chat(second)
        assert cached == 0 and again == text  # prefilled from scratch: the same reply
        # the Responses API: a continuation through previous_response_id finds the first turn cached
        r1 = client.responses.create(model="micro", input=first, max_output_tokens=12, temperature=0)
        r2 = client.responses.create(model="micro", input="And its cache?", previous_response_id=r1.id,
                                     max_output_tokens=12, temperature=0)
        assert (r1.output_text, r2.output_text) == (reply, text)
        assert r1.usage.input_tokens <= r2.usage.input_tokens_details.cached_tokens < r2.usage.input_tokens == n2

        # n choices: choice j is the request with seed + j run alone, bit for bit
        kw = dict(model="micro", prompt=PROMPTS[2], max_tokens=12, temperature=0.9, top_p=0.95)
        three = client.completions.create(n=3, seed=5, **kw)
        assert [c.text for c in three.choices] == [client.completions.create(seed=5 + j, **kw).choices[0].text
                                                   for j in range(3)]

        # a scored prompt (echo + logprobs) runs whole even when a kept cache holds it
        body = {"model": "micro", "prompt": PROMPTS[0] + " again", "max_tokens": 1, "temperature": 0}
        plain = client.completions.create(**body)
        scored = client.completions.create(**body, echo=True, logprobs=2)
        assert scored.usage.prompt_tokens_details.cached_tokens == 0
        assert scored.choices[0].text == PROMPTS[0] + " again" + plain.choices[0].text
        assert len(scored.choices[0].logprobs.token_logprobs) == plain.usage.prompt_tokens + 1

        # structured output: the same grammar path on this runtime
        if importlib.util.find_spec("llguidance"):
            fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
            for seed in (None, 7):
                r = client.chat.completions.create(model="micro", messages=first, max_tokens=60, seed=seed,
                                                   temperature=0 if seed is None else 1.0, response_format=fmt)
                obj = json.loads(r.choices[0].message.content)
                assert set(obj) == {"name", "age"} and 0 <= obj["age"] <= 150 and len(obj["name"]) <= 12
    finally:
        s.stop()


# ---- the batching core, in-process: bf16 and int8, and the native decoder -------------------------

@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The in-process tests run on one thread; later test files get the count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run_scheduler(backend, tok, jobs, max_batch=8, chunk=7):
    """Run jobs [(prompt ids, cfg)] through a Scheduler at once; their texts and finish reasons."""
    from plm.serve.scheduler import Request, Scheduler
    sched = Scheduler(backend, tok, max_batch=max_batch, prefill_chunk=chunk).start()
    done = threading.Semaphore(0)
    reqs, out = [], {}

    def emit_for(i):
        def emit(ev):
            out.setdefault(i, []).append(ev)
            if ev.kind != "text":
                done.release()
        return emit

    for i, (ids, cfg) in enumerate(jobs):
        reqs.append(Request(list(ids), cfg, emit_for(i)))
        sched.submit(reqs[-1])
    for _ in jobs:
        assert done.acquire(timeout=300)
    sched.stop(10)
    res = []
    for i, r in enumerate(reqs):
        evs = out[i]
        assert "".join(e.text for e in evs if e.kind == "text") == r.text  # streamed == final
        res.append((r.tokens, evs[-1].finish_reason))
    return res, sched


@pytest.mark.parametrize("dtype,quant,kv", [("bfloat16", "none", "latent"), ("bfloat16", "int8", "latent"),
                                            ("float32", "none", "full")])
def test_batched_equals_alone_on_the_edge_runtime(qwen2_micro_dir, dtype, quant, kv):
    """Eight requests of different lengths, joining and leaving at different steps, with a
    prefill chunk that splits prompts: each gets exactly the tokens it gets alone."""
    from plm.data.tokenizer import Tokenizer
    from plm.infer.runtime import EdgeOptions, EdgeRuntime
    from plm.serve.backend import TorchBackend
    torch.set_num_threads(1)
    runtime = EdgeRuntime.from_checkpoint(qwen2_micro_dir, EdgeOptions(dtype=dtype, kv=kv, quant=quant, sparse="off"))
    tok = Tokenizer.from_dir(qwen2_micro_dir)
    jobs = [(tok.encode(p), GenerationConfig(max_new_tokens=12 + 3 * i, stop_token_ids=[-1]))
            for i, p in enumerate(PROMPTS)]
    alone = [_run_scheduler(TorchBackend.edge(runtime), tok, [j])[0][0] for j in jobs]
    backend = TorchBackend.edge(runtime)
    together, sched = _run_scheduler(backend, tok, jobs)
    assert together == alone
    assert backend.rebuilds >= 2 and sched.steps < sum(len(t) for t, _ in alone)  # it did batch
    if dtype == "float32" and kv == "full":  # and alone is the reference model's greedy output
        from plm.model.modeling import PLMForCausalLM
        model = PLMForCausalLM.from_pretrained(qwen2_micro_dir, dtype="float32")
        for (ids, cfg), (toks, _) in zip(jobs, alone):
            assert generate(model, tok, tok.decode(ids), GenerationConfig(max_new_tokens=cfg.max_new_tokens,
                                                                          stop_token_ids=[-1])).tokens[0] == toks


def test_native_decoder_backend(qwen2_micro_dir):
    from plm.serve.backend import native_unavailable
    why = native_unavailable()
    if why:
        pytest.skip(f"native decoder: {why}")
    from plm.serve.backend import load_native
    backend, tok = load_native(qwen2_micro_dir, "none")
    jobs = [(tok.encode(p), GenerationConfig(max_new_tokens=10 + 2 * i, stop_token_ids=[-1]))
            for i, p in enumerate(PROMPTS)]
    alone = [_run_scheduler(backend, tok, [j])[0][0] for j in jobs]
    # alone is the decoder's own greedy decoding (no scheduler)
    assert [toks for toks, _ in alone] == [backend.dec.greedy(ids, cfg.max_new_tokens) for ids, cfg in jobs]
    forwards = []  # (prompt rows, decode rows) of each forward; request i is sequence i
    run = backend.run

    def spy(segs):
        past = [backend.dec.length(backend.handles[q]) >= len(jobs[q][0]) for q, _ in segs]
        forwards.append((sum(len(t) for (_, t), p in zip(segs, past) if not p), sum(past)))
        return run(segs)

    backend.run = spy
    together, _ = _run_scheduler(backend, tok, jobs, max_batch=3)  # the rest join running streams
    assert together == alone
    assert any(p and d for p, d in forwards)  # prompt chunks rode along with decode rows
    assert max(p for p, d in forwards if d) <= 7  # at most one chunk's worth beside running streams
    from plm.serve.scheduler import Scheduler
    assert Scheduler(backend, tok).chunk == 8  # the native default: mixed chunks stay small
    assert backend.handles == {}  # every sequence freed


@pytest.mark.parametrize("runtime", ["native", "edge"])
def test_prefill_with_every_positions_logits(qwen2_micro_dir, runtime):
    """The scoring prefill (echo): row i of its logits equals the last-token logits of a fresh
    prefill of the first i + 1 tokens, on the native decoder bit for bit (rows are independent),
    and the sequence then decodes on as after a plain prefill."""
    from plm.serve.backend import TorchBackend, load_native, native_unavailable
    if runtime == "native":
        why = native_unavailable()
        if why:
            pytest.skip(f"native decoder: {why}")
        backend, tok = load_native(qwen2_micro_dir, "none", keep=0)
    else:
        from plm.data.tokenizer import Tokenizer
        from plm.infer.runtime import EdgeOptions, EdgeRuntime
        backend = TorchBackend.edge(EdgeRuntime.from_checkpoint(qwen2_micro_dir, EdgeOptions(dtype="float32", sparse="off")))
        tok = Tokenizer.from_dir(qwen2_micro_dir)
    ids = tok.encode(PROMPTS[2])
    backend.admit(0, 64)
    rows = backend.prefill(0, ids[:5], all_logits=True)
    rows = torch.cat([rows, backend.prefill(0, ids[5:], all_logits=True)])
    assert rows.shape == (len(ids), rows.shape[-1])
    for i in (0, 4, 5, len(ids) - 1):
        backend.admit(1 + i, 64)
        one = backend.prefill(1 + i, ids[:i + 1])
        backend.free(1 + i)
        if runtime == "native":
            assert torch.equal(rows[i], one.reshape(-1)), i
        else:
            assert torch.allclose(rows[i], one.reshape(-1), atol=1e-4), i
    nxt = int(rows[-1].argmax())
    backend.admit(99, 64)
    plain = backend.prefill(99, ids)
    assert int(plain.reshape(-1).argmax()) == nxt
    a, b = backend.step([0], [nxt]), backend.step([99], [nxt])
    assert torch.allclose(a, b, atol=1e-4)


def test_prompt_cache_reuses_a_finished_prefix_bit_for_bit(qwen2_micro_dir):
    """A new prompt that begins with what a finished sequence holds takes its cache, cut to the
    common prefix: the logits of the rest equal a fresh prefill's exactly; the last prompt id
    always runs; at most `keep` finished caches are held, the oldest dropped first."""
    from plm.serve.backend import native_unavailable
    why = native_unavailable()
    if why:
        pytest.skip(f"native decoder: {why}")
    from plm.serve.backend import load_native
    backend, tok = load_native(qwen2_micro_dir, "none", keep=2)
    dec = backend.dec

    def fresh(ids):  # the same decoder, a new sequence, the whole prompt at once
        h = dec.new_sequence()
        try:
            return dec.prefill(h, ids)
        finally:
            dec.free(h)

    a = tok.encode(PROMPTS[2])
    assert backend.admit(0, 64, a) == 0
    logits = backend.prefill(0, a)
    reply = []
    for _ in range(5):  # greedy decode: the cache then holds a + reply[:-1]
        reply.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
        logits = backend.step([0], [reply[-1]])
    backend.free(0)
    assert backend.handles == {} and len(backend.idle) == 1
    held = a + reply
    assert dec.length(next(iter(backend.idle))) == len(held)
    cases = [(held + tok.encode(" and then"), len(held)),  # the next turn: everything held is reused
             (a, len(a) - 1),                              # the same prompt: all but its last id
             (a[:4] + tok.encode(" otherwise"), 4)]        # diverges after 4 ids: cut there
    for seq, (prompt, want) in enumerate(cases, start=1):
        assert backend.admit(seq, 64, prompt) == want
        got = backend.prefill(seq, prompt[want:])
        assert torch.equal(got, fresh(prompt))  # the last id's logits [V], bit for bit
        backend.free(seq)
    assert len(backend.idle) == 1  # each case took the one finished cache and gave it back
    oldest = next(iter(backend.idle))
    for seq, text in ((10, "Zebra crossing"), (11, "Quantum foam")):  # nothing shared: new caches
        assert backend.admit(seq, 64, tok.encode(text)) == 0
        backend.prefill(seq, tok.encode(text))
    backend.free(10)
    backend.free(11)
    assert len(backend.idle) == 2 and oldest not in backend.idle  # keep=2: the oldest went
    assert backend.cache_bytes() == sum(dec.kv_bytes(h) for h in backend.idle) > 0
    off, _ = load_native(qwen2_micro_dir, "none", keep=0)
    off.admit(0, 64, a)
    off.prefill(0, a)
    off.free(0)
    assert off.admit(1, 64, a) == 0 and off.idle == OrderedDict()
    with pytest.raises(PLMError, match="0 or more"):
        type(backend)(dec, keep=-1)


def test_running_sequences_share_their_prefix(qwen2_micro_dir):
    """A prompt that begins as a running sequence's tokens do starts from a copy of that cache
    (the decoder's copy_prefix): the rest's logits equal a fresh prefill's bit for bit. In the
    scheduler the n choices of one prompt prefill it once (the others wait for it, then copy),
    and each choice's text is the one it gets alone."""
    from plm.serve.backend import native_unavailable
    why = native_unavailable()
    if why:
        pytest.skip(f"native decoder: {why}")
    from plm.serve.backend import load_native
    backend, tok = load_native(qwen2_micro_dir, "none", keep=0)
    dec = backend.dec

    def fresh(ids):
        h = dec.new_sequence()
        try:
            return dec.prefill(h, ids)
        finally:
            dec.free(h)

    a = tok.encode(" ".join(PROMPTS))
    assert len(a) > 60
    assert backend.admit(0, 128, a) == 0
    backend.prefill(0, a)
    for seq, (prompt, want) in enumerate([(a, len(a) - 1), (a[:20] + tok.encode(" otherwise"), 20)], start=1):
        assert backend.admit(seq, 128, prompt) == want  # copied from sequence 0, which keeps running
        assert torch.equal(backend.prefill(seq, prompt[want:]), fresh(prompt))
    assert dec.length(backend.handles[0]) == len(a)  # the source is untouched
    with pytest.raises(Exception, match="not empty"):
        dec.copy_prefix(backend.handles[1], backend.handles[0], 5)
    h = dec.new_sequence()
    with pytest.raises(Exception, match="outside"):
        dec.copy_prefix(h, backend.handles[0], len(a) + 1)
    dec.free(h)
    for seq in (0, 1, 2):
        backend.free(seq)

    from plm.serve.metrics import parse_prometheus
    cfgs = [GenerationConfig(max_new_tokens=12, temperature=0.9, seed=s, stop_token_ids=[-1]) for s in (1, 2, 3)]
    other = tok.encode(PROMPTS[4])
    jobs = [(a, c) for c in cfgs] + [(other, GenerationConfig(max_new_tokens=12, stop_token_ids=[-1]))]
    alone = [_run_scheduler(backend, tok, [j])[0][0] for j in jobs]
    together, sched = _run_scheduler(backend, tok, jobs, chunk=7)
    assert together == alone and len({toks for toks, _ in [(tuple(t), r) for t, r in together[:3]]}) == 3
    m = parse_prometheus(sched.metrics.render())
    assert m["plm_prompt_tokens_cached_total"] == 2 * (len(a) - 1)  # choices 2 and 3 copied all but the last id
    assert m["plm_prompt_tokens_total"] == len(a) + 2 + len(other)
    assert backend.handles == {}


def test_grammar_forced_tokens_ride_in_one_forward(qwen2_micro_dir):
    """On the native decoder the tokens a grammar forces (a JSON key, the opening of a tool call)
    join the reply at once and are fed in one forward with the token before them: the reply
    equals a loop in the test over the decoder doing the same, and forwards carry several
    tokens of the decoding sequence."""
    pytest.importorskip("llguidance")
    from plm.serve.backend import native_unavailable
    why = native_unavailable()
    if why:
        pytest.skip(f"native decoder: {why}")
    from plm.model.grammar import Grammar, tool_call_grammar
    from plm.serve.backend import load_native
    from plm.serve.metrics import parse_prometheus
    backend, tok = load_native(qwen2_micro_dir, "none", keep=0)
    dec = backend.dec
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}}}]
    grammars = [Grammar.json_schema(schema, tok), tool_call_grammar(tools, tok, "required")]

    def by_hand(prompt, grammar, n=60):  # greedy under the mask, forced tokens fed together
        m, h, out = grammar.matcher(), dec.new_sequence(), []
        logits = dec.prefill(h, prompt)
        while len(out) < n:
            t = int(m.mask(logits.reshape(1, -1)).argmax())
            if t in tok.stop_token_ids:
                break
            m.advance(t)
            out.append(t)
            if m.stopped:
                break
            ff = m.forced(n - len(out))
            out += ff
            if m.stopped or len(out) >= n:
                break
            logits = dec.prefill(h, [t] + ff)
        dec.free(h)
        return out

    prompts = [tok.encode(p) for p in ("Describe a person:", "What is 2 + 3?")]
    want = [by_hand(p, g) for p, g in zip(prompts, grammars)]
    forwards = []
    run = backend.run

    def spy(segs):
        forwards.append(len(segs))
        return run(segs)

    backend.run = spy
    jobs = [(p, GenerationConfig(max_new_tokens=60, stop_token_ids=tok.stop_token_ids, grammar=g))
            for p, g in zip(prompts, grammars)]
    got, sched = _run_scheduler(backend, tok, jobs)
    assert [t for t, _ in got] == want and [r for _, r in got] == ["stop", "stop"]
    json.loads(tok.decode(want[0]))
    forced = parse_prometheus(sched.metrics.render())["plm_grammar_forced_tokens_total"]
    assert forced >= 17  # the tool call's opening alone: <tool_call>\n{"name": "add", "arguments": {"a":
    # one token a sequence a forward would need as many forwards as the longest reply has tokens
    assert len(forwards) < max(len(w) for w in want)


def test_stream_holds_back_stop_prefixes_and_partial_utf8():
    """The scheduler's text streaming against a scripted backend: what is streamed is always a
    prefix of the final text, a stop string never leaks, and finish reasons are right."""
    from plm.serve.scheduler import _held_suffix
    assert _held_suffix("abc\n", ["\n\n"]) == 1 and _held_suffix("abc", ["\n\n"]) == 0
    assert _held_suffix("xEN", ["END", "N!"]) == 2 and _held_suffix("xE", ["END"]) == 1

    class Tok:
        vocab_size = 300
        stop_token_ids = [299]

        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    class Script:
        """Emits a fixed byte sequence as tokens (one byte each)."""
        kind = "script"

        def __init__(self, data: bytes):
            self.data, self.pos = data, {}

        def admit(self, seq, total, prompt=()):
            self.pos[seq] = 0

        def _logits(self, seq):
            lg = torch.zeros(300)
            i = self.pos[seq]
            lg[self.data[i] if i < len(self.data) else 299] = 1
            self.pos[seq] += 1
            return lg

        def prefill(self, seq, ids):
            return self._logits(seq)

        def step(self, seqs, ids):
            return torch.stack([self._logits(s) for s in seqs])

        def free(self, seq):
            del self.pos[seq]

        def cache_bytes(self):
            return 0

    text = "héllo wörld\n\nEND and more"
    data = text.encode()
    cases = [(["\n\n"], "héllo wörld", "stop"), (["END"], "héllo wörld\n\n", "stop"), (["zz"], text, "stop"),
             (["ö"], "héllo w", "stop")]
    for stops, want, reason in cases:
        res, _ = _run_scheduler(Script(data), Tok(), [([1], GenerationConfig(max_new_tokens=100, stop_strings=stops,
                                                                             stop_token_ids=[299]))])
        assert Tok().decode(res[0][0]).startswith(want) and res[0][1] == reason
    res, _ = _run_scheduler(Script(data), Tok(), [([1], GenerationConfig(max_new_tokens=5, stop_token_ids=[299]))])
    assert res[0] == (list(data[:5]), "length")


def test_a_scored_prompt_does_not_stall_running_streams():
    """An echo prompt is scored 64 tokens a forward, one forward an iteration: a running stream
    decodes between its chunks instead of waiting for the whole prompt (a scripted backend)."""
    from plm.serve.scheduler import SCORE_CHUNK, Request, Scheduler

    class Tok:
        vocab_size = 300
        stop_token_ids = [299]

        def decode(self, ids):
            return bytes(t % 128 for t in ids).decode()

    class Recorder:
        kind = "script"

        def __init__(self):
            self.calls = []

        def admit(self, seq, total, prompt=()):
            return 0

        def prefill(self, seq, ids, all_logits=False):
            self.calls.append(("score" if all_logits else "prefill", seq, len(ids)))
            return torch.zeros(len(ids), 300) if all_logits else torch.zeros(300)

        def step(self, seqs, ids):
            self.calls.append(("step", tuple(seqs), len(seqs)))
            return torch.zeros(len(seqs), 300)

        def free(self, seq):
            pass

        def cache_bytes(self):
            return 0

    backend = Recorder()
    sched = Scheduler(backend, Tok(), max_batch=4).start()
    done = threading.Semaphore(0)
    lps = []

    def emit(ev):
        lps.extend(ev.logprobs or [])
        if ev.kind != "text":
            done.release()

    stream = Request([65], GenerationConfig(max_new_tokens=10 ** 6, stop_token_ids=[299]), emit)  # runs until cancelled
    sched.submit(stream)
    while not any(c[0] == "step" for c in backend.calls):
        time.sleep(0.001)
    long = list(range(1, 200))
    scored = Request(long, GenerationConfig(max_new_tokens=1, stop_token_ids=[299]), emit, logprobs=0,
                     score_prompt=True)
    sched.submit(scored)
    assert done.acquire(timeout=60) and scored.state == "done"
    sched.cancel(stream)
    assert done.acquire(timeout=60)
    sched.stop(10)
    chunks = [i for i, c in enumerate(backend.calls) if c[0] == "score"]
    assert [backend.calls[i][2] for i in chunks] == [SCORE_CHUNK, SCORE_CHUNK, SCORE_CHUNK, 199 - 3 * SCORE_CHUNK]
    for a, b in zip(chunks, chunks[1:]):  # the stream decoded between every two chunks
        assert any(c[0] == "step" and stream.seq in c[1] for c in backend.calls[a:b])
    assert len([e for e in lps if e.logprob is None]) == 1 and len(lps) >= len(long)


def test_metrics_text_format():
    from plm.serve.metrics import Metrics
    m = Metrics()
    m.counter("x_total", "X.")
    m.histogram("lat_seconds", "Latency.", (0.1, 1.0))
    m.gauge("depth", "Depth.", lambda: 3)
    m.inc("x_total", route="chat")
    m.inc("x_total", 2, route="chat")
    for v in (0.05, 0.5, 5):
        m.observe("lat_seconds", v)
    p = parse_prometheus(m.render())
    assert p['plm_x_total{route="chat"}'] == 3 and p["plm_depth"] == 3
    assert p['plm_lat_seconds_bucket{le="0.1"}'] == 1 and p['plm_lat_seconds_bucket{le="1"}'] == 2
    assert p['plm_lat_seconds_bucket{le="+Inf"}'] == 3 and p["plm_lat_seconds_count"] == 3
    assert "# TYPE plm_lat_seconds histogram" in m.render()


def test_cli_errors_are_one_line(tmp_path, qwen2_micro_dir):
    from plm.cli import main
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert main(["serve", str(qwen2_micro_dir), "--max-batch", "0"]) == 2
    assert main(["serve", str(qwen2_micro_dir), "--context", "100000"]) == 2
    assert main(["serve", str(qwen2_micro_dir), "--prompt-cache", "-1"]) == 2
    assert main(["serve", str(qwen2_micro_dir), "--allowed-origins", "example.org"]) == 2


# ---- benchmarks/serve.py helpers ------------------------------------------------------------

def _serve_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("serve_bench", Path(__file__).resolve().parents[1] / "benchmarks/serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _level(c: int, tok_s: float, itl: float, out_s: float | None = None) -> dict:
    return {"concurrency": c, "decode_tok_s": tok_s, "itl_p95": itl, **({"tok_s": out_s} if out_s else {})}


def test_serve_bench_keep_merges_an_earlier_run():
    """--keep: engines measured only in the earlier run join the new one (skipped ones do not
    replace a measurement), in the usual order, and the targets are recomputed over both."""
    sb = _serve_bench()
    earlier = {"command": "first", "engines": {"ours-native": {"skipped": "not built"},
                                               "llama-server": {"levels": [_level(1, 10, 0.1), _level(8, 40, 0.2, 30)]}}}
    new = {"command": "second", "engines": {"ours-native": {"levels": [_level(1, 15, 0.07), _level(8, 48, 0.2, 29)]}}}
    res = sb.keep_earlier(earlier, new)
    assert list(res["engines"]) == ["ours-native", "llama-server"] and res["command"] == "first; then second"
    got = {t["target"]: t["met"] for t in res["targets"]}
    assert got == {"ours-native: decode throughput at c=8 >= 3x c=1": True,  # 48 / 15 = 3.2
                   "ours-native: p95 inter-token latency at c=8 <= 3x c=1": True,  # 0.2 / 0.07 = 2.86
                   "ours-native vs llama-server, decode throughput at c=8: >= 1.0x": True,  # 48 / 40
                   "ours-native vs llama-server, output throughput (all tokens / wall time) at c=8: >= 1.0x":
                       False}  # 29 / 30
    assert "levels" in sb.keep_earlier({"command": "a", "engines": {"ours-native": new["engines"]["ours-native"]}},
                                       {"command": "b", "engines": {"ours-native": {"skipped": "x"}}})["engines"]["ours-native"]


@pytest.mark.slow
def test_serve_bench_level_stats_pool_the_passes():
    """A level's figures pool its passes: decode tok/s = tokens after each request's first over
    the union of the requests' decoding spans (hand-computed here), output tok/s over the summed
    wall time, failed requests counted apart."""
    sb = _serve_bench()
    first = {"wall": 5.0, "results": [{"t0": 0.0, "times": [1.0, 2.0, 3.0], "tokens": 3, "error": None},
                                      {"t0": 0.5, "times": [2.0, 4.0], "tokens": 2, "error": None},
                                      {"t0": 0.0, "times": [], "tokens": 0, "error": "ReadTimeout"}]}
    second = {"wall": 4.0, "results": [{"t0": 10.0, "times": [11.0, 13.0], "tokens": 2, "error": None}]}
    lv = sb.level_stats(2, [first, second])
    # spans [1, 3], [2, 4], [11, 13]: busy 3 + 2 = 5 s; decode tokens 2 + 1 + 1 = 4
    assert lv["decode_tok_s"] == pytest.approx(4 / 5) and lv["tok_s"] == pytest.approx(7 / 9)
    assert (lv["requests"], lv["errors"], lv["passes"], lv["error_sample"]) == (4, 1, 2, "ReadTimeout")
    assert (lv["ttft_p50"], lv["ttft_p95"]) == (1.0, 1.5)  # first tokens after 1, 1.5, 1 s
    assert (lv["itl_p50"], lv["itl_p95"]) == (2.0, 2.0)  # gaps 1, 1, 2, 2
    from types import SimpleNamespace
    args = SimpleNamespace(rounds=2, min_requests=8)
    assert [sb.rounds_at(c, args) for c in (1, 4, 8, 16)] == [8, 2, 2, 2]  # >= 8 requests, >= 2 each
    args.turns = 3  # whole conversations
    assert [sb.rounds_at(c, args) for c in (1, 4, 8, 16)] == [9, 3, 3, 3]
    # conversations: the time to first token by turn (turn 0: 1, 3 and 2 s; turn 1: 0.5 s)
    conv = {"wall": 9.0, "results": [{"t0": 0.0, "times": [1.0, 2.0], "tokens": 2, "turn": 0, "error": None},
                                     {"t0": 2.0, "times": [2.5, 3.0], "tokens": 2, "turn": 1, "error": None},
                                     {"t0": 3.0, "times": [6.0, 7.0], "tokens": 2, "turn": 0, "error": None},
                                     {"t0": 7.0, "times": [9.0], "tokens": 1, "turn": 0, "error": None}]}
    assert sb.level_stats(1, [conv])["ttft_p50_by_turn"] == [2.0, 0.5]
    assert "ttft_p50_by_turn" not in lv  # one-turn runs report no such column


def test_serve_bench_decoder_alone(qwen2_micro_dir, tmp_path):
    """--decoder-alone: the native decoder's prefill and batched step per concurrency level."""
    from plm.infer import native as nv
    if not nv.available():
        pytest.skip("native kernels not built")
    from plm.export.gguf import export_gguf
    gguf = tmp_path / "m.gguf"
    export_gguf(qwen2_micro_dir, gguf, "q8_0")
    md = _serve_bench().decoder_alone(gguf, [1, 3], 12, 1).splitlines()
    assert md[0].endswith("| vs B=1 | matrices ms | matrices share |") and len(md) == 4
    b1, b3 = (row.split("|")[1:-1] for row in md[2:])
    assert b1[0].strip() == "1" and b3[0].strip() == "3" and b1[4].strip() == "1.00x"
    assert all(float(v) > 0 for v in (b1[1], b1[3], b3[1], b3[3]))  # prefill and decode tok/s
    for r in (b1, b3):  # the matrices alone: a part of the step, their share as printed
        mm, share = float(r[5]), r[6].strip()
        assert share.endswith("%") and 0 < float(share[:-1]) and mm >= 0


def test_serve_bench_engine_variants():
    """ours@N / ours-native@N name a prefill chunk, ours-native+cacheK a prompt cache, and the
    server command gets them; anything else is refused with the choices."""
    sb = _serve_bench()
    from types import SimpleNamespace
    args = SimpleNamespace(threads=2, prompt_tokens=8, turns=1, prefill_chunk=None)
    cmd = sb.command("ours-native@8+cache0", Path("ckpt"), Path("m.gguf"), 1234, args, 4)
    assert cmd[cmd.index("--prefill-chunk") + 1] == "8" and cmd[cmd.index("--prompt-cache") + 1] == "0"
    assert "--prompt-cache" not in sb.command("ours-native", Path("ckpt"), Path("m.gguf"), 1234, args, 4)
    assert sb.engine_parts("ours-native@16") == ("ours-native", 16, None)
    assert sb.engine_parts("llama-server") == ("llama-server", None, None)
    assert sb.engine_parts("ours-native@8+cache0") == ("ours-native", 8, 0)
    assert sb.engine_parts("ours-native+cache2") == ("ours-native", None, 2)
    for bad in ("llama-server@8", "ours@0", "ours@x", "vllm", "ours+cache0", "ours-native+cache", "ours-native+0"):
        with pytest.raises(ValueError, match="unknown engine"):
            sb.engine_parts(bad)
    assert sorted(["llama-server", "ours-native@16", "ours", "ours-native@8", "ours-native+cache0", "ours-native"],
                  key=sb.engine_order) == ["ours", "ours-native", "ours-native+cache0", "ours-native@8",
                                           "ours-native@16", "llama-server"]
    earlier = {"command": "a", "engines": {"ours-native@16": {"levels": [_level(1, 10, 0.1), _level(8, 25, 0.2)]}}}
    res = {"command": "b", "engines": {"ours": {"levels": [_level(1, 5, 0.1), _level(8, 16, 0.2)]}}}
    merged = _serve_bench().keep_earlier(earlier, res)
    assert list(merged["engines"]) == ["ours", "ours-native@16"]  # variants survive the merge
    assert [t["target"].split(":")[0] for t in merged["targets"][::2]] == ["ours", "ours-native@16"]


def test_serve_bench_interleave_runs_every_engine_per_level(qwen2_micro_dir, tmp_path):
    """--interleave: both servers up at once, each level run engine after engine, the order
    reversed on the second pass (the log says so), every level's requests answered."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "benchmarks/serve.py"), "--ckpt", str(qwen2_micro_dir), "--engines", "ours@4,ours@8",
           "--interleave", "--concurrency", "1,2", "--passes", "2", "--rounds", "1", "--min-requests", "2",
           "--max-tokens", "3", "--prompt-tokens", "6", "--threads", "1", "--workdir", str(tmp_path / "w"),
           "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    order = [ln.split("] ")[1].split(" pass")[0] for ln in r.stderr.splitlines() if " pass " in ln]
    assert order == ["ours@4 c=1", "ours@8 c=1", "ours@4 c=2", "ours@8 c=2",
                     "ours@8 c=1", "ours@4 c=1", "ours@8 c=2", "ours@4 c=2"]
    res = json.loads((tmp_path / "o/serve-tiny.json").read_text())
    assert res["interleave"] and list(res["engines"]) == ["ours@4", "ours@8"]
    for e in res["engines"].values():
        assert [lv["concurrency"] for lv in e["levels"]] == [1, 2] and all(lv["errors"] == 0 for lv in e["levels"])
    assert "each level run engine after engine" in (tmp_path / "o/serve-tiny.md").read_text()


def test_serve_bench_turns_resend_the_conversation(qwen2_micro_dir, tmp_path):
    """--turns 3: each client's requests are conversations of 3 turns, every turn's prompt the
    previous prompt and reply plus new words; the report gives the first-token time by turn."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "benchmarks/serve.py"), "--ckpt", str(qwen2_micro_dir), "--engines", "ours",
           "--turns", "3", "--concurrency", "1,2", "--passes", "1", "--rounds", "1", "--min-requests", "2",
           "--max-tokens", "3", "--prompt-tokens", "6", "--threads", "1", "--workdir", str(tmp_path / "w"),
           "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "o/serve-tiny.json").read_text())
    assert res["turns"] == 3
    for lv in res["engines"]["ours"]["levels"]:  # 1 client: 3 requests; 2 clients: 3 each
        assert lv["requests"] == 3 * lv["concurrency"] and lv["errors"] == 0
        assert len(lv["ttft_p50_by_turn"]) == 3 and all(t > 0 for t in lv["ttft_p50_by_turn"])
    assert "| engine | concurrency | turn 1 | turn 2 | turn 3 |" in (tmp_path / "o/serve-tiny.md").read_text()
    sb = _serve_bench()  # the prompts themselves, against a stand-in for the server
    sent = []
    sb.one_request = lambda client, url, prompt, n: sent.append(prompt) or {
        "t0": 0.0, "times": [1.0], "tokens": 1, "text": f" R{len(sent)}", "error": None}
    sb.run_level("http://x", ["a b", "c d", "e f", "g h"], 1, 4, 1, turns=2)
    first, second = sent[0].split(". ", 1), sent[2].split(". ", 1)
    assert first[1] == "a b" and second[1] == "e f" and first[0] != second[0]  # numbered conversations
    assert sent[1] == sent[0] + " R1 c d" and sent[3] == sent[2] + " R3 g h"  # each turn resends the last
