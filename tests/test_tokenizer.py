"""The Qwen2 tokenizer rebuilt from tiktoken ranks, checked against known ids and tiktoken itself."""
import json
import random

import pytest

from plm.data.tokenizer import CHATML_TEMPLATE_PLAIN, Tokenizer, render_chatml, train_bpe
from plm.errors import PLMError

SAMPLES = [
    "你好，世界！这是一个测试。中文分词和English混合。",
    "日本語のテキストと한국어 텍스트",
    "emoji 🎉👍🏽 family 👨‍👩‍👧 flags 🇯🇵",
    "def f(x):\n    return x ** 2  # square\n\n\n\tif x:\n\t\tpass\n",
    "   leading and trailing spaces   \n\n\n  \t  \r\n",
    "numbers 1234567 3.14159 -42 1e-9, URLs https://example.com/a?b=c&d=e",
    "I'm sure they'll say it's fine; we've done what's RIGHT'S",
    "café naïve résumé Ünïcödé ß ﬁ",
]


def test_chatml_example_ids(qwen2_tokenizer):
    # REFERENCE §2
    assert qwen2_tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n") == [151644, 872, 198, 9707, 151645, 198]
    assert render_chatml([{"role": "user", "content": "Hello"}]) == "<|im_start|>user\nHello<|im_end|>\n"
    assert qwen2_tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True) == \
        [151644, 872, 198, 9707, 151645, 198]


def test_special_ids(qwen2_tokenizer):
    t = qwen2_tokenizer
    assert (t.endoftext_id, t.token_id("<|im_start|>"), t.eos_token_id) == (151643, 151644, 151645)
    assert t.vocab_size == 151646


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip(qwen2_tokenizer, text):
    assert qwen2_tokenizer.decode(qwen2_tokenizer.encode(text)) == text


