"""plm chat's session: history as ChatML, trimmed to the context window from the oldest turns
(the system prompt kept), replies interruptible without losing the session."""
import json
import signal
import subprocess
import sys

import pytest

from plm.infer.chat import ChatSession
from plm.infer.engine import Engine
from plm.infer.generate import GenerationConfig


@pytest.fixture(scope="module")
def engine(qwen2_micro_dir):
    return Engine(qwen2_micro_dir, runtime="reference")


def test_history_is_kept_and_trimmed_to_the_window(engine, tmp_path):
    s = ChatSession(engine, GenerationConfig(max_new_tokens=4), system="Be brief.")
    first = s.reply("hello there")
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[1]["content"] == first.text
    assert first.dropped_turns == 0 and first.tokens <= 4 and first.tokens_per_s > 0
    # a window that holds the system prompt and about one exchange: older turns leave, newest first kept
    engine.config.max_position_embeddings, saved = len(s._prompt(s.messages)) + 4, engine.config.max_position_embeddings
    try:
        r = s.reply("and again")
        assert r.dropped_turns == 1 and s.messages[0]["content"] == "and again"
        prompt = engine.tokenizer.decode(s._prompt(s.messages[:1]))
        assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # the system prompt stays
        with pytest.raises(Exception, match="leaves no room for a reply"):
            s.reply("word " * 50)
        assert s.messages[-1]["role"] == "assistant"  # a refused message leaves the history as it was
    finally:
        engine.config.max_position_embeddings = saved
    path = s.save(tmp_path / "chat.json")
    saved_msgs = json.loads(path.read_text())["messages"]
    assert saved_msgs[0] == {"role": "system", "content": "Be brief."} and saved_msgs[1:] == s.messages
    s.reset()
    assert s.messages == []


def _sigint_deliverable() -> None:
    """In the chat child before exec: SIGINT at its default disposition and unblocked. The child
    inherits both from the forking thread; a background job of a non-interactive shell starts
    with SIGINT ignored (Python then installs no Ctrl-C handler), and a library thread may have
    it blocked: either way the test's Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_and_keeps_the_session(qwen2_micro_dir):
    p = subprocess.Popen([sys.executable, "-u", "-m", "plm", "chat", str(qwen2_micro_dir), "--runtime", "reference",
                          "--max-new-tokens", "100000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=_sigint_deliverable)
    try:
        p.stdin.write("tell me everything\n")
        p.stdin.flush()
        # interrupt as the reply starts ("plm> " is written just before generation; the reply
        # would stop at the 512-token window within seconds, and a random model's first visible
        # characters can come late: incomplete UTF-8 is held back)
        seen = ""
        while "plm> " not in seen:
            ch = p.stdout.read(1)
            if not ch:  # say why: stderr holds the traceback or notice it exited with
                p.wait(timeout=60)
                pytest.fail(f"chat exited ({p.returncode}) before replying; stdout {seen!r}; stderr:\n{p.stderr.read()}")
            seen += ch
        p.send_signal(signal.SIGINT)
        out, err = p.communicate("/exit\n", timeout=120)
        out = seen + out
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert "(interrupted)" in err and out.count("you> ") == 2  # back at the prompt after Ctrl-C


def test_ctrl_c_before_the_first_token_keeps_the_session(engine, monkeypatch):
    """Ctrl-C that lands before generation starts (while the prompt is built) interrupts the
    reply like one during it: an empty, interrupted reply, the turn kept, the session usable."""
    s = ChatSession(engine, GenerationConfig(max_new_tokens=4))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(s, "fit", interrupted)
    r = s.reply("hello")
    assert r.interrupted and r.text == "" and r.tokens == 0
    assert s.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]
    monkeypatch.undo()
    assert not s.reply("again").interrupted and len(s.messages) == 4
