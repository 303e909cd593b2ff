"""Constrained decoding (plm.model.grammar) and the tool-call chat format (plm.data.chat).

Truth is independent of the engine: every constrained reply is checked by the `jsonschema`
package against its schema, by Python's `re` against its pattern, and by `json.dumps` for the
compact style; the tool-call prompt is the Hermes / Qwen2.5 text written out by hand.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance", reason="the serve extra: pip install -e '.[serve]'")
jsonschema = pytest.importorskip("jsonschema", reason="the test extra: pip install -e '.[test]'")

from plm.data.chat import parse_tool_calls, render_chatml  # noqa: E402
from plm.errors import PLMError  # noqa: E402
from plm.infer.generate import GenerationConfig, generate  # noqa: E402
from plm.model.grammar import Grammar, GrammarError, tool_call_grammar  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                                                   "b": {"type": "integer", "minimum": 0, "maximum": 999}},
                                  "required": ["a", "b"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def micro(qwen2_micro_dir):
    from plm.data.tokenizer import Tokenizer
    from plm.model.modeling import PLMForCausalLM
    return PLMForCausalLM.from_pretrained(qwen2_micro_dir, dtype="float32"), Tokenizer.from_dir(qwen2_micro_dir)


def _gen(micro, prompt, grammar, n: int = 80, **cfg):
    model, tok = micro
    return generate(model, tok, prompt, GenerationConfig(max_new_tokens=n, grammar=grammar, **cfg))


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_json_schema_replies_are_valid_and_compact(micro, seed):
    g = Grammar.json_schema(PERSON, micro[1])
    res = _gen(micro, "Describe a person:", g, temperature=0.0 if seed is None else 1.0, seed=seed)
    text = res.texts[0]
    obj = json.loads(text)
    jsonschema.validate(obj, PERSON)
    assert text == json.dumps(obj, ensure_ascii=False)  # ", " and ": ", nothing else
    assert list(obj) == list(PERSON["properties"])  # the schema's order
    assert res.finish_reasons == ["stop"]  # ended by the grammar, not max_new_tokens


def _admits(tok, grammar: Grammar, text: str) -> bool:
    """Whether `grammar` takes the whole of `text` (as the tokenizer cuts it) as a sentence."""
    m = grammar.matcher()
    try:
        for t in tok.encode(text):
            m.advance(t)
    except GrammarError:
        return False
    return m.accepting


def test_a_grammar_sent_again_is_not_compiled_again(micro):
    """The same grammar source reuses its compiled start state (agents send the same schema with
    every request); the matchers made from it stay independent of each other."""
    from plm.model import grammar as gm
    tok = micro[1]
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}, "required": ["cached"]}
    a = Grammar.json_schema(schema, tok)
    hits = gm._compiled.cache_info().hits
    b = Grammar.json_schema(dict(schema), tok)
    assert gm._compiled.cache_info().hits == hits + 1 and a._start is b._start
    m1, m2 = a.matcher(), b.matcher()
    for t in tok.encode('{"cached": 7}'):
        m1.advance(t)
    assert m1.accepting and not m2.accepting  # m2 is still at the start
    assert _admits(tok, b, '{"cached": 12}') and not _admits(tok, a, '{"cached": "x"}')
    for _ in range(2):  # a grammar that cannot compile fails every time it is sent
        with pytest.raises(GrammarError, match="cannot be compiled"):
            Grammar.lark("start: undefined_rule", tok)


def test_json_whitespace_pattern(micro):
    """vLLM's guided_whitespace_pattern: the expression is allowed around every separator and
    bracket instead of the compact style; a schema's own x-guidance options still win."""
    tok = micro[1]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array"}}, "required": ["a", "b"]}
    loose = Grammar.json_schema(schema, tok, whitespace=r"[ \n]{0,2}")
    compact = Grammar.json_schema(schema, tok)
    for text in ['{"a":1,"b":[]}', '{ "a" : 1 , "b" : [ 2 ] }', '{\n "a": 1,\n "b": [\n 1\n ]\n}']:
        assert _admits(tok, loose, text) and not _admits(tok, compact, text), text
    for text in ['{"a":   1,"b":[]}', '{"a":1,"b":[]} ']:  # three spaces; whitespace after the document's end
        assert not _admits(tok, loose, text), text
    assert _admits(tok, compact, '{"a": 1, "b": []}') and not _admits(tok, loose, '{"a":\t1,"b":[]}')
    own = {**schema, "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None,
                                    "item_separator": ",", "key_separator": ":"}}
    assert _admits(tok, Grammar.json_schema(own, tok, whitespace=r"[ ]*"), '{"a":1,"b":[]}')
    assert not _admits(tok, Grammar.json_schema(own, tok, whitespace=r"[ ]*"), '{"a": 1,"b":[]}')
    call = '<tool_call>\n{ "name": "add", "arguments": { "a": 2, "b": 3 } }\n</tool_call>'
    assert _admits(tok, tool_call_grammar([ADD], tok, "required", whitespace=r"[ ]?"), call)
    assert not _admits(tok, tool_call_grammar([ADD], tok, "required"), call)