def test_matches_tiktoken_reference(qwen2_tokenizer):
    """Independent truth: tiktoken encoding with the same ranks and regex."""
    import tiktoken

    from plm.data.tokenizer import QWEN2_PATTERN, qwen_ranks_path
    import base64
    ranks = {base64.b64decode(a): int(b) for a, b in
             (line.split() for line in qwen_ranks_path().read_bytes().splitlines() if line)}
    enc = tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    rng = random.Random(0)
    words = " ".join(SAMPLES).split(" ") + ["the", "quick", "brown", "fox", "\n", "  ", "Ωμέγα", "12", "(){}[]"]
    texts = SAMPLES + [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    import unicodedata
    for t in texts:
        assert qwen2_tokenizer.encode(t) == enc.encode_ordinary(unicodedata.normalize("NFC", t)), t


def test_saved_files_are_standard(qwen2_tokenizer, tmp_path):
    qwen2_tokenizer.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["chat_template"] == CHATML_TEMPLATE_PLAIN
    back = Tokenizer.from_dir(tmp_path)
    assert back.encode(SAMPLES[3]) == qwen2_tokenizer.encode(SAMPLES[3])
    # the Jinja template written for other tools renders exactly what we render
    import jinja2
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    rendered = jinja2.Template(cfg["chat_template"]).render(messages=msgs, add_generation_prompt=True)
    assert rendered == render_chatml(msgs, add_generation_prompt=True)


def test_transformers_renders_tool_chats_as_we_do(qwen2_tokenizer, tmp_path):
    """The template we save, rendered by transformers' own apply_chat_template (its Jinja
    environment), gives render_chatml's text for chats with tools, calls and tool results."""
    transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
    qwen2_tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    add = {"type": "function", "function": {"name": "add", "description": "Sum, in café units",
                                            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a":2}'}},
             {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]
    chats = [
        [{"role": "user", "content": "2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": None, "tool_calls": calls[:1]}, {"role": "tool", "content": "4"},
         {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
         {"role": "tool", "content": "6"}, {"role": "tool", "content": "sunny"}, {"role": "user", "content": "ok"}],
    ]
    for msgs in chats:
        for tools in (None, [add, weather]):
            want = render_chatml(msgs, add_generation_prompt=True, tools=tools)
            got = hf.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
            assert got == want


def test_train_small_bpe(tmp_path):
    corpus = [f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(300)] + SAMPLES * 10
    tok = train_bpe(corpus, vocab_size=400, show_progress=False)
    assert tok.vocab_size <= 400
    assert [tok.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(corpus[5])) < len(corpus[5].encode()) / 2  # it learned merges
    tok.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode(corpus[0]) == tok.encode(corpus[0])


def test_errors(tmp_path):
    with pytest.raises(PLMError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(PLMError, match="tokenizer.json: cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(PLMError, match="empty corpus"):
        train_bpe([], vocab_size=300, show_progress=False)
    with pytest.raises(PLMError, match="'role' and 'content'"):
        render_chatml([{"text": "hi"}])


def test_incremental_text_equals_decoding_everything(qwen2_tokenizer):
    """Streaming decodes a growing reply a few tokens at a time; every prefix must read exactly
    as decoding it whole, also where a token ends inside a UTF-8 character (Qwen2 spells CJK
    and emoji in byte tokens: the prefix then ends in U+FFFD) and across special tokens."""
    from plm.model.generation import IncrementalText

    tok = qwen2_tokenizer
    rng = random.Random(0)
    text = "Größe 名前は 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🫠🪿 ꙮ᚛ᚐ᚜ naïve — end.\n" * 3
    cases = [tok.encode(text),
             [rng.randrange(tok.vocab_size) for _ in range(300)],  # random ids, some lone bytes
             [rng.choice([124026, 246, 104, 9284, 254, 123, 13072]) for _ in range(200)],  # lone UTF-8 pieces
             tok.encode("<|im_start|>assistant\n你好<|im_end|>\n")]
    assert any("\ufffd" in tok.decode(c[:n]) for c in cases[:1] for n in range(len(c)))  # splits do occur
    seen = []

    def counted(ids):
        seen.append(len(ids))
        return tok.decode(ids)

    for ids in cases:
        inc = IncrementalText(counted)
        for n in range(len(ids) + 1):
            assert inc(ids[:n]) == tok.decode(ids[:n]), (ids[:n])
        inc2 = IncrementalText(tok.decode)  # several tokens per call (grammar-forced tokens)
        for n in range(0, len(ids) + 5, 5):
            assert inc2(ids[:n]) == tok.decode(ids[:n])
    # the work per call stays small: decoding everything each time would touch ~n^2/2 ids
    n = len(cases[1])
    assert sum(seen) < 20 * sum(len(c) for c in cases) < n * n / 2
    with pytest.raises(PLMError, match="only grow"):
        inc(cases[3][:2])


def test_incremental_text_with_other_decoders():
    """A decoder that drops the first token's leading space (SentencePiece's Metaspace) still
    reads as a whole decode; one whose windows disagree falls back to decoding everything."""
    from plm.model.generation import IncrementalText

    pieces = [" the", " cat", "s", " sat", ".", " ", "on"]
    rng = random.Random(1)
    ids = [rng.randrange(len(pieces)) for _ in range(120)]

    def metaspace(xs):
        return "".join(pieces[i] for i in xs).removeprefix(" ")

    def reversed_text(xs):
        return "".join(pieces[i] for i in xs)[::-1]

    for decode in (metaspace, reversed_text):
        inc = IncrementalText(decode)
        for n in range(len(ids) + 1):
            assert inc(ids[:n]) == decode(ids[:n])


def test_stream_overhead_benchmark_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    out = subprocess.run([sys.executable, "benchmarks/stream_overhead.py", "--lengths", "64,300", "--prompt", "50",
                          "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr  # the script asserts each pair gives the same text / logits
    report = json.loads((tmp_path / "stream_overhead.json").read_text())
    assert [(r["work"], r["tokens"]) for r in report["rows"]] == \
        [("text", 64), ("text", 300), ("penalties", 64), ("penalties", 300)]
    assert all(r["before_us_per_token"] > 0 and r["incremental_us_per_token"] > 0 for r in report["rows"])
    assert (tmp_path / "stream_overhead.png").stat().st_size > 0
    assert "| work | reply tokens |" in (tmp_path / "stream_overhead.md").read_text()
