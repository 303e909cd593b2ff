"""SFT data: chat sources, ChatML tokenisation with loss on assistant tokens only, and packing
without cross-contamination.

Sources (a recipe's `data:` entries), each a list of chats (lists of {role, content}):
  {path: FILE.jsonl, format: chat|alpaca|qa}   local JSONL; format guessed from the fields if omitted
  {hf: NAME, config: C, split: S, format: ...} a Hugging Face dataset (needs `datasets` and a network)
  {builder: NAME, ...}                         an offline builder (plm.data.tiny.BUILDERS)
  common: fields: {instruction: ..., input: ..., output: ..., question: ..., answer: ..., messages: ...}
          system: TEXT, limit: N
Formats: chat = a `messages` list; alpaca = instruction (+ input) -> output; qa = question -> answer
(GSM8K layout).

Packing: samples are laid end to end in rows of `seq_len`; each sample's positions restart at 0
and a block-diagonal causal mask [B, 1, T, T] stops any token attending to another sample, so a
packed sample is computed exactly as if it ran alone.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from plm.align.config import SFTSource
from plm.data.chat import IM_END, IM_START, render_chatml
from plm.data.hf import load_hf_dataset
from plm.data.tokenizer import Tokenizer
from plm.errors import ConfigError, PLMError
from plm.utils import read_jsonl

Chat = list[dict]
FORMATS = ("chat", "alpaca", "qa")
DEFAULT_FIELDS = {"messages": "messages", "instruction": "instruction", "input": "input", "output": "output",
                  "question": "question", "answer": "answer"}


# ---- records -> chats --------------------------------------------------------------------
def guess_format(record: dict, fields: dict) -> str:
    if fields["messages"] in record:
        return "chat"
    if fields["instruction"] in record and fields["output"] in record:
        return "alpaca"
    if fields["question"] in record and fields["answer"] in record:
        return "qa"
    raise PLMError(f"cannot tell the format of a record with fields {sorted(record)}; "
                   "set format: chat|alpaca|qa (and fields: {...} to map names)")


def record_to_chat(record: dict, fmt: str | None = None, fields: dict | None = None,
                   system: str | None = None, where: str = "record") -> Chat:
    """One dataset record as a chat (system prompt optional)."""
    f = {**DEFAULT_FIELDS, **(fields or {})}
    fmt = fmt or guess_format(record, f)
    try:
        if fmt == "chat":
            msgs = [{"role": str(m["role"]), "content": str(m["content"]),
                     **({"train": bool(m["train"])} if "train" in m else {})} for m in record[f["messages"]]]
        elif fmt == "alpaca":
            inp = str(record.get(f["input"]) or "").strip()
            user = str(record[f["instruction"]]).strip() + (f"\n\n{inp}" if inp else "")
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(record[f["output"]])}]
        elif fmt == "qa":
            msgs = [{"role": "user", "content": str(record[f["question"]])},
                    {"role": "assistant", "content": str(record[f["answer"]])}]
        else:
            raise ConfigError(f"{where}: format must be one of {FORMATS}, got {fmt!r}")
    except (KeyError, TypeError) as e:
        raise PLMError(f"{where}: a {fmt} record lacks {e}") from None
    if not any(m["role"] == "assistant" for m in msgs):
        raise PLMError(f"{where}: the chat has no assistant turn to learn from")
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def load_source(name: str, src: SFTSource, seed: int = 0) -> list[Chat]:
    """The chats of one recipe data source (a parsed `SFTSource`)."""
    where = f"data.{name}"
    if src.builder is not None:
        from plm.data.tiny import BUILDERS
        chats = BUILDERS[src.builder](**{"seed": seed, **src.args})
    else:
        records = read_jsonl(src.path) if src.path else load_hf_dataset(src.hf, src.config, src.split)
        chats = []
        for i, r in enumerate(records):
            if src.limit is not None and i >= src.limit:
                break
            chats.append(record_to_chat(dict(r), src.format, src.fields, None, f"{where}[{i}]"))
    if src.system:
        chats = [[{"role": "system", "content": src.system}] + c if c[0]["role"] != "system" else c
                 for c in chats]
    if src.limit is not None:
        chats = chats[:src.limit]
    if not chats:
        raise PLMError(f"{where}: no samples")
    return chats


# ---- tokenisation --------------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]  # next-token targets aligned with ids; -100 = no loss

    def __len__(self) -> int:
        return len(self.ids)


def encode_chat(tok: Tokenizer, messages: Sequence[dict], max_len: int | None = None,
                train_roles: tuple[str, ...] = ("assistant",)) -> Encoded:
    """ChatML ids of a chat and next-token labels that are set only on assistant tokens
    (each assistant turn's content and its closing <|im_end|>, which teaches the model to stop).
    An assistant message with "train": false is context only (e.g. the earlier answer shown in
    a refinement prompt z).

    The whole chat is tokenised in one piece (the same ids as tok.apply_chat_template), and
    character offsets decide which tokens are trained.
    """
    text = render_chatml(messages)
    spans, pos = [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        body = f"{m['content']}{IM_END}"
        if m["role"] in train_roles and m.get("train", True):
            spans.append((pos + len(head), pos + len(head) + len(body)))
        pos += len(head) + len(body) + 1
    enc = tok.hf.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    trainable = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    if max_len is not None and len(ids) > max_len:
        ids, trainable = ids[:max_len], trainable[:max_len]
    labels = [ids[i + 1] if trainable[i + 1] else -100 for i in range(len(ids) - 1)] + [-100]
    return Encoded(ids, labels)


def encode_prompt_response(tok: Tokenizer, context: Sequence[dict], response: str,
                           max_len: int | None = None) -> Encoded:
    """A context chat (ending with a user turn) plus one assistant response; labels on the
    response (+ <|im_end|>) only: the building block of preference pairs. Too long: the
    context's head is cut, never the response."""
    msgs = list(context) + [{"role": "assistant", "content": response}]
    text = render_chatml(msgs)
    start = len(render_chatml(context)) + len(f"{IM_START}assistant\n")
    end = start + len(response) + len(IM_END)
    enc = tok.hf.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    trainable = [start <= s < end for s, _ in enc.offsets]
    if max_len is not None and len(ids) > max_len:
        cut = len(ids) - max_len
        ids, trainable = ids[cut:], trainable[cut:]
    labels = [ids[i + 1] if trainable[i + 1] else -100 for i in range(len(ids) - 1)] + [-100]
    return Encoded(ids, labels)


# ---- packing -------------------------------------------------------------------------------
def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Greedy in-order packing: sample indices per row, each row's total length <= seq_len."""
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        n = min(n, seq_len)
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def collate_packed(samples: Sequence[Sequence[Encoded]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of samples -> {input_ids, labels, position_ids [B, T], attention_mask [B, 1, T, T] bool,
    segment_ids [B, T] (-1 = padding)}. Positions restart per sample; attention is causal
    within a sample only; padding attends to itself (no NaN rows) and carries no labels."""
    B = len(samples)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    seg = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(samples):
        at = 0
        for j, s in enumerate(row):
            n = min(len(s), seq_len - at)
            if n <= 0:
                break
            ids[b, at:at + n] = torch.tensor(s.ids[:n])
            lab = list(s.labels[:n])
            lab[-1] = -100  # a truncated sample must not predict the next sample's first token
            labels[b, at:at + n] = torch.tensor(lab)
            pos[b, at:at + n] = torch.arange(n)
            seg[b, at:at + n] = j
            at += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "attention_mask": packed_attention_mask(seg), "segment_ids": seg}


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] from segment ids [B, T] (-1 = padding)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    keep = same & causal[None] & (segment_ids[:, :, None] >= 0)
    keep |= torch.eye(T, dtype=torch.bool)[None]  # padding sees itself only
    return keep[:, None]


def pad_batch(samples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (one sample a row) with a 2D padding mask; for preference pairs."""
    T = max(len(s) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s)] = torch.tensor(s.ids)
        labels[i, :len(s)] = torch.tensor(s.labels)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---- the loader ----------------------------------------------------------------------------
class SFTLoader:
    """Packed SFT batches, reshuffled every epoch, with exact-resume state (trainer Loader).

    Rows are packed per epoch from a seeded permutation; rank r of w takes rows r, r+w, ...
    State is (epoch, next row), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, samples: Sequence[Encoded], seq_len: int, micro_batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if not samples:
            raise PLMError("SFT loader: no samples")
        self.samples, self.seq_len, self.mbs, self.pad_id = list(samples), seq_len, micro_batch_size, pad_id
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world_size, shuffle
        self.epoch, self.row = 0, 0
        self._rows: list[list[int]] | None = None
        self._rows_epoch = -1

    def rows_for(self, epoch: int) -> list[list[int]]:
        if self._rows_epoch != epoch:
            order = list(range(len(self.samples)))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            packed = pack_rows([len(self.samples[i]) for i in order], self.seq_len)
            self._rows = [[order[j] for j in r] for r in packed]
            self._rows_epoch = epoch
        return self._rows

    def num_rows(self) -> int:
        return len(self.rows_for(0))

    def __iter__(self) -> "SFTLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = []
        while len(batch) < self.mbs:
            rows = self.rows_for(self.epoch)
            if len(rows) < self.world:
                raise PLMError(f"SFT loader: {len(rows)} packed rows cannot feed {self.world} ranks")
            if self.row + self.world > len(rows):  # the epoch's ragged tail is dropped: next epoch
                self.epoch, self.row = self.epoch + 1, 0
                continue
            batch.append([self.samples[i] for i in rows[self.row + self.rank]])
            self.row += self.world
        out = collate_packed(batch, self.seq_len, self.pad_id)
        out.pop("segment_ids")
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def steps_for(num_rows: int, epochs: float, global_batch: int) -> int:
    return max(1, math.ceil(num_rows * epochs / global_batch))


def summarize(encoded: Sequence[Encoded]) -> dict[str, Any]:
    n = len(encoded)
    toks = sum(len(e) for e in encoded)
    trained = sum(sum(1 for x in e.labels if x != -100) for e in encoded)
    return {"samples": n, "tokens": toks, "trained_tokens": trained}
