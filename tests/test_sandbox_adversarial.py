"""Hostile programs against plm.eval.sandbox: the red team's escapes (issue 14) and the usual
accidents. Each must be blocked or scored as failed, and the caller's files and process
must survive. Layer-specific guarantees are skipped, with the reason, where the machine
lacks that layer; docs/reliability.md says which layers were active where this was run.

The escapes run through the real scoring path (score_completions) where the attack is a
"solution", and through run_python where it is about the machine.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from plm.eval.code_tasks import CodeProblem, mbpp_problem, score_completions
from plm.eval.sandbox import LAYERS, MAX_OUTPUT_CHARS, MAX_PROCESSES, NAMESPACE_LAYERS, run_python, sandbox_layers

# The strongest configuration this machine allows, and two fallbacks forced on: what a
# machine without namespaces (or without anything) would run. The marker and the
# clean-up of stray processes must hold in all three.
MODES = {"default": (), "no-namespaces": tuple(sorted(NAMESPACE_LAYERS)), "bare": tuple(sorted(LAYERS))}

ADD = CodeProblem(
    task_id="adv/add",
    prompt='def add(a, b):\n    """Return a + b."""\n',
    test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    canonical_solution="    return a + b\n",
    entry_point="add",
)
MBPP = mbpp_problem({"task_id": 1, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
                     "test_list": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]})


@pytest.fixture(scope="module")
def layers() -> list[str]:
    return sandbox_layers()


def need(layers: list[str], *wanted: str) -> None:
    missing = [w for w in wanted if w not in layers]
    if missing:
        pytest.skip(f"sandbox layer(s) {missing} not available here (active: {layers})")


def need_any(layers: list[str], *wanted: str) -> None:
    if not set(wanted) & set(layers):
        pytest.skip(f"needs one of {list(wanted)}; active: {layers}")


def passes(problem: CodeProblem, completion: str, timeout_s: float = 10.0) -> bool:
    return score_completions([problem], [completion], timeout_s=timeout_s, workers=1)[0]


@pytest.fixture
def tag() -> str:
    """A string only this test's processes carry (in argv or environment)."""
    return "plmsbx" + uuid.uuid4().hex


def strays(tag: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("cmdline", "environ"):
            try:
                if tag.encode() in Path(f"/proc/{pid}/{part}").read_bytes():
                    found.append(int(pid))
                    break
            except OSError:
                pass
    return found


def assert_no_strays(tag: str) -> None:
    # SIGKILL is delivered asynchronously: give the kernel a moment to finish the dying.
    for _ in range(100):
        if not strays(tag):
            return
        time.sleep(0.05)
    pytest.fail(f"processes tagged {tag} outlived the sandbox: {strays(tag)}")


@pytest.fixture
def canary(tmp_path: Path):
    """A file outside the sandbox that only isolation protects: world-writable, in a
    world-writable directory."""
    tmp_path.chmod(0o777)
    path = tmp_path / "canary.txt"
    path.write_text("precious")
    path.chmod(0o666)
    yield path
    assert path.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]


# -- legitimate programs --------------------------------------------------------------

def test_honest_solutions_pass_and_wrong_ones_fail() -> None:
    assert passes(ADD, ADD.canonical_solution)
    assert passes(MBPP, MBPP.canonical_solution)
    assert not passes(ADD, "    return a - b\n")
    assert not passes(MBPP, "def add(a, b):\n    return a - b")


def test_ordinary_programs_still_work() -> None:
    code = (
        "import sqlite3, subprocess, tempfile, threading, helper\n"
        "db = sqlite3.connect('local.db'); db.execute('create table t(x)'); db.commit()\n"
        "with tempfile.TemporaryDirectory() as d:\n    open(d + '/f', 'w').write('x')\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())\n"
        "print(helper.VALUE, exit.__class__.__name__)\n"
    )
    r = run_python(code, files={"helper.py": "VALUE = 42\n"})
    assert r.passed, r.stderr
    assert r.stdout.split() == ["thread", "child", "42", "Quitter"]


