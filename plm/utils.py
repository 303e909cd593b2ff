"""Shared basics every layer may use: atomic writes, checksums, JSONL, sizes, the cache folder,
memory readings. Imports nothing heavy (no torch) and nothing of plm but `plm.errors`.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from plm.errors import ConfigError, PLMError


# ---- files ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write `path` through a temporary file in the same folder, fsync it and rename it into
    place: readers see the old file or the whole new one, never a torn one; a crash leaves the
    old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (a GGUF writer, numpy's
    tofile, a quantiser); on success it is fsynced and renamed to `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(tmp: str | Path, dst: str | Path) -> Path:
    """Move a fully written folder `tmp` into place as `dst`. An existing `dst` is first renamed
    aside (`.old-NAME`) and removed only once the new one is in, so at every moment one complete
    copy exists under `dst` or beside it; `recover_dir` puts the old one back after a crash."""
    tmp, dst = Path(tmp), Path(dst)
    old = dst.with_name(f".old-{dst.name}")
    if old.exists():
        if dst.exists():
            shutil.rmtree(old)
        else:
            old.rename(dst)  # an interrupted earlier publish
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def recover_dir(dst: str | Path) -> bool:
    """After a crash inside `publish_dir`: restore `dst` from its `.old-` copy if it is missing."""
    dst = Path(dst)
    old = dst.with_name(f".old-{dst.name}")
    if not dst.exists() and old.is_dir():
        old.rename(dst)
        return True
    return False


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Checksum of a file, or of a folder's files (names and contents, in sorted order)."""
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def short_hash(obj: Any) -> str:
    """A 16-hex-digit fingerprint of a JSON-able object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- JSONL ------------------------------------------------------------------------------
def iter_jsonl(path: str | Path, torn_tail_ok: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a .jsonl or .jsonl.gz file.

    torn_tail_ok: a last line without its newline that does not parse (a writer killed
    mid-line, as in an append-only log) is skipped rather than an error.
    """
    path = Path(path)
    if not path.is_file():
        raise PLMError(f"file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):  # streamed: data files can be large
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if torn_tail_ok and not line.endswith("\n"):  # only the last line lacks it
                        return
                    raise PLMError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise PLMError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, record
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise PLMError(f"cannot read {path}: {e}") from None


def read_jsonl(path: str | Path, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    return [r for _, r in iter_jsonl(path, torn_tail_ok)]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """All records, atomically."""
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    return Path(path)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One record at the end of an append-only log (readers skip a torn last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


# ---- sizes ------------------------------------------------------------------------------
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*", re.I)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(size: int | str, what: str = "size") -> int:
    """Bytes from 1234, '500MB', '1.5G', '2GiB', '64k': units as written, decimal (kB, MB, GB: powers
    of 1000) or binary (KiB, MiB, GiB: powers of 1024); a bare letter is decimal."""
    if isinstance(size, bool):
        raise ConfigError(f"{what}: expected a size such as 2GB or 1.5GiB, got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ConfigError(f"{what}: a size cannot be negative, got {size}")
        return size
    m = _SIZE.fullmatch(str(size))
    if not m or (m.group(3) and not m.group(2)):
        raise ConfigError(f"{what}: cannot read {size!r} as a size (e.g. 2GB, 1.5GiB, 500MB, 1234)")
    number, prefix, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    return int(number * (1024 if binary else 1000) ** _POWERS[prefix])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


# ---- the machine ---------------------------------------------------------------------------
def cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (the others repeat them); {} where unreadable."""
    info: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                info[k.strip()] = v.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 "flags", Arm "Features"; empty where unknown)."""
    info = cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def cpu_name(path: str = "/proc/cpuinfo") -> str:
    """The CPU as every benchmark names it: model name, CPUID family and model, and the vector
    extensions that decide which kernels run, e.g. "Intel(R) Xeon(R) Processor (family 6 model
    167; avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_int8)". A VM may give only the bare
    "Intel(R) Xeon(R) Processor", and a speed holds only for the CPU it was measured on."""
    import platform
    info = cpuinfo(path)
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8") if f in flags]
    if "avx512_vnni" in isa:  # AVX-512 VNNI implies AVX2: name only the widest
        isa.remove("avx2")
    ident = f"family {info['cpu family']} model {info['model']}" if "cpu family" in info and "model" in info else ""
    extra = "; ".join(x for x in (ident, " ".join(isa)) if x)
    name = info.get("model name") or platform.processor() or platform.machine()
    return name + (f" ({extra})" if extra else "")


def cpu_has_native_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX-512 BF16 or AMX): where bf16 autocast pays on a CPU.
    Elsewhere PyTorch emulates it, about 30x slower than fp32 for training (AVX2 hosts)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


# ---- folders and memory -------------------------------------------------------------------
def cache_dir(*parts: str) -> Path:
    """$PLM_CACHE, else ~/.cache/plm (derived results: evaluation caches, built kernels)."""
    root = Path(os.environ.get("PLM_CACHE") or Path.home() / ".cache" / "plm").expanduser()
    return root.joinpath(*parts)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss across exec, so a worker started by a big process would report its parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
