"""Data preparation: text sources -> tokenised binary shards plus a manifest.

Sources (in order, each document gets a global index):
  * text files (.txt .md .py .rst): one document per file
  * .jsonl: one document per line, from the field `text_field`
  * .parquet: one document per row of column `text_field` (needs pyarrow)
  * folders (walked recursively, hidden entries skipped) and glob patterns (`**` works)
  * `hf:NAME[:CONFIG[:SPLIT]]`: a Hugging Face dataset, streamed (needs `datasets`)

Output in out_dir: `NAME-00000.bin`, ... holding `shard_tokens` tokens each (the last one
fewer) as uint16 (vocab <= 65536) or uint32, every document followed by EOS, so the shards
read back as one contiguous token stream; and `manifest.json`. Each shard is written to a
temporary name, then renamed, then recorded in the manifest together with the point in
the document stream where the next shard starts, so a re-run skips (without tokenising
again) every shard of the unbroken prefix whose checksum verifies.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import multiprocessing as mp
import os
import pickle
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from plm.data.hf import load_hf_dataset
from plm.errors import PLMError
from plm.utils import atomic_path, atomic_write_json, iter_jsonl, sha256_file

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB as uint16
BATCH_DOCS, BATCH_CHARS = 256, 1 << 20  # one tokenisation task


# ---------------------------------------------------------------------------------------
# manifest


@dataclass
class ShardInfo:
    file: str
    tokens: int
    sha256: str
    # Resume point after this shard: the next token is token `next_doc_offset` of input
    # document `next_doc`; `documents`, `duplicates`, `empty` are running counts up to there.
    next_doc: int
    next_doc_offset: int
    documents: int
    duplicates: int
    empty: int


@dataclass
class Manifest:
    name: str
    sources: list[str]
    dtype: str
    vocab_size: int
    eos_token_id: int
    tokenizer_fingerprint: str
    settings: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    documents: int = 0  # documents written (after dedup, without empty ones)
    duplicates_removed: int = 0
    empty_skipped: int = 0
    total_tokens: int = 0
    complete: bool = False
    version: int = MANIFEST_VERSION

    def save(self, out_dir: str | Path) -> None:
        # atomic: a reader sees the old or the new manifest, never half
        atomic_write_json(Path(out_dir) / MANIFEST, asdict(self))

    @classmethod
    def load(cls, out_dir: str | Path) -> "Manifest":
        path = Path(out_dir) / MANIFEST
        if not path.is_file():
            raise PLMError(f"{out_dir}: no {MANIFEST}; prepare the data first (plm.data.prepare)")
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise PLMError(f"{path}: not a valid manifest ({e})") from None


# ---------------------------------------------------------------------------------------
# reading documents


def _expand(source: str) -> list[str]:
    """A source spec -> concrete file paths (or the hf: spec itself)."""
    if source.startswith("hf:"):
        return [source]
    if any(ch in source for ch in "*?["):
        files = sorted(p for p in globlib.glob(source, recursive=True)
                       if os.path.isfile(p) and p.endswith(SUPPORTED))
        if not files:
            raise PLMError(f"{source}: the pattern matches no {'/'.join(SUPPORTED)} files")
        return files
    path = Path(source)
    if not path.exists():
        raise PLMError(f"{source}: no such file or directory")
    if path.is_dir():
        files = sorted(
            str(p) for p in path.rglob("*")
            if p.is_file() and p.suffix in SUPPORTED
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise PLMError(f"{source}: folder holds no {'/'.join(SUPPORTED)} files")
        return files
    if path.suffix not in SUPPORTED:
        raise PLMError(f"{source}: unsupported file type {path.suffix!r}; use {'/'.join(SUPPORTED)}")
    return [source]


def _read_text(path: str) -> Iterator[str]:
    try:
        yield Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PLMError(f"{path}: not valid UTF-8 text ({e})") from None
    except OSError as e:
        raise PLMError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    for lineno, row in iter_jsonl(path):
        if text_field not in row:
            raise PLMError(f"{path}:{lineno}: no field {text_field!r} (found: {', '.join(map(repr, row))}); "
                           "set text_field")
        text = row[text_field]
        if not isinstance(text, str):
            raise PLMError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not text")
        yield text


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PLMError(f"{path}: reading Parquet needs pyarrow; install the datasets extra "
                       f"(pip install 'plm[datasets]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise PLMError(f"{path}: cannot read as Parquet ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise PLMError(f"{path}: no column {text_field!r} (found: {', '.join(pf.schema_arrow.names)}); set text_field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _read_hf(spec: str, text_field: str) -> Iterator[str]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise PLMError(f"{spec}: expected hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 else "train")
    for i, row in enumerate(load_hf_dataset(name, config, split, streaming=True)):
        if text_field not in row:
            raise PLMError(f"{spec}: row {i} has no field {text_field!r} (found: {', '.join(row)}); set text_field")
        yield row[text_field]


def iter_documents(sources: list[str], text_field: str = "text") -> Iterator[str]:
    """Every document of every source, in a fixed order."""
    expanded = [(src, _expand(src)) for src in sources]  # fail on a bad path before reading any
    for _, refs in expanded:
        for ref in refs:
            if ref.startswith("hf:"):
                yield from _read_hf(ref, text_field)
            elif ref.endswith(JSONL_SUFFIXES):
                yield from _read_jsonl(ref, text_field)
            elif ref.endswith(PARQUET_SUFFIXES):
                yield from _read_parquet(ref, text_field)
            else:
                yield from _read_text(ref)


# ---------------------------------------------------------------------------------------
# tokenisation (in-process or in worker processes)

TokenizerSpec = Any  # a tokenizer object, a zero-argument factory, or a tokenizer directory


def _materialise(spec: TokenizerSpec) -> Any:
    """Tokenizer object from an object, a factory (class, function, partial) or a path."""
    if isinstance(spec, (str, Path)):
        from plm.data.tokenizer import Tokenizer  # lazy: pulls in HF tokenizers
        return Tokenizer.from_dir(spec)
    is_tokenizer = hasattr(spec, "encode") or hasattr(spec, "encode_batch")
    if isinstance(spec, type) or (callable(spec) and not is_tokenizer):
        spec = spec()
    if not (hasattr(spec, "encode") or hasattr(spec, "encode_batch")):
        raise PLMError(f"tokenizer: {type(spec).__name__} has neither encode nor encode_batch")
    for attr in ("eos_token_id", "vocab_size"):
        if not isinstance(getattr(spec, attr, None), int):
            raise PLMError(f"tokenizer: {type(spec).__name__} needs an integer {attr}")
    return spec


def tokenizer_fingerprint(tok: Any) -> str:
    """The tokenizer's own fingerprint if it has one, else a behavioural one."""
    fp = getattr(tok, "fingerprint", None)
    if fp is not None:
        return str(fp() if callable(fp) else fp)
    probe = "PLM fingerprint: The quick brown fox, 12345 \u4f60\u597d\n\tdef f(x): return x**2"
    ids = _Encoder(tok, tok.eos_token_id, None)._encode([probe])[0]
    blob = json.dumps([type(tok).__qualname__, tok.vocab_size, tok.eos_token_id, list(map(int, ids))])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Encoder:
    """texts -> token arrays with EOS appended, range-checked, in the shard dtype."""

    def __init__(self, tok: Any, eos: int, dtype: str | None) -> None:
        self.tok, self.eos, self.dtype = tok, eos, dtype

    def _encode(self, texts: list[str]) -> list[Any]:
        if hasattr(self.tok, "encode_batch"):
            out = self.tok.encode_batch(texts)
        else:
            out = [self.tok.encode(t) for t in texts]
        return [getattr(ids, "ids", ids) for ids in out]  # also accept HF Encoding objects

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        vocab = self.tok.vocab_size
        arrays = []
        for ids in self._encode(texts):
            a = np.asarray(ids, dtype=np.int64)
            if a.size and (a.min() < 0 or a.max() >= vocab):
                raise PLMError(f"tokenizer produced id {int(a.max() if a.max() >= vocab else a.min())} "
                               f"outside its vocab_size {vocab}")
            arrays.append(np.append(a, self.eos).astype(self.dtype))
        return arrays


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(spec: TokenizerSpec, eos: int, dtype: str) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(_materialise(spec), eos, dtype)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(texts)