# -- leaving early, faking the marker ------------------------------------------------

@pytest.mark.parametrize("completion", [
    "    exit()\n",
    "    exit(0)\n",
    "    quit()\n",
    "    import sys; sys.exit(0)\n",
    "    import os; os._exit(0)\n",
    "    raise SystemExit(0)\n",
    "    raise SystemExit\n",
    "    raise KeyboardInterrupt\n",
    "    import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n",
    # before the tests run at all: at import time, after the function is defined
    "    return 0\nimport os\nos._exit(0)\n",
    "    return 0\nimport sys\nsys.exit(0)\n",
    "    return 0\nexit()\n",
])
def test_leaving_before_or_during_the_tests_fails(completion: str) -> None:
    assert not passes(ADD, completion)


@pytest.mark.parametrize("mode", MODES)
def test_early_exit_fails_in_every_mode(mode: str) -> None:
    for code in ("import os\nos._exit(0)\nassert False", "import sys\nsys.exit(0)\nassert False",
                 "exit()\nassert False"):
        r = run_python(code, disable=MODES[mode])
        assert not r.passed and r.returncode == 0, (mode, code, r)
    assert run_python("print('fine')", disable=MODES[mode]).passed, mode


def test_mbpp_solution_exiting_before_the_asserts_fails() -> None:
    for tail in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "exit(0)", "raise SystemExit(0)"):
        assert not passes(MBPP, f"def add(a, b):\n    return 0\n{tail}\n"), tail


def test_system_exit_raised_inside_check_fails() -> None:
    problem = CodeProblem(task_id="adv/exit-in-check", prompt="def f():\n", canonical_solution="    return 1\n",
                          test="def check(candidate):\n    raise SystemExit(0)\n    assert candidate() == 1\n",
                          entry_point="f")
    assert not passes(problem, problem.canonical_solution)


FAKE = "pass " + "0123456789abcdef" * 2


@pytest.mark.parametrize("mode", MODES)
def test_printing_or_writing_a_fake_marker_fails(mode: str) -> None:
    spray = (
        "import os\n"
        f"for line in ({FAKE!r}, 'pass', 'layers session', 'passed', 'OK'):\n"
        "    print(line)\n"
        "    for fd in range(1, 64):\n"
        "        try:\n"
        "            os.write(fd, (line + '\\n').encode())\n"
        "        except OSError:\n"
        "            pass\n"
    )
    r = run_python(spray + "os._exit(0)\n", disable=MODES[mode])
    assert not r.passed and r.returncode == 0
    # Honest work plus a forged line is a forgery attempt: it fails too.
    r = run_python(spray + "print('done')\n", disable=MODES[mode])
    assert not r.passed and r.returncode == 0 and "done" in r.stdout


def test_a_solution_printing_a_fake_marker_fails() -> None:
    assert not passes(ADD, f"    print({FAKE!r}); import os; os._exit(0)\n")


@pytest.mark.parametrize("mode", MODES)
def test_a_forked_copy_finishing_the_program_does_not_count(mode: str) -> None:
    # The parent exits 0 without finishing; the forked child runs to the end. Only the
    # original process may produce the marker (under a 3.11 subinterpreter the child
    # dies at once; either way no pass).
    code = "import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n    os._exit(0)\nprint('child done')\n"
    for extra in ((), ("subinterpreter",)):
        r = run_python(code, disable=tuple(MODES[mode]) + extra)
        assert not r.passed and r.returncode == 0, (mode, extra, r)