def test_any_json_object_and_a_regex(micro):
    tok = micro[1]
    anyobj = Grammar.json_schema(None, tok)
    for text in ['{}', '{"a": [1, 2.5, null], "b": {"c": "d"}}']:
        assert _admits(tok, anyobj, text), text
    for text in ['[1]', '"x"', '{"a": 1', '{"a" : 1}', '{"a":1}']:  # not objects, or not the compact style
        assert not _admits(tok, anyobj, text), text
    pattern = r"[0-9]{3}-[0-9]{4}( ext\. [0-9]{1,3})?"
    for seed in range(3):
        text = _gen(micro, "Phone:", Grammar.regex(pattern, tok), temperature=1.0, seed=seed).texts[0]
        assert re.fullmatch(pattern, text), text


def test_a_grammar_that_admits_every_text_changes_nothing(micro):
    tok = micro[1]
    free = Grammar.regex(r"(?s).*", tok)
    for prompt in ["def fib(n):", "Hello", "Once upon a time", "import torch\n"]:
        plain = _gen(micro, prompt, None, n=24).texts
        assert "\ufffd" not in plain[0]  # valid UTF-8 (a grammar's text always is)
        assert _gen(micro, prompt, free, n=24).texts == plain
    # the random model's greedy reply to this prompt cuts a character in two: the grammar does not
    plain = _gen(micro, "1 + 1 =", None, n=24).texts[0]
    assert "\ufffd" in plain and "\ufffd" not in _gen(micro, "1 + 1 =", free, n=24).texts[0]


def test_batched_constrained_rows_equal_each_alone(micro):
    model, tok = micro
    g = Grammar.json_schema(PERSON, tok)
    prompts = ["Describe a person:", "Q: who?\nA:", "{"]
    batch = generate(model, tok, prompts, GenerationConfig(max_new_tokens=80, grammar=g)).texts
    assert batch == [_gen(micro, p, g).texts[0] for p in prompts]


def test_hf_shaped_generate_takes_a_grammar(micro):
    model, tok = micro
    batch = tok(["Describe a person:", "Q: who is she?\nA:"], return_tensors="pt")  # left-padded
    out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=80,
                         grammar=Grammar.json_schema(PERSON, tok))
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        text = tok.decode([t for t in row if t not in tok.stop_token_ids])
        jsonschema.validate(json.loads(text), PERSON)


def test_mask_covers_padded_embedding_rows(micro):
    tok = micro[1]
    m = Grammar.json_schema(None, tok).matcher()
    logits = torch.zeros(1, tok.vocab_size + 64)
    masked = m.mask(logits)
    allowed = torch.isfinite(masked[0])
    assert not allowed[tok.vocab_size:].any()
    assert allowed.sum() >= 1 and bool(allowed[tok.encode("{")[0]])
    assert not bool(allowed[tok.encode("hello")[0]])