def _encoded(batches: Iterator[tuple[list, list[str]]], spec: TokenizerSpec, tok: Any,
             eos: int, dtype: str, workers: int) -> Iterator[tuple[list, list[np.ndarray]]]:
    """Tokenise (meta, texts) batches in order; with workers > 1 keep 2 per worker in flight."""
    if workers <= 1:
        enc = _Encoder(tok, eos, dtype)
        for meta, texts in batches:
            yield meta, enc(texts)
        return
    try:
        pickle.dumps(spec)
    except Exception as e:
        raise PLMError(f"tokenizer: cannot be sent to worker processes ({e}); pass a factory "
                       f"(e.g. functools.partial(Tokenizer.from_dir, path)) or a tokenizer path, "
                       f"or set workers=1") from None
    with mp.get_context().Pool(workers, initializer=_init_worker, initargs=(spec, eos, dtype)) as pool:
        pending: deque = deque()
        for meta, texts in batches:
            pending.append((meta, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 2 * workers:
                done_meta, result = pending.popleft()
                yield done_meta, result.get()
        while pending:
            done_meta, result = pending.popleft()
            yield done_meta, result.get()


# ---------------------------------------------------------------------------------------
# shards


def _shard_ok(out_dir: Path, info: ShardInfo, itemsize: int) -> bool:
    path = out_dir / info.file
    return (path.is_file() and path.stat().st_size == info.tokens * itemsize
            and sha256_file(path) == info.sha256)


def _shard_name(name: str, index: int) -> str:
    return f"{name}-{index:05d}.bin"


def _compatible(old: Manifest, new: Manifest, out_dir: Path) -> None:
    keys = ("name", "sources", "dtype", "vocab_size", "eos_token_id", "tokenizer_fingerprint")
    diffs = [k for k in keys if getattr(old, k) != getattr(new, k)]
    diffs += [f"settings.{k}" for k in ("text_field", "shard_tokens", "dedup")
              if old.settings.get(k) != new.settings.get(k)]
    if diffs:
        raise PLMError(f"{out_dir}: holds a different preparation ({', '.join(diffs)} differ); "
                       f"use another out_dir or delete this one")


def prepare(sources: list[str], out_dir: str | Path, tokenizer: TokenizerSpec, *,
            text_field: str = "text", shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1,
            dedup: bool = False, name: str = "data", eos_id: int | None = None,
            progress: bool = True) -> Manifest:
    """Tokenise `sources` into shards in `out_dir`; resumes an interrupted run of the same settings.

    tokenizer: an object with encode_batch / encode, eos_token_id and vocab_size; or a
    zero-argument factory returning one; or a tokenizer directory. With workers > 1 each
    worker process gets the object (which must pickle) or re-creates it from the factory/path.
    eos_id: the id appended after each document (default: the tokenizer's eos_token_id).
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise PLMError("prepare: no sources given")
    if shard_tokens < 1:
        raise PLMError(f"prepare: shard_tokens must be >= 1, got {shard_tokens}")
    if workers < 1:
        raise PLMError(f"prepare: workers must be >= 1, got {workers}")
    if not name or "/" in name or os.sep in name:
        raise PLMError(f"prepare: name must be a plain file-name prefix, got {name!r}")
    for src in sources:
        _expand(src)  # fail fast on a missing path or empty folder
    out = Path(out_dir)
    tok = _materialise(tokenizer)
    eos = tok.eos_token_id if eos_id is None else eos_id
    if not 0 <= eos < tok.vocab_size:
        raise PLMError(f"prepare: eos id {eos} is outside vocab_size {tok.vocab_size}")
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    itemsize = np.dtype(dtype).itemsize
    manifest = Manifest(
        name=name, sources=list(sources), dtype=dtype, vocab_size=tok.vocab_size, eos_token_id=eos,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        settings={"text_field": text_field, "shard_tokens": shard_tokens, "dedup": dedup, "workers": workers},
    )

    # Resume: keep the unbroken prefix of full shards whose checksums verify.
    if (out / MANIFEST).exists():
        old = Manifest.load(out)
        _compatible(old, manifest, out)
        if old.complete and all(_shard_ok(out, s, itemsize) for s in old.shards):
            return old
        for s in old.shards:
            if s.tokens != shard_tokens or not _shard_ok(out, s, itemsize):
                break
            manifest.shards.append(s)
        for s in old.shards[len(manifest.shards):]:
            (out / s.file).unlink(missing_ok=True)
        manifest.save(out)
    last = manifest.shards[-1] if manifest.shards else None
    start_doc, start_offset = (last.next_doc, last.next_doc_offset) if last else (0, 0)
    counts = {"documents": last.documents if last else 0, "duplicates": last.duplicates if last else 0,
              "empty": last.empty if last else 0}

    seen: set[bytes] = set()

    def candidates() -> Iterator[tuple[tuple[int, int, int, int], str]]:
        """Documents still to write as ((index, documents, duplicates, empty), text).

        The running counts travel with each document because tokenisation runs ahead of
        the writer: a shard records the counts as of its own last document.
        """
        for idx, text in enumerate(iter_documents(sources, text_field)):
            counting = idx > start_doc or (idx == start_doc and start_offset == 0)
            if not text.strip():
                counts["empty"] += counting
                continue
            if dedup:
                h = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if h in seen:
                    counts["duplicates"] += counting
                    continue
                seen.add(h)
            if idx < start_doc:
                continue
            counts["documents"] += counting  # the straddling document was counted before
            yield (idx, counts["documents"], counts["duplicates"], counts["empty"]), text

    def batches() -> Iterator[tuple[list, list[str]]]:
        metas: list[tuple[int, int, int, int]] = []
        texts: list[str] = []
        chars = 0
        for meta, text in candidates():
            metas.append(meta)
            texts.append(text)
            chars += len(text)
            if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield metas, texts
                metas, texts, chars = [], [], 0
        if texts:
            yield metas, texts

    buf = np.empty(shard_tokens, dtype=dtype)
    fill = 0

    def flush(next_doc: int, next_offset: int, tally: tuple[int, int, int]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        info_name = _shard_name(name, len(manifest.shards))
        path = out / info_name
        with atomic_path(path) as tmp:
            buf[:fill].tofile(tmp)
        manifest.shards.append(ShardInfo(info_name, fill, sha256_file(path), next_doc, next_offset, *tally))
        manifest.save(out)

    bar = tqdm(desc=f"prepare {name}", unit="doc", disable=not progress)
    written_before = sum(s.tokens for s in manifest.shards)
    tokens_new = 0
    try:
        for metas, arrays in _encoded(batches(), tokenizer, tok, eos, dtype, workers):
            for (idx, *tally), arr in zip(metas, arrays):
                pos = start_offset if idx == start_doc else 0
                while pos < len(arr):
                    take = min(shard_tokens - fill, len(arr) - pos)
                    buf[fill:fill + take] = arr[pos:pos + take]
                    fill += take
                    pos += take
                    if fill == shard_tokens:
                        # The stream resumes inside this document, or at the next one.
                        if pos < len(arr):
                            flush(idx, pos, tally)
                        else:
                            flush(idx + 1, 0, tally)
                        tokens_new += fill
                        fill = 0
            bar.update(len(metas))
            bar.set_postfix(tokens=written_before + tokens_new + fill, refresh=False)
    finally:
        bar.close()
    if fill:
        flush(-1, 0, (counts["documents"], counts["duplicates"], counts["empty"]))  # nothing resumes after it
        tokens_new += fill
    if counts["documents"] == 0:
        raise PLMError(f"prepare: no documents in {', '.join(sources)} (all empty"
                       f"{' or duplicates' if dedup else ''})")
    manifest.documents = counts["documents"]
    manifest.duplicates_removed = counts["duplicates"]
    manifest.empty_skipped = counts["empty"]
    manifest.total_tokens = sum(s.tokens for s in manifest.shards)
    manifest.complete = True
    manifest.save(out)
    return manifest


# ---------------------------------------------------------------------------------------
# reading back


def load_shards(out_dir: str | Path) -> list[np.memmap]:
    """Read-only memmaps of the shards of a finished preparation (cheap: no checksums)."""
    out = Path(out_dir)
    m = Manifest.load(out)
    if not m.complete:
        raise PLMError(f"{out}: preparation did not finish; run prepare again to resume it")
    maps = []
    itemsize = np.dtype(m.dtype).itemsize
    for s in m.shards:
        path = out / s.file
        if not path.is_file() or path.stat().st_size != s.tokens * itemsize:
            raise PLMError(f"{path}: missing or wrong size (expected {s.tokens} {m.dtype} tokens)")
        maps.append(np.memmap(path, dtype=m.dtype, mode="r", shape=(s.tokens,)))
    return maps


def verify(out_dir: str | Path) -> Manifest:
    """Check every shard's size and sha256 against the manifest; raise PLMError naming bad ones."""
    out = Path(out_dir)
    m = Manifest.load(out)
    if not m.complete:
        raise PLMError(f"{out}: preparation did not finish; run prepare again to resume it")
    itemsize = np.dtype(m.dtype).itemsize
    bad = [s.file for s in m.shards if not _shard_ok(out, s, itemsize)]
    if bad:
        raise PLMError(f"{out}: shards failing their checksum: {', '.join(bad)}; run prepare again to rebuild them")
    return m


def iter_text_files(paths: list[str], exts: tuple[str, ...] = (".txt", ".md", ".py", ".rst", ".json", ".jsonl")
                    ) -> Iterator[str]:
    """The text of every file under `paths` (files, or folders searched for `exts`), in sorted order."""
    for p in map(Path, paths):
        if not p.exists():
            raise PLMError(f"{p}: no such file or directory")
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in exts) if p.is_dir() else [p]
        for f in files:
            try:
                yield f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise PLMError(f"{f}: cannot read as UTF-8 text ({e})") from None