NONCE_HUNT = r'''
import gc, os, re, sys
hexes = set()
def scan(obj):
    if isinstance(obj, (str, bytes)):
        s = obj.decode("latin-1") if isinstance(obj, bytes) else obj
        hexes.update(re.findall(r"[0-9a-f]{32}", s))
for obj in gc.get_objects():
    scan(obj)
    if isinstance(obj, dict):
        for v in list(obj.values()):
            scan(v)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in list(obj):
            scan(v)
frame = sys._getframe()
while frame is not None:
    for v in list(frame.f_locals.values()) + list(frame.f_globals.values()):
        scan(v)
    frame = frame.f_back
current = [o for o in gc.get_objects() if getattr(o, "__name__", "") == "_current_frames"]
print("current_frames reachable:", bool(current) or hasattr(sys, "_current_frames"))
for name in ("cmdline", "environ"):
    try:
        scan(open("/proc/self/" + name, "rb").read())
    except OSError:
        pass
for fd in range(3, 64):
    try:
        os.set_blocking(fd, False)
        scan(os.read(fd, 4096))
    except OSError:
        pass
import atexit
try:
    atexit._run_exitfuncs()
except Exception:
    pass
for h in hexes:
    for fd in range(1, 64):
        try:
            os.write(fd, ("pass " + h + "\n").encode())
        except OSError:
            pass
os._exit(0)
'''


def test_the_nonce_cannot_be_found_by_introspection(layers: list[str]) -> None:
    # gc.get_objects, frames (sys._current_frames reaches other interpreters' frames: the
    # sandbox removes it), /proc/self, the inherited descriptors, atexit: nothing holds it.
    need(layers, "subinterpreter")
    r = run_python(NONCE_HUNT)
    assert not r.passed and r.returncode == 0
    assert "current_frames reachable: False" in r.stdout


def test_the_nonce_hunt_as_a_solution_fails(layers: list[str]) -> None:
    need(layers, "subinterpreter")
    body = "    pass\n" + NONCE_HUNT
    assert not passes(ADD, body)


@pytest.mark.parametrize("completion", [
    # redefining check: the test's own definition comes later and wins
    "    return 0\ndef check(candidate):\n    pass\n",
    # asserts raise the real AssertionError whatever the name is bound to
    "    return 0\nimport builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n",
    "    return 0\nAssertionError = None\n",
    # hiding the failure: a silent excepthook, an exit that does nothing, atexit tricks
    "    return 0\nimport sys\nsys.excepthook = lambda *a: None\n",
    "    return 0\nimport sys, os\nsys.exit = lambda *a: None\nos._exit = lambda *a: None\n",
    "    return 0\nimport atexit, os\natexit.register(os._exit, 0)\n",
    "    return 0\nimport sys\nsys.stderr = open('/dev/null', 'w')\n",
    # catching the assertion from inside the candidate is impossible; trying to must fail
    "    try:\n        return 0\n    except AssertionError:\n        return a + b\n",
])
def test_tampering_with_the_test_harness_fails(completion: str) -> None:
    assert not passes(ADD, completion)


TRACE_JUMP = """    return 0
import sys
{setup}
def local(frame, event, arg):
    if event == "line" and frame.f_code.co_name == "check":
        last = max(line for _, _, line in frame.f_code.co_lines() if line)
        if frame.f_lineno != last:
            frame.f_lineno = last  # jump over every assert but the last, "assert True"
    return local
{install}(lambda frame, event, arg: local if frame.f_code.co_name == "check" else None)
"""


@pytest.mark.parametrize("setup, install", [
    ("", "sys.settrace"),
    ("import importlib; importlib.reload(sys)", "sys.settrace"),
    ("import threading", ("threading.settrace_all_threads if hasattr(threading, 'settrace_all_threads') "
                          "else sys.settrace")),
])
def test_a_trace_function_cannot_skip_the_asserts(setup: str, install: str) -> None:
    # A trace function may set frame.f_lineno: without the sandbox's scrubbing of
    # sys.settrace this completion passes (the last assert of many HumanEval checks is
    # "assert True").
    problem = CodeProblem(task_id="adv/trace", prompt=ADD.prompt, entry_point="add",
                          canonical_solution=ADD.canonical_solution,
                          test=ADD.test + "    assert True\n")
    assert passes(problem, problem.canonical_solution)
    assert not passes(problem, TRACE_JUMP.format(setup=setup, install=install))


# -- the machine: files, processes, the network ---------------------------------------