def test_gbnf_and_choice_grammars(micro):
    """llama.cpp's GBNF (llguidance translates it) and a choice among strings: the languages
    they admit and refuse; an unreadable GBNF says why."""
    tok = micro[1]
    g = Grammar.gbnf('root ::= ("yes" | "no") " " num\nnum ::= [0-9]+', tok)
    assert _admits(tok, g, "yes 42") and _admits(tok, g, "no 7")
    assert not _admits(tok, g, "maybe 1") and not _admits(tok, g, "yes x")
    c = Grammar.choice(["red", 'a "blue" one', "név"], tok)
    assert all(_admits(tok, c, t) for t in ["red", 'a "blue" one', "név"])
    assert not _admits(tok, c, "re") and not _admits(tok, c, "redd")
    with pytest.raises(GrammarError, match="GBNF grammar cannot be read: .*foo"):
        Grammar.gbnf("root ::= foo", tok)


def test_bad_schemas_and_grammars_say_what(micro):
    tok = micro[1]
    with pytest.raises(GrammarError, match="JSON schema cannot be compiled.*nope"):
        Grammar.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, tok)
    with pytest.raises(GrammarError, match="must be an object"):
        Grammar.json_schema(["not", "a", "schema"], tok)
    with pytest.raises(GrammarError, match="Lark grammar cannot be compiled"):
        Grammar.lark("start: undefined_rule", tok)


def test_missing_engine_is_a_clear_error(micro, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(PLMError, match=r"pip install 'plm\[serve\]'"):
        Grammar.json_schema(None, micro[1])
    with pytest.raises(PLMError, match=r"pip install 'plm\[serve\]'"):
        Grammar.gbnf('root ::= "a"', micro[1])


# ---- tool calls ---------------------------------------------------------------------------------

def test_tool_prompt_is_the_hermes_format():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "content": "5"}, {"role": "tool", "content": "ok"}]
    tool = json.dumps(ADD)
    assert render_chatml(msgs, add_generation_prompt=True, tools=[ADD]) == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
        "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + tool +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n</tool_call>"
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    # no tools: plain ChatML, and no system turn is invented
    assert render_chatml(msgs[1:2]) == "<|im_start|>user\n2+3?<|im_end|>\n"
    assert render_chatml(msgs[1:2], tools=[ADD]).startswith("<|im_start|>system\n# Tools\n")


def test_parse_tool_calls():
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert parse_tool_calls(call) == ("", [{"name": "add", "arguments": {"a": 1, "b": 2}}])
    two = "Let me add.\n" + call + "\n" + call.replace("1", "7")
    content, calls = parse_tool_calls(two, ["add"])
    assert content == "Let me add." and [c["arguments"]["a"] for c in calls] == [1, 7]
    assert parse_tool_calls("just text") == ("just text", [])
    for broken in [call.replace("}}", "}"), call.replace('"arguments"', '"args"'), call[:-3]]:
        assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls(call, ["get_weather"]) == (call, [])  # an unknown function


@pytest.mark.parametrize("choice", ["required", "add", "get_weather"])
def test_forced_tool_calls_are_valid(micro, choice):
    model, tok = micro
    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], add_generation_prompt=True,
                                     tools=[WEATHER, ADD])
    for seed in (None, 3):
        g = tool_call_grammar([WEATHER, ADD], tok, choice, parallel=False)
        text = _gen(micro, prompt, g, n=120, temperature=0.0 if seed is None else 1.0, seed=seed).texts[0]
        content, calls = parse_tool_calls(text, ["get_weather", "add"])
        assert content == "" and len(calls) == 1, text
        fn = {"get_weather": WEATHER, "add": ADD}[calls[0]["name"]]["function"]
        jsonschema.validate(calls[0]["arguments"], fn["parameters"])
        if choice != "required":
            assert calls[0]["name"] == choice


