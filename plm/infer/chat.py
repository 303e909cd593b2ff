"""A multi-turn chat over an `Engine`: the history as ChatML, trimmed to the model's context
window (oldest turns first, the system prompt kept), replies streamed, interruptible."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from plm.errors import PLMError
from plm.infer.generate import GenerationConfig, generate


@dataclass
class Reply:
    text: str
    tokens: int
    seconds: float
    interrupted: bool = False
    dropped_turns: int = 0  # oldest turns left out so the prompt fits the context window

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ChatSession:
    engine: object  # plm.infer.engine.Engine
    cfg: GenerationConfig
    system: str | None = None
    messages: list[dict] = field(default_factory=list)  # user/assistant turns, oldest first

    @property
    def context(self) -> int:
        return self.engine.config.max_position_embeddings

    def _text(self, turns: list[dict]) -> str:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + turns
        return self.engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)

    def _prompt(self, turns: list[dict]) -> list[int]:
        return self.engine.tokenizer.encode(self._text(turns))

    def fit(self) -> tuple[list[dict], int, int]:
        """The turns that fit the window with room for a reply: whole user/assistant pairs are
        dropped from the oldest, never the newest user turn. Returns (turns, dropped, the reply's
        token budget: --max-new-tokens, or what the window leaves)."""
        turns, dropped = list(self.messages), 0
        want = min(self.cfg.max_new_tokens, max(1, self.context // 4))  # room a reply is guaranteed
        while len(self._prompt(turns)) > self.context - want and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            dropped += 1
        n = len(self._prompt(turns))
        if n > self.context - want:
            raise PLMError(f"the message needs {n} tokens; the model's window ({self.context}) "
                           f"leaves no room for a reply of {want}")
        return turns, dropped, min(self.cfg.max_new_tokens, self.context - n)

    def reply(self, user: str, stream: Callable[[str], None] | None = None) -> Reply:
        """Answer `user`; Ctrl-C (KeyboardInterrupt) stops the reply and keeps what was said,
        also when it comes before the first token (the reply is then empty)."""
        self.messages.append({"role": "user", "content": user})
        tok = self.engine.tokenizer
        pieces: list[str] = []

        def emit(piece: str) -> None:
            pieces.append(piece)
            if stream:
                stream(piece)

        t0, interrupted, text, n, dropped = time.perf_counter(), False, "", 0, 0
        try:
            try:
                turns, dropped, budget = self.fit()
            except PLMError:
                self.messages.pop()
                raise
            self.messages[:] = self.messages[len(self.messages) - len(turns):]
            cfg = dataclasses.replace(self.cfg, max_new_tokens=budget)
            res = generate(None, tok, self._text(turns), cfg, step=self.engine.new_step(), stream=emit)
            text, n = res.texts[0], len(res.tokens[0])
        except KeyboardInterrupt:
            interrupted, text = True, "".join(pieces)
            n = len(tok.encode(text))
        self.messages.append({"role": "assistant", "content": text})
        return Reply(text, n, time.perf_counter() - t0, interrupted, dropped)

    def reset(self) -> None:
        self.messages.clear()

    def save(self, path: str | Path) -> Path:
        from plm.utils import atomic_write_json
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return atomic_write_json(path, {"messages": msgs})

    @classmethod
    def load_messages(cls, path: str | Path) -> list[dict]:
        return json.loads(Path(path).read_text())["messages"]