def test_sqlite_cannot_create_files_outside(canary: Path, layers: list[str]) -> None:
    need(layers, "mountns")  # the canary is world-writable: only the jail hides it
    target = canary.parent / "outside.db"
    code = (f"import sqlite3\ndb = sqlite3.connect({str(target)!r})\n"
            "db.execute('create table t(x)'); db.commit()\n")
    assert not run_python(code).passed
    assert not target.exists()
    # ... while a database in its own directory is fine
    assert run_python("import sqlite3\nsqlite3.connect('ok.db').execute('create table t(x)')").passed


@pytest.mark.parametrize("code", [
    "open({canary!r}, 'w').write('pwned')",
    "open({canary!r}, 'a').write('pwned')",
    "import os\nos.remove({canary!r})",
    "import os\nos.rename({canary!r}, {canary!r} + '.moved')",
    "import os\nos.truncate({canary!r}, 0)",
    "import os\nos.chmod({canary!r}, 0)",
    "open({dir!r} + '/new.txt', 'w').write('pwned')",
    "import os\nos.symlink({dir!r}, 'link')\nopen('link/new.txt', 'w').write('pwned')",
    "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > {canary}; echo x > {dir}/new.txt'], check=True)",
])
def test_the_callers_files_survive(code: str, canary: Path, layers: list[str]) -> None:
    need(layers, "mountns")  # the canary is world-writable: only the jail hides it
    r = run_python(code.format(canary=str(canary), dir=str(canary.parent)))
    assert not r.passed


def test_the_callers_files_and_environment_cannot_be_read(canary: Path, layers: list[str],
                                                          monkeypatch: pytest.MonkeyPatch, tag: str) -> None:
    need(layers, "mountns")
    monkeypatch.setenv("PLM_EVALUATOR_SECRET", tag)
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for path in ({str(canary)!r}, '/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ',\n"
        "             '/etc/passwd', '/etc/shadow', '/root/.bashrc', os.path.expanduser('~/.ssh/id_rsa')):\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read()[:4000])\n"
        "    except OSError as e:\n"
        "        print(path, 'refused', type(e).__name__)\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        print(pid, open('/proc/' + pid + '/environ', 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
    )
    r = run_python(code)
    assert r.passed, r.stderr
    assert tag not in r.stdout and "precious" not in r.stdout and "root:" not in r.stdout
    assert "/etc/passwd refused FileNotFoundError" in r.stdout


def test_the_evaluator_cannot_be_signalled_killed_or_limited(layers: list[str]) -> None:
    need_any(layers, "pidns", "uid-drop")
    got: list[int] = []
    old_handler = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    core_before = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        code = "\n".join([
            "import os, resource, signal",
            "def attempt(name, fn):",
            "    try:",
            "        fn(); print(name, 'DONE')",
            "    except Exception as e:",
            "        print(name, 'refused', type(e).__name__)",
            f"for pid in ({os.getpid()}, {victim.pid}, os.getppid()):",
            "    if pid <= 1:",
            "        continue",
            "    attempt('usr1', lambda: os.kill(pid, signal.SIGUSR1))",
            "    attempt('pidfd', lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL))",
            "    attempt('killpg', lambda: os.killpg(os.getpgid(pid), signal.SIGKILL))",
            "    attempt('prlimit', lambda: resource.prlimit(pid, resource.RLIMIT_CORE, (1234, 1234)))",
            "    attempt('prlimit-nofile', lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, 3)))",
            "attempt('kill-all', lambda: os.kill(-1, signal.SIGKILL))",
        ])
        r = run_python(code)
        assert "DONE" not in r.stdout.replace("kill-all DONE", ""), r.stdout
        time.sleep(0.2)
        assert not got  # no SIGUSR1 reached this process
        assert victim.poll() is None  # the bystander lives
        assert resource.getrlimit(resource.RLIMIT_CORE) == core_before
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 3
        assert "1234" not in Path(f"/proc/{victim.pid}/limits").read_text()
    finally:
        signal.signal(signal.SIGUSR1, old_handler)
        victim.kill()
        victim.wait()


