"""The sandbox runs programs in isolation, stops runaway ones and keeps writes inside its own
temporary directory. Hostile programs: test_sandbox_adversarial.py."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from plm.errors import PLMError
from plm.eval.sandbox import LAYERS, MAX_OUTPUT_CHARS, run_many, run_python, sandbox_layers


def need_filesystem_isolation() -> None:
    # Without the jail or a uid of its own the program is the evaluator's user and may
    # write whatever that user may (docs/reliability.md, "Not defended").
    if not {"mountns", "uid-drop"} & set(sandbox_layers()):
        pytest.skip(f"no filesystem isolation on this machine: {sandbox_layers()}")


def test_correct_program_passes_and_stdout_is_captured() -> None:
    r = run_python("import math\nprint('sum', sum(range(10)), math.sqrt(16))")
    assert r.passed and r.returncode == 0 and not r.timed_out
    assert r.stdout == "sum 45 4.0\n"


def test_failing_program_reports_traceback() -> None:
    r = run_python("assert 1 + 1 == 3, 'bad math'")
    assert not r.passed and r.returncode == 1
    assert "AssertionError: bad math" in r.stderr


def test_infinite_loop_is_stopped_by_timeout() -> None:
    start = time.monotonic()
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and not r.passed
    assert time.monotonic() - start < 2.0


def test_blocking_sleep_is_stopped_by_timeout() -> None:
    start = time.monotonic()
    r = run_python("import time\ntime.sleep(30)", timeout_s=0.5)
    assert r.timed_out and time.monotonic() - start < 1.5


@pytest.mark.parametrize("code", [
    "x = bytearray(4 * 1024**3)",
    "x = []\nwhile True:\n    x.append(bytearray(10**6))",
])
def test_memory_bomb_fails_without_harming_the_parent(code: str) -> None:
    r = run_python(code, timeout_s=10.0, memory_mb=256)
    assert not r.passed and not r.timed_out
    assert "MemoryError" in r.stderr
    assert run_python("print('still fine')").stdout == "still fine\n"


@pytest.mark.parametrize("code", [
    "open({path!r}, 'w').write('pwned')",
    "open({path!r}, 'a').write('pwned')",
    "import os\nos.close(os.open({path!r}, os.O_CREAT | os.O_WRONLY))",
    "import pathlib\npathlib.Path({path!r}).write_text('pwned')",
    "import shutil\nopen('x', 'w').write('pwned')\nshutil.copy('x', {path!r})",
    "import os\nopen('x', 'w').write('pwned')\nos.rename('x', {path!r})",
    "import os\nos.symlink({dir!r}, 'link')\nopen('link/evil.txt', 'w').write('pwned')",
])
def test_writes_outside_the_work_directory_fail(tmp_path: Path, code: str) -> None:
    # The error depends on the layer that stops it: the path is absent from the jail
    # (FileNotFoundError) or belongs to another user (PermissionError).
    need_filesystem_isolation()
    target = tmp_path / "evil.txt"
    r = run_python(code.format(path=str(target), dir=str(tmp_path)))
    assert not r.passed
    assert "FileNotFoundError" in r.stderr or "PermissionError" in r.stderr
    assert not target.exists()


def test_removing_outside_files_fails(tmp_path: Path) -> None:
    need_filesystem_isolation()
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    (tmp_path / "sub").mkdir()
    for code in (f"import os\nos.remove({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path / 'sub')!r})",
                 f"import os\nos.rmdir({str(tmp_path / 'sub')!r})",
                 f"import os\nos.mkdir({str(tmp_path / 'new')!r})"):
        assert not run_python(code).passed, code
    assert victim.read_text() == "precious"
    assert (tmp_path / "sub").is_dir() and not (tmp_path / "new").exists()


def test_network_is_blocked() -> None:
    if not {"netns", "seccomp"} & set(sandbox_layers()):
        pytest.skip(f"no network isolation here: {sandbox_layers()}")
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert not r.passed and ("PermissionError" in r.stderr or "OSError" in r.stderr)


def test_child_processes_run_inside_the_sandbox() -> None:
    # Processes are allowed (up to MAX_PROCESSES); they share every limit of the program.
    r = run_python("import subprocess\nprint(subprocess.run(['sh', '-c', 'echo $HOME'], capture_output=True,"
                   " text=True).stdout.strip())")
    assert r.passed, r.stderr
    assert r.stdout.startswith(str(Path(tempfile.gettempdir()) / "plm-sandbox-"))  # HOME: its work dir


def test_writing_inside_the_work_directory_works() -> None:
    code = (
        "import os, shutil, tempfile\n"
        "os.makedirs('a/b')\n"
        "with open('a/b/f.txt', 'w') as f:\n    f.write('hello')\n"
        "os.rename('a/b/f.txt', 'g.txt')\n"
        "shutil.rmtree('a')\n"
        "with tempfile.NamedTemporaryFile() as t:\n    t.write(b'x')\n"
        "print(open('g.txt').read(), open('data.txt').read())\n"
    )
    r = run_python(code, files={"data.txt": "given"})
    assert r.passed, r.stderr
    assert r.stdout == "hello given\n"


def test_each_run_gets_a_fresh_directory_that_is_removed() -> None:
    r = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))")
    cwd, listing = r.stdout.splitlines()
    assert listing == "['program.py']"
    assert not Path(cwd).exists()


def test_non_daemon_threads_finish_as_at_interpreter_exit() -> None:
    r = run_python("import threading, time\n"
                   "threading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()\n"
                   "print('main')")
    assert r.passed and r.stdout == "main\nlate\n"


def test_exit_status_zero_without_reaching_the_end_is_not_a_pass() -> None:
    for code in ("import sys\nsys.exit(0)\nprint('never')", "import os\nos._exit(0)", "exit()"):
        r = run_python(code)
        assert r.returncode == 0 and not r.passed, code
    r = run_python("import sys\nsys.exit(3)")
    assert r.returncode == 3 and not r.passed


def test_layers_are_reported() -> None:
    layers = sandbox_layers()
    assert {"session", "rlimits"} <= set(layers)
    r = run_python("pass")
    assert r.passed and list(r.layers) == layers
    bare = run_python("pass", disable=sorted(LAYERS))
    assert bare.passed and set(bare.layers) <= {"session", "rlimits", "no-new-privs"}


def test_output_is_truncated() -> None:
    r = run_python("print('x' * 100_000)\nraise SystemExit('the end')")
    assert len(r.stdout) < MAX_OUTPUT_CHARS + 100
    assert "truncated" in r.stdout
    assert r.stderr.strip() == "the end"


def test_bad_arguments_raise_plm_error() -> None:
    with pytest.raises(PLMError, match="file name"):
        run_python("pass", files={"../escape.py": ""})
    with pytest.raises(PLMError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(PLMError, match="unknown layer"):
        run_python("pass", disable=["audit-hook"])


def test_run_many_keeps_order() -> None:
    results = run_many([f"print({i})" for i in range(6)] + ["raise SystemExit(2)"], workers=2)
    assert [r.stdout for r in results[:6]] == [f"{i}\n" for i in range(6)]
    assert not results[-1].passed and results[-1].returncode == 2