def test_auto_tool_grammar_admits_text_or_calls(micro):
    tok = micro[1]
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'

    def admits(grammar, text: str) -> bool:
        return _admits(tok, grammar, text)

    auto = tool_call_grammar([WEATHER, ADD], tok, "auto")
    assert admits(auto, "Hello there") and admits(auto, call) and admits(auto, call + "\n" + call)
    for text in ["<b>bold</b>", "<!DOCTYPE html>\n<html>", "<tool", "<tool_cal", "<tools are fun>", "\n<tool_call>"]:
        assert admits(auto, text), text  # any text that does not open a call
    assert not admits(auto, "<tool_call> is a tag")  # that opens one: it must be a call
    assert not admits(auto, call.replace("add", "sub"))  # only the given functions
    assert not admits(auto, call.replace('"b": 2', '"b": "two"'))  # arguments under the schema
    # a schema that lists its properties takes no others unless it says so; no parameters: {}
    loose = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}
    bare = {"type": "function", "function": {"name": "g"}}
    g = tool_call_grammar([loose, bare], tok, "required")
    assert admits(g, call.replace("add", "f").replace('"a": 1, "b": 2', '"x": 1'))
    assert not admits(g, call.replace("add", "f").replace('"a": 1, "b": 2', '"x": 1, "y": 2'))
    assert admits(g, call.replace("add", "g").replace('{"a": 1, "b": 2}', "{}"))
    assert not admits(g, call.replace("add", "g").replace('"a": 1, "b": 2', '"x": 1'))
    opened = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "additionalProperties": True}}}
    assert admits(tool_call_grammar([opened], tok, "required"),
                  call.replace("add", "f").replace('"a": 1, "b": 2', '"x": 1, "y": 2'))
    single = tool_call_grammar([WEATHER, ADD], tok, "required", parallel=False)
    assert admits(single, call) and not admits(single, call + "\n" + call) and not admits(single, "Hello")
    # a response format beside the tools: the reply that is not calls is JSON under it
    answer = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    typed = tool_call_grammar([WEATHER, ADD], tok, "auto", text_schema=answer)
    assert admits(typed, call) and admits(typed, '{"answer": 5}')
    assert not admits(typed, "Hello") and not admits(typed, '{"answer": "five"}') and not admits(typed, "{}")
    assert admits(tool_call_grammar([ADD], tok, "required", text_schema=answer), call)
    assert not admits(tool_call_grammar([ADD], tok, "required", text_schema=answer), '{"answer": 5}')


def test_generate_cli_json_schema(qwen2_micro_dir, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}},
                                  "required": ["n"]}))
    cmd = [sys.executable, "-m", "plm", "generate", str(qwen2_micro_dir), "--prompt", "Number:", "--threads", "1",
           "--max-new-tokens", "40"]
    out = subprocess.run(cmd + ["--json-schema", str(schema)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["n"] <= 99
    lark = tmp_path / "yes_no.lark"
    lark.write_text('start: "yes" | "no"\n')
    out = subprocess.run(cmd + ["--grammar", str(lark)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no"), out.stderr
    gbnf = tmp_path / "count.gbnf"  # llama.cpp's format, by the file's suffix
    gbnf.write_text('root ::= "n=" [1-9] [0-9]?\n')
    out = subprocess.run(cmd + ["--grammar", str(gbnf)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and re.fullmatch(r"n=[1-9][0-9]?", out.stdout.strip()), out.stderr
    out = subprocess.run(cmd + ["--json", "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("{"), out.stderr
    for extra, says in [(["--json-schema", "{bad"], "neither a file nor valid JSON"),
                        (["--json", "--grammar", str(lark)], "give one of --json, --json-schema and --grammar"),
                        (["--grammar", str(tmp_path / "none.lark")], "no such file")]:
        bad = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_grammar_benchmark_runs(tmp_path, qwen2_micro_dir):
    out = subprocess.run([sys.executable, "benchmarks/grammar.py", "--repeats", "1", "--out", str(tmp_path),
                          "--serve", str(qwen2_micro_dir), "--rounds", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "grammar.json").read_text())
    assert [r["tokens"] > 0 and r["grammar_us"] > 0 for r in report["rows"]] == [True] * 4
    assert all(0 < r["again_ms"] < r["compile_ms"] for r in report["rows"])  # sent again: kept compiled
    sv = report["serve"]  # the same call with and without forced tokens (asserted by the script)
    assert sv["tokens"] > 0 and sv["call"]["name"] == "get_weather"
    assert (sv["forced_tokens"] > 0) == (sv["runtime"] == "native")
    assert (tmp_path / "grammar.png").stat().st_size > 0 and "| grammar |" in (tmp_path / "grammar.md").read_text()