SPAWN = '''
import os, subprocess
env = {{"PLM_TAG": "{tag}"}}
subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"], env=env)
os.system("PLM_TAG={tag} nohup sleep 300 >/dev/null 2>&1 &")
try:
    subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
except OSError as e:
    print("new session refused:", e)
# the red team's route: _posixsubprocess.fork_exec called directly, with the arguments
# subprocess would pass on this Python version
import _posixsubprocess
real = _posixsubprocess.fork_exec
_posixsubprocess.fork_exec = lambda *args: real(*args)
import importlib, subprocess as sp
importlib.reload(sp)
sp.Popen(["sh", "-c", "echo pwned > {outside}; sleep 300 # {tag}"])
print("spawned")
'''


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ending", ["exits", "times out"])
def test_child_processes_do_not_outlive_the_program(mode: str, ending: str, tag: str, tmp_path: Path) -> None:
    outside = tmp_path / "written-by-child.txt"
    code = SPAWN.format(tag=tag, outside=outside) + ("while True:\n    pass\n" if ending == "times out" else "")
    r = run_python(code, timeout_s=2.0, disable=MODES[mode])
    assert "spawned" in r.stdout, r.stderr
    assert r.timed_out == (ending == "times out")
    assert_no_strays(tag)
    if "mountns" in r.layers or "uid-drop" in r.layers:
        assert not outside.exists()


def test_a_fork_bomb_is_contained(layers: list[str], tag: str) -> None:
    # Without a process limit a bomb would run until the timeout and could exhaust the
    # machine's PIDs: not something to try on a shared CI box.
    need(layers, "nproc")
    code = (
        "import subprocess\nn = 0\n"
        "try:\n"
        "    while True:\n"
        f"        subprocess.Popen(['sleep', '300'], env={{'PLM_TAG': '{tag}'}})\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('stopped after', n, type(e).__name__)\n"
    )
    r = run_python(code, timeout_s=5.0)
    assert "stopped after" in r.stdout, r
    assert int(r.stdout.split()[2]) < MAX_PROCESSES, (r.stdout, r.layers)
    assert_no_strays(tag)
    # the same with os.fork() in a loop
    r = run_python("import os\nwhile True:\n    os.fork()\n", timeout_s=2.0)
    assert not r.passed
    assert run_python("print('next one is fine')").passed


def test_the_network_is_unreachable(layers: list[str]) -> None:
    need_any(layers, "netns", "seccomp")
    for code in ("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)",
                 "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)",
                 ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  "s.sendto(b'x', ('8.8.8.8', 53))"),
                 "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)"):
        assert not run_python(code, timeout_s=5.0).passed, code


# -- runaway programs -----------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_an_infinite_loop_times_out(mode: str) -> None:
    r = run_python("while True:\n    pass", timeout_s=1.0, disable=MODES[mode])
    assert r.timed_out and not r.passed


@pytest.mark.parametrize("mode", MODES)
def test_a_memory_bomb_fails(mode: str) -> None:
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_mb=256, disable=MODES[mode])
    assert not r.passed and not r.timed_out and "MemoryError" in r.stderr


def test_an_output_flood_is_capped() -> None:
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_s=20.0)
    assert not r.passed and not r.timed_out  # stopped by the file-size limit, not the clock
    assert len(r.stdout) < MAX_OUTPUT_CHARS + 100 and "truncated" in r.stdout


@pytest.mark.parametrize("code, jail_only", [
    ("with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)", False),
    # many large files: without the jail's size-limited tmpfs only the per-file limit applies
    ("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2**23); i += 1", True),
    ("i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'wb').write(b'x' * 2**23); i += 1", True),
], ids=["one-huge-file", "many-files", "many-files-in-tmp"])
def test_filling_the_disk_fails(code: str, jail_only: bool, layers: list[str]) -> None:
    if jail_only:
        need(layers, "mountns")
    r = run_python(code, timeout_s=20.0)
    assert not r.passed and not r.timed_out
