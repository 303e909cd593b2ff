"""Run untrusted, model-written Python in a throw-away subprocess.

Each program runs in a fresh ``python -I -B -u`` interpreter inside its own temporary
directory, with resource limits (address space, CPU time, file size) and an audit hook
that refuses writes outside that directory, process creation, sockets and ctypes calls.

This guards against *accidents* by generated code (infinite loops, memory bombs,
``os.remove`` on the wrong path), not against a determined attacker: the audit hook
lives in the same interpreter as the code it watches. Run evaluations in a container
or VM when that matters.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from plm.errors import PLMError

# Keep result objects small: a program printing in a loop must not fill the parent's memory.
MAX_OUTPUT_CHARS = 4096
# Cap on any file the program writes, stdout and stderr included (they go to files).
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 256
PROGRAM_NAME = "program.py"

# Runs first in the child, before any user code. Limits are set here rather than in a
# preexec_fn because preexec_fn is unsafe when the parent has threads (run_many does).
_GUARD = r'''
import os, resource, sys, types

def _plm_guard(mem, cpu, fsize, nofile):
    for lim, soft, hard in (
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NOFILE, nofile, nofile),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(lim, (soft, hard))

    root = os.path.realpath(os.getcwd())
    prefix = root + os.sep
    # Bound now so that user code rebinding os.* cannot change what the hook calls.
    realpath, join, isabs, fspath, fsdecode = (
        os.path.realpath, os.path.join, os.path.isabs, os.fspath, os.fsdecode)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path, dir_fd=None):
        try:
            if isinstance(path, int):  # an open descriptor: check what it points at
                path = "/proc/self/fd/%d" % path
            else:
                path = fsdecode(fspath(path))
                # os.* events report a missing dir_fd as -1 (AT_FDCWD is -100): cwd-relative
                if isinstance(dir_fd, int) and dir_fd >= 0 and not isabs(path):
                    path = join("/proc/self/fd/%d" % dir_fd, path)
            real = realpath(path)
        except Exception:
            return False
        return real == root or real.startswith(prefix)

    always_blocked = frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "os.fork", "os.forkpty", "os.kill", "os.killpg", "pty.spawn",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "ctypes.call_function", "ctypes.dlsym",
        "os.mknod", "os.mkfifo", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
    })
    # event -> (index of path arg, index of its dir_fd arg or None)
    one_path = {
        "os.remove": (0, 1), "os.rmdir": (0, 1), "os.mkdir": (0, 2), "shutil.rmtree": (0, 1),
        "os.chmod": (0, 2), "os.chown": (0, 3), "os.utime": (0, 3), "os.truncate": (0, None),
        "os.symlink": (1, 2),
    }
    two_paths = frozenset({"os.rename", "os.link"})  # (src, dst, src_dir_fd, dst_dir_fd)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(flags, int) and flags & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            # Wrapping an already-open descriptor (open(1, "w")) grants nothing new.
            if writes and not isinstance(path, int) and not inside(path):
                raise PermissionError("sandbox: writing outside the work directory: %r" % (path,))
        elif event in always_blocked:
            raise PermissionError("sandbox: %s is not allowed" % event)
        elif event in one_path:
            i, j = one_path[event]
            if not inside(args[i], None if j is None else args[j]):
                raise PermissionError("sandbox: %s outside the work directory: %r" % (event, args[i]))
        elif event in two_paths:
            if not (inside(args[0], args[2]) and inside(args[1], args[3])):
                raise PermissionError("sandbox: %s outside the work directory" % event)

    main = types.ModuleType("__main__")
    main.__file__ = join(root, sys.argv[1])
    with open(sys.argv[1], encoding="utf-8") as f:
        code = compile(f.read(), main.__file__, "exec")
    sys.argv = [sys.argv[1]]
    sys.path.insert(0, root)  # -I leaves the cwd off sys.path; files= may hold helper modules
    sys.modules["__main__"] = main
    sys.addaudithook(hook)
    return code, main.__dict__

_plm_code, _plm_ns = _plm_guard(*(int(a) for a in sys.argv[2:6]))
del _plm_guard
exec(_plm_code, _plm_ns)
'''


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed program; stdout and stderr are truncated to MAX_OUTPUT_CHARS."""

    passed: bool  # exit code 0 and not timed out
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    elapsed_s: float


def _read_truncated(path: Path, limit: int = MAX_OUTPUT_CHARS) -> str:
    """Head and tail of a possibly huge output file (tracebacks live at the tail)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= limit:
            data = f.read()
            return data.decode("utf-8", errors="replace")
        half = limit // 2
        head = f.read(half)
        f.seek(size - half)
        tail = f.read()
    cut = size - len(head) - len(tail)
    return (head.decode("utf-8", errors="replace") + f"\n[... {cut} bytes truncated ...]\n"
            + tail.decode("utf-8", errors="replace"))


def _check_file_name(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or str(rel) == PROGRAM_NAME:
        raise PLMError(f"sandbox: bad file name {name!r} (need a relative path inside the work "
                       f"directory, not {PROGRAM_NAME!r})")
    return rel


def run_python(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    files: Mapping[str, str] | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed interpreter and report how it went.

    ``files`` maps relative names to text written into the work directory first.
    """
    if not timeout_s > 0:
        raise PLMError(f"sandbox: timeout_s must be positive, got {timeout_s}")
    if memory_mb < 32:
        raise PLMError(f"sandbox: memory_mb must be at least 32, got {memory_mb}")
    rels = [(_check_file_name(name), text) for name, text in (files or {}).items()]

    with tempfile.TemporaryDirectory(prefix="plm-sandbox-", ignore_cleanup_errors=True) as tmp:
        # Outputs sit next to, not inside, the work dir so the program cannot clobber them by path.
        work = Path(tmp) / "work"
        work.mkdir()
        (work / PROGRAM_NAME).write_text(code, encoding="utf-8")
        for rel, text in rels:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text, encoding="utf-8")
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(work),
            "TMPDIR": str(work),  # tempfile then stays inside the writable area
            "OMP_NUM_THREADS": "1",  # numeric libraries would otherwise reserve memory per core
            "OPENBLAS_NUM_THREADS": "1",
        }
        limits = [memory_mb * 1024 * 1024, math.ceil(timeout_s) + 1, MAX_FILE_BYTES, MAX_OPEN_FILES]
        argv = [sys.executable, "-I", "-B", "-u", "-c", _GUARD, PROGRAM_NAME, *map(str, limits)]

        start = time.monotonic()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            # A new session makes the child a process-group leader, so killpg reaches
            # anything it may have spawned despite the guard.
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass  # group already gone
                proc.wait()
        elapsed = time.monotonic() - start

        return SandboxResult(
            passed=proc.returncode == 0 and not timed_out,
            returncode=proc.returncode,
            timed_out=timed_out,
            stdout=_read_truncated(out_path),
            stderr=_read_truncated(err_path),
            elapsed_s=elapsed,
        )


def run_many(
    programs: Sequence[str],
    workers: int | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
) -> list[SandboxResult]:
    """Run many programs concurrently (threads just wait on subprocesses); results keep input order."""
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise PLMError(f"sandbox: workers must be at least 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, timeout_s, memory_mb), programs))
