"""Run untrusted, model-written Python in an isolated, throw-away process.

HumanEval/MBPP pass@1 and ARIES's code reward both come from here, so the sandbox must
hold against code that tries to escape *and* against code that tries to look like it
passed. Security comes from the operating system, not from hooks inside the interpreter
the untrusted code runs in. Each program runs as follows (docs/reliability.md, "Code
sandbox", lists what each layer defends and what it does not):

parent (this module)
  Writes the program into a fresh private directory, starts stage A in a new session with
  a minimal fixed environment, stdin from /dev/null, stdout/stderr into files, and two
  pipes: one carrying a random nonce (written and closed before the start), one carrying
  the status lines back. At the timeout it kills the whole tree.
stage A (``_SETUP``: privileged set-up, uses ctypes, runs no untrusted code)
  Unshares user (when not root), network, IPC/UTS, mount and PID namespaces, forks the
  program's process (PID 1 of the new PID namespace), which builds a jail (tmpfs root,
  read-only system and Python paths, private /tmp, /dev/shm and work directory,
  ``_ctypes`` hidden), sets rlimits, drops to a per-run unprivileged uid (or, not root,
  drops all capabilities), sets no_new_privs, a parent-death signal and a seccomp filter,
  then execs stage B. Every layer is tried separately; one that fails is left out.
stage B (``_RUNNER``: a clean interpreter without ctypes)
  Reads the nonce and keeps it only in atexit's C-level list, then runs the program in a
  subinterpreter. The main interpreter writes ``pass <nonce>`` only if the program ran
  to its end, in the original process. A program counts as passed only with that marker,
  exit status 0 and no timeout: exit(), os._exit(0), SystemExit, a fake marker on any
  channel, or a forked copy finishing the tests all fail.

``sandbox_layers()`` says which layers work on this machine; every result carries the
layers it ran under.
"""

from __future__ import annotations

import functools
import marshal
import math
import os
import secrets
import select
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from plm.errors import PLMError

# Keep result objects small: a program printing in a loop must not fill the parent's memory.
MAX_OUTPUT_CHARS = 4096
# Cap on any file the program writes, stdout and stderr included (they go to files).
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 256
# Processes and threads together. Total memory is bounded by MAX_PROCESSES * memory_mb.
MAX_PROCESSES = 16
# Size of the jail's tmpfs work directory, and of its private /tmp and /dev/shm each.
WORK_BYTES = 64 * 1024 * 1024
TMP_BYTES = 16 * 1024 * 1024
PROGRAM_NAME = "program.py"

NAMESPACE_LAYERS = frozenset({"userns", "netns", "ipcns", "pidns", "mountns"})
# Layers the caller can ask for (run_python's ``disable`` takes these names). Reported
# layers also include "session" and "rlimits" (always on), "nproc", "cap-drop",
# "no-new-privs" and "no-ctypes", which follow from the ones here.
LAYERS = NAMESPACE_LAYERS | {"uid-drop", "seccomp", "subinterpreter"}
# Tried in order until a probe program passes: a machine that lacks a layer still scores.
_LADDER = (
    LAYERS,
    LAYERS - {"seccomp"},
    LAYERS - {"mountns"},
    LAYERS - {"mountns", "seccomp"},
    LAYERS - NAMESPACE_LAYERS,
    LAYERS - NAMESPACE_LAYERS - {"seccomp"},
    frozenset({"subinterpreter"}),
    frozenset(),
)
# Per-run uids for a root parent: high, so they belong to nobody else on the machine.
_UID_BASE = 0x6A000000
_UID_SPAN = 1 << 24

# Stages A and B arrive precompiled (compiling stage A alone costs ~5 ms a program).
_LOADER = "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv[1])))"

_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",  # numeric libraries would otherwise reserve memory per core
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

# Stage A. Runs as the parent's user in the program's working directory. Never imports
# anything the program could later reach: it ends in execv.
_SETUP = r'''
import marshal, os, resource, sys
import _signal as signal, _struct as struct  # the public modules import enum: slow to start

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME, MS_MOVE = 1 << 18, 1 << 21, 1 << 24, 8192
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP = 1, 22, 24
PR_SET_SECUREBITS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 28, 36, 38
# syscall numbers: pivot_root and seccomp's deny list (x86_64, aarch64)
ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
NR = {
    "x86_64": dict(pivot_root=155, socket=41, prctl=157, clone=56, clone3=435, ptrace=101,
                   process_vm_readv=310, process_vm_writev=311, setsid=112, setpgid=109,
                   unshare=272, setns=308, mount=165, umount2=166, chroot=161, keyctl=250,
                   add_key=248, request_key=249, bpf=321, perf_event_open=298,
                   userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
                   io_uring_register=427, open_by_handle_at=304, kexec_load=246,
                   init_module=175, finit_module=313, delete_module=176, reboot=169,
                   memfd_create=319),
    "aarch64": dict(pivot_root=41, socket=198, prctl=167, clone=220, clone3=435, ptrace=117,
                    process_vm_readv=270, process_vm_writev=271, setsid=157, setpgid=154,
                    unshare=97, setns=268, mount=40, umount2=39, chroot=51, keyctl=219,
                    add_key=217, request_key=218, bpf=280, perf_event_open=241,
                    userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
                    io_uring_register=427, open_by_handle_at=265, kexec_load=104,
                    init_module=105, finit_module=273, delete_module=106, reboot=142,
                    memfd_create=279),
}


class Kernel:
    """The few libc calls Python's os module lacks."""

    def __init__(self):
        import ctypes
        self.c = ctypes
        self.libc = libc = ctypes.CDLL(None, use_errno=True)
        ul, cp = ctypes.c_ulong, ctypes.c_char_p
        libc.prctl.argtypes = [ctypes.c_int, ul, ul, ul, ul]
        libc.mount.argtypes = [cp, cp, cp, ul, cp]
        libc.umount2.argtypes = [cp, ctypes.c_int]
        libc.unshare.argtypes = [ctypes.c_int]
        self.machine = os.uname().machine

    def check(self, rc, what):
        if rc != 0:
            e = self.c.get_errno()
            raise OSError(e, "%s: %s" % (what, os.strerror(e)))

    def prctl(self, option, a=0, b=0):
        self.check(self.libc.prctl(option, a, b, 0, 0), "prctl %d" % option)

    def unshare(self, flags):
        self.check(self.libc.unshare(flags), "unshare")

    def mount(self, src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else os.fsencode(s)
        self.check(self.libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount " + dst)

    def pivot_root(self):
        """Make the cwd the root and forget the old one; a moved mount plus chroot where
        pivot_root is unknown or refused (after the process loses its capabilities, chroot
        can no longer be escaped)."""
        nr = NR.get(self.machine, {}).get("pivot_root")
        c = self.c
        if nr is not None and self.libc.syscall(c.c_long(nr), c.c_char_p(b"."), c.c_char_p(b".")) == 0:
            # The old root now sits on top of the new one: a failure here has no way back.
            if self.libc.umount2(b".", 2) != 0:  # MNT_DETACH
                sys.stderr.write("sandbox: cannot detach the old root\n")
                os._exit(125)
        else:
            self.mount(".", "/", None, MS_MOVE)
            os.chroot(".")
        os.chdir("/")

    def drop_capabilities(self):
        """Lose every capability for good, even as uid 0 of a user namespace: securebits
        stop exec from granting them again."""
        for cap in range(64):
            if self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        self.prctl(PR_SET_SECUREBITS, 0xEF)  # NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE, all locked
        c = self.c
        header = c.create_string_buffer(struct.pack("Ii", 0x20080522, 0))  # version 3, this process
        data = c.create_string_buffer(24)  # two zeroed {effective, permitted, inheritable}
        self.check(self.libc.capset(header, data), "capset")

    def seccomp(self):
        """Deny syscalls a program scored for correctness never needs: network sockets,
        leaving the process group, new namespaces, tracing, kernel keyrings, io_uring, and
        memfd_create (executable memory files would let it load native code it wrote)."""
        arch, nr = ARCH.get(self.machine), NR.get(self.machine)
        if arch is None:
            raise OSError("no seccomp filter for " + self.machine)
        LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
        ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x50000 | 1, 0x50000 | 38
        ins = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)
        p = [ins(LD, 4), ins(JEQ, arch, 1, 0), ins(RET, EPERM), ins(LD, 0)]
        if self.machine == "x86_64":  # the x32 ABI would bypass every number below
            p += [ins(JGE, 0x40000000, 0, 1), ins(RET, EPERM)]
        for name in ("ptrace", "process_vm_readv", "process_vm_writev", "setsid", "setpgid",
                     "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "keyctl",
                     "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
                     "io_uring_setup", "io_uring_enter", "io_uring_register",
                     "open_by_handle_at", "kexec_load", "init_module", "finit_module",
                     "delete_module", "reboot", "memfd_create"):
            p += [ins(JEQ, nr[name], 0, 1), ins(RET, EPERM)]
        p += [ins(JEQ, nr["clone3"], 0, 1), ins(RET, ENOSYS)]  # libc falls back to clone
        # Rules on argument 0 (its low 32 bits): socket() only for AF_UNIX (1); prctl() not
        # PR_SET_PDEATHSIG; clone() without CLONE_NEW* flags. Each block ends in a return.
        p += [ins(JEQ, nr["socket"], 0, 4), ins(LD, 16),
              ins(JEQ, 1, 1, 0), ins(RET, EPERM), ins(RET, ALLOW)]
        p += [ins(JEQ, nr["prctl"], 0, 4), ins(LD, 16),
              ins(JEQ, PR_SET_PDEATHSIG, 0, 1), ins(RET, EPERM), ins(RET, ALLOW)]
        p += [ins(JEQ, nr["clone"], 0, 4), ins(LD, 16),
              ins(JSET, 0x7E020000, 0, 1), ins(RET, EPERM), ins(RET, ALLOW)]
        p += [ins(RET, ALLOW)]
        c = self.c
        prog = c.create_string_buffer(b"".join(p))
        fprog = struct.pack("HxxxxxxQ", len(p), c.addressof(prog))  # struct sock_fprog
        buf = c.create_string_buffer(fprog)
        self.prctl(PR_SET_SECCOMP, 2, c.addressof(buf))  # SECCOMP_MODE_FILTER


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def makedirs(path):
    os.makedirs(path, exist_ok=True)


def bind_readonly(k, src, dst):
    if os.path.islink(src):
        makedirs(os.path.dirname(dst))
        if not os.path.lexists(dst):
            os.symlink(os.readlink(src), dst)
        return
    if os.path.isdir(src):
        makedirs(dst)
    else:
        makedirs(os.path.dirname(dst))
        open(dst, "a").close()
    k.mount(src, dst, None, MS_BIND | MS_REC)
    # A user namespace may only remount with the flags its source mount already had
    # (locked), so carry them over; the atime mode must match exactly.
    f = os.statvfs(src).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    flags |= MS_NOEXEC if f & os.ST_NOEXEC else 0
    flags |= MS_NODIRATIME if f & os.ST_NODIRATIME else 0
    if f & os.ST_NOATIME:
        flags |= MS_NOATIME
    elif f & os.ST_RELATIME:
        flags |= MS_RELATIME
    else:
        flags |= MS_STRICTATIME
    k.mount(None, dst, None, flags)


def copy_tree(src, dst, uid):
    for dirpath, dirnames, filenames in os.walk(src):
        target = os.path.join(dst, os.path.relpath(dirpath, src))
        makedirs(target)
        if uid is not None:
            os.chown(target, uid, uid)
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f, open(os.path.join(target, name), "wb") as g:
                g.write(f.read())
            if uid is not None:
                os.chown(os.path.join(target, name), uid, uid)


def jail(k, cfg, uid, with_proc):
    """A tmpfs root holding only what Python needs, read-only, plus private writable
    /tmp, /dev/shm and work directory; everything else (the caller's files, /etc,
    other users' /tmp) is simply absent."""
    r, work = cfg["jail"], cfg["work"]
    k.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    k.mount("tmpfs", r, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    for src, target in cfg["links"]:
        makedirs(os.path.dirname(r + src))
        if not os.path.lexists(r + src):
            os.symlink(target, r + src)
    for src in cfg["binds"]:
        bind_readonly(k, src, r + src)
    for path in cfg["hide"]:  # _ctypes and the CPython test modules: fail to load
        k.mount("/dev/null", r + path, None, MS_BIND)
    for name in ("null", "zero", "full", "random", "urandom"):
        makedirs(r + "/dev")
        open(r + "/dev/" + name, "a").close()
        k.mount("/dev/" + name, r + "/dev/" + name, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, r + "/dev/" + name)
    # Writable places are noexec: no binary or extension module the program writes can
    # be run or loaded (native code could read the marker out of this process's memory).
    for path in ("/tmp", "/dev/shm"):
        makedirs(r + path)
        k.mount("tmpfs", r + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                "size=%d,mode=1777" % cfg["tmp_bytes"])
    if with_proc:  # a fresh /proc showing only this PID namespace
        makedirs(r + "/proc")
        k.mount("proc", r + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    makedirs(r + work)
    owner = ",uid=%d,gid=%d" % (uid, uid) if uid is not None else ""
    k.mount("tmpfs", r + work, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=%d,nr_inodes=4096,mode=0700%s" % (cfg["work_bytes"], owner))
    copy_tree(work, r + work, uid)
    k.mount(None, r, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(r)
    k.pivot_root()


def children(pid):
    kids = set()
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                kids.update(int(x) for x in f.read().split())
        return kids
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look for our PPid instead
        pass
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % entry) as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.add(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return kids


def kill_descendants():
    """As a child subreaper every orphan of the program becomes our child: kill until none are left."""
    me = os.getpid()
    for _ in range(2000):
        kids = children(me)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        if not kids:
            import time
            time.sleep(0.001)


def supervise(pid, subreaper):
    """The program's parent: outside its PID namespace, runs no untrusted code, passes its
    exit status on (a signal as the same signal)."""
    if subreaper:
        signal.signal(signal.SIGTERM, lambda *_: (kill_descendants(), os._exit(143)))
    status = os.waitpid(pid, 0)[1]
    if subreaper:
        kill_descendants()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status))


def main():
    cfg = marshal.loads(bytes.fromhex(sys.argv[2]))
    want = set(cfg["want"])
    got = ["session"]
    root = os.geteuid() == 0
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        k = Kernel()
    except Exception:  # no ctypes or no libc: only rlimits, sessions and uid changes remain
        k = None
    ns = set()
    if k is not None and not root and "userns" in want:
        uid, gid = os.geteuid(), os.getegid()
        try:
            k.unshare(CLONE_NEWUSER)
            write_file("/proc/self/setgroups", "deny")
            write_file("/proc/self/uid_map", "0 %d 1" % uid)
            write_file("/proc/self/gid_map", "0 %d 1" % gid)
            ns.add("userns")
        except OSError:
            pass
    if k is not None:
        for name, flag in (("netns", CLONE_NEWNET), ("ipcns", CLONE_NEWIPC | CLONE_NEWUTS),
                           ("mountns", CLONE_NEWNS), ("pidns", CLONE_NEWPID)):
            if name in want:
                try:
                    k.unshare(flag)
                    ns.add(name)
                except OSError:
                    pass
    subreaper = "pidns" not in ns and k is not None
    if subreaper:
        try:
            k.prctl(PR_SET_CHILD_SUBREAPER, 1)
        except OSError:
            subreaper = False
    pid = os.fork()
    if pid:
        os.close(cfg["nonce_fd"])
        supervise(pid, subreaper)

    # The program's own process (PID 1 of the new namespace, if there is one).
    got += [n for n in ("userns", "netns", "ipcns", "pidns") if n in ns]
    uid = cfg["uid"] if root and "uid-drop" in want else None
    jailed = False
    if "mountns" in ns:
        try:
            jail(k, cfg, uid, "pidns" in ns)
            jailed = True
            got.append("mountns")
            if cfg["hide"]:
                got.append("no-ctypes")
        except OSError:
            pass  # nothing is pivoted yet: carry on without the jail
    os.chdir(cfg["work"])
    limits = cfg["limits"]
    for lim, soft, hard in ((resource.RLIMIT_AS, limits["as"], limits["as"]),
                            (resource.RLIMIT_CPU, limits["cpu"], limits["cpu"] + 1),
                            (resource.RLIMIT_FSIZE, limits["fsize"], limits["fsize"]),
                            (resource.RLIMIT_NOFILE, limits["nofile"], limits["nofile"])):
        resource.setrlimit(lim, (soft, hard))
    got.append("rlimits")
    if uid is not None and not (jailed or cfg["python_world_readable"]):
        uid = None  # the interpreter would be unreadable to that uid
    if uid is not None:
        if not jailed:  # the work directory stays on disk: hand it over
            for dirpath, dirnames, filenames in os.walk(cfg["work"]):
                for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                    os.chown(name, uid, uid)
        # Counted per uid, and this uid is this program's alone.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        got += ["uid-drop", "nproc"]
    elif "userns" in ns:
        # Counted per user namespace (Linux >= 5.14), which holds only this program.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        got.append("nproc")
        try:
            k.drop_capabilities()
            got.append("cap-drop")
        except OSError:
            pass
    if k is not None:
        try:
            k.prctl(PR_SET_NO_NEW_PRIVS, 1)
            got.append("no-new-privs")
            # After the uid change, which clears it: die with stage A's first process.
            k.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if "seccomp" in want:
                k.seccomp()
                got.append("seccomp")
        except OSError:
            pass
    runner = dict(cfg["runner"], layers=got)
    argv = [cfg["python"], "-I", "-S", "-B", "-u", "-c", cfg["loader"], cfg["runner_code"],
            marshal.dumps(runner).hex()]
    try:
        os.execv(cfg["python"], argv)
    except OSError as e:
        sys.stderr.write("sandbox: cannot start %s: %s\n" % (cfg["python"], e))
        os._exit(126)


main()
'''

# Stage B, part 1: runs in the subinterpreter (or, as a fallback, in the main one).
# WORK, SITE and PATH are prepended as literals.
_PRELUDE = r'''
import gc, sys


def _scrub():
    # sys._current_frames() returns the frames of *every* interpreter, the main one
    # included. A trace function (sys.settrace) can set frame.f_lineno and jump over
    # the asserts in check(). Remove them, and the second reference each has in the
    # interpreter's copy of the sys dict (else importlib.reload(sys) brings them back).
    for name in ("_current_frames", "_current_exceptions", "settrace", "_settraceallthreads"):
        f = getattr(sys, name, None)
        if f is not None:
            for holder in gc.get_referrers(f):
                if isinstance(holder, dict):
                    for key in [k for k, v in holder.items() if v is f]:
                        del holder[key]


_scrub()
del _scrub, gc
sys.path[:0] = [WORK]
sys.path.extend(SITE)
sys.argv = [PATH]
import builtins, _sitebuiltins
# exit() and quit(), as in a normal interpreter (-S leaves them out)
builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
del builtins, _sitebuiltins
_main = type(sys)("__main__")
_main.__file__ = PATH
sys.modules["__main__"] = _main
try:
    with open(PATH, "rb") as _f:
        _code = compile(_f.read(), PATH, "exec")
    del _f
    exec(_code, _main.__dict__)
    if "threading" in sys.modules:  # like interpreter exit: wait for non-daemon threads
        sys.modules["threading"]._shutdown()
except SystemExit as _e:  # the exit status a normal interpreter would give
    _c = _e.code
    if _c is None:
        _c = 0
    elif not isinstance(_c, int):
        print(_c, file=sys.stderr)
        _c = 1
    raise SystemExit(_c)
except BaseException:
    _t, _v, _tb = sys.exc_info()
    _v.with_traceback(_tb.tb_next)  # start the traceback in the program, not here
    sys.excepthook(_t, _v, _tb.tb_next)
    raise
finally:
    for _s in (sys.stdout, sys.stderr):
        try:
            _s.flush()
        except Exception:
            pass
'''

# Stage B, part 2: the main interpreter. It holds the nonce; the program never runs here
# unless no subinterpreter can be made.
_RUNNER = r'''
import os, sys


def main():
    import atexit, marshal
    cfg = marshal.loads(bytes.fromhex(sys.argv[2]))
    status, me = cfg["status_fd"], os.getpid()
    nonce = os.read(cfg["nonce_fd"], 64)
    os.close(cfg["nonce_fd"])
    # The marker is kept only in atexit's C-level callback list: no frame, global or
    # gc-listed object holds it, and the subinterpreter's atexit is a different one.
    atexit.register(os.write, status, b"pass " + nonce + b"\n")
    del nonce
    finish, exit_ = atexit._run_exitfuncs, os._exit
    layers = cfg["layers"]
    prelude = "WORK, SITE, PATH = %r, %r, %r\n" % (cfg["work"], cfg["site"], cfg["path"]) + cfg["prelude"]
    run = sid = None
    if "subinterpreter" in cfg["want"]:
        try:
            if sys.version_info >= (3, 13):
                import _interpreters as interp
                sid = interp.create(interp.new_config("legacy"))  # legacy: numpy & co. import
            else:
                import _xxsubinterpreters as interp
                try:
                    sid = interp.create(isolated=False)
                except TypeError:
                    sid = interp.create()
            run = interp.run_string
            layers.append("subinterpreter")
        except Exception:
            pass
    if run is None:  # same interpreter: atexit._run_exitfuncs would forge the marker
        import gc
        del atexit._run_exitfuncs
        gc.collect()  # untracks the (fd, marker) tuple so gc.get_objects() does not list it

        def run(_, source):
            exec(compile(source, "<sandbox>", "exec"), {"__name__": "__sandbox__"})
    os.write(status, ("layers " + ",".join(layers) + "\n").encode())
    try:
        err = run(sid, prelude)  # 3.13 returns the error; earlier versions raise it
    except BaseException as e:
        err = e
    if err is None and os.getpid() == me:  # not a forked copy of the program
        finish()
        exit_(0)
    code = 1
    try:
        if isinstance(err, SystemExit):
            text = "SystemExit: %s" % (err.code,)
        elif hasattr(err, "formatted"):
            text = err.formatted
        else:
            text = str(err).replace("<class 'SystemExit'>", "SystemExit", 1)
        if text.startswith("SystemExit: "):
            code = int(text[len("SystemExit: "):]) & 0xFF
    except Exception:
        pass
    exit_(code)


main()
'''


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed program; stdout and stderr are truncated to MAX_OUTPUT_CHARS.

    ``passed`` needs the harness's end-of-program marker, exit status 0 and no timeout.
    ``layers`` names the isolation layers the program ran under.
    """

    passed: bool
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    elapsed_s: float
    layers: tuple[str, ...] = ()


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


def _symlinks_on(path: str) -> list[tuple[str, str]]:
    """(link, target) for every symlink met while resolving ``path``, so the jail can
    recreate them: sys.executable is usually reached through one."""
    links, parts, cur, seen = [], [p for p in path.split("/") if p], "", 0
    while parts and seen < 40:
        cur = cur + "/" + parts.pop(0)
        if os.path.islink(cur):
            seen += 1
            target = os.readlink(cur)
            links.append((cur, target))
            base = target if target.startswith("/") else os.path.join(os.path.dirname(cur), target)
            parts = [p for p in os.path.normpath(base).split("/") if p] + parts
            cur = ""
    return links


def _inside(path: str, dirs: Collection[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _python_paths() -> tuple[list[str], list[str]]:
    """What the sandboxed interpreter needs: the (real) install and site-packages
    directories, and the site-packages directories to put on its sys.path."""
    sites = [p for p in site.getsitepackages() if os.path.isdir(p)]
    needed = [sys.executable, sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
              sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"), *sites]
    return [p for p in needed if p and os.path.exists(p)], sites


@dataclass(frozen=True)
class _Host:
    """Facts about this machine and interpreter, gathered once."""

    binds: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    hide: tuple[str, ...]
    site: tuple[str, ...]
    python_world_readable: bool


# Native-code doors a scored program has no use for: ctypes reads and writes any memory.
_HIDDEN_MODULES = frozenset({"_ctypes", "_ctypes_test", "_testcapi", "_testinternalcapi", "_testbuffer",
                             "_testmultiphase", "_testsinglephase", "_testimportmultiple",
                             "_testclinic", "_xxtestfuzz"})


def _world_readable(path: str) -> bool:
    """Whether an unprivileged stranger can reach ``path`` (every directory on the way o+x)."""
    cur = "/"
    for part in [p for p in os.path.realpath(path).split("/") if p]:
        if not os.stat(cur).st_mode & 0o001:
            return False
        cur = os.path.join(cur, part)
    return bool(os.stat(cur).st_mode & 0o004)


def _host() -> _Host:
    system = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
              "/etc/ld.so.cache", "/etc/localtime"]
    system = [p for p in system if os.path.lexists(p)]
    needed, sites = _python_paths()
    links = {link: target for p in needed for link, target in _symlinks_on(p)}
    covered = [os.path.realpath(p) for p in system if not os.path.islink(p)]
    binds = list(system)
    for real in sorted({os.path.realpath(p) if os.path.isdir(p) else os.path.dirname(os.path.realpath(p))
                        for p in needed}, key=len):
        if real != "/" and not _inside(real, covered):
            binds.append(real)
            covered.append(real)
    # Links whose own location is already inside a bound tree come with it.
    links = {k: v for k, v in links.items() if not _inside(os.path.dirname(k), covered) or k in system}
    links = {k: v for k, v in links.items() if k not in system}
    hide: list[str] = []
    if "_ctypes" not in sys.builtin_module_names:
        dynload = {os.path.realpath(p) for p in sys.path if p.endswith("lib-dynload") and os.path.isdir(p)}
        hide = sorted(os.path.join(d, n) for d in dynload for n in os.listdir(d)
                      if n.split(".")[0] in _HIDDEN_MODULES and _inside(d, covered))
    readable = all(_world_readable(p) for p in needed)
    return _Host(tuple(binds), tuple(sorted(links.items())), tuple(hide), tuple(sites), readable)


_lock = threading.Lock()
_host_facts: _Host | None = None
_config: tuple[frozenset[str], tuple[str, ...]] | None = None


def _facts() -> _Host:
    global _host_facts
    with _lock:
        if _host_facts is None:
            _host_facts = _host()
        return _host_facts


@functools.cache
def _compiled(source: str, name: str) -> str:
    return marshal.dumps(compile(source, name, "exec")).hex()


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``proc``; True if it timed out. A pidfd wakes us the moment it exits
    (Popen.wait(timeout) polls, with sleeps of up to 50 ms)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return False
        except subprocess.TimeoutExpired:
            return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            if time.monotonic() >= deadline:
                return True
    finally:
        os.close(fd)
    return False


def _pick_uid() -> int:
    return _UID_BASE + secrets.randbelow(_UID_SPAN)


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            kids.update(int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        return kids
    except OSError:  # no CONFIG_PROC_CHILDREN, or the process is gone
        if not os.path.exists(f"/proc/{pid}"):
            return kids
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return kids


def _kill_uid(uid: int) -> None:
    """kill(-1) as ``uid`` signals exactly that uid's processes: whatever escaped the
    process group, when there is no PID namespace to take them down."""
    try:
        subprocess.run(["kill", "-s", "KILL", "--", "-1"], user=uid, group=uid, extra_groups=[],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=_ENV, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        pass


def _stop(proc: subprocess.Popen, timed_out: bool) -> None:
    """Kill stage A, the program (its PID 1, if namespaced) and the process group."""
    kids = _children(proc.pid)
    if timed_out and proc.poll() is None:
        # Without a PID namespace stage A is the subreaper: SIGTERM makes it kill every
        # descendant it has adopted before it goes.
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass  # group already gone
    proc.wait()


def _parse_status(data: bytes, nonce: bytes) -> tuple[bool, tuple[str, ...]]:
    """(marker seen, layers). The first line is written before any program code runs, so
    it cannot be forged; a ``pass`` line with the wrong nonce is a forgery attempt and
    fails the program even if the real marker follows."""
    lines = data.split(b"\n")
    layers: tuple[str, ...] = ()
    if lines and lines[0].startswith(b"layers "):
        layers = tuple(x for x in lines[0][7:].decode("ascii", "replace").split(",") if x)
    claims = [line for line in lines[1:] if line.startswith(b"pass")]
    return claims == [b"pass " + nonce], layers


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while len(chunks) < 64:  # the program may have written junk; keep at most 4 MiB
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)


def _run(code: str, timeout_s: float, memory_mb: int, files: Mapping[str, str] | None,
         want: frozenset[str]) -> SandboxResult:
    rels = [(_check_file_name(name), text) for name, text in (files or {}).items()]
    host = _facts()
    root = os.geteuid() == 0
    uid = _pick_uid() if root and "uid-drop" in want else None
    outer = Path(tempfile.mkdtemp(prefix="plm-sandbox-"))
    try:
        # Traversable but not listable, so a dropped uid outside a jail can still reach work/.
        outer.chmod(0o711)
        work, jail = outer / "work", outer / "root"
        work.mkdir()
        jail.mkdir()
        (work / PROGRAM_NAME).write_text(code, encoding="utf-8")
        for rel, text in rels:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text, encoding="utf-8")
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        status_r, status_w = os.pipe()
        cfg = {
            "want": sorted(want), "uid": uid, "python": sys.executable, "work": str(work),
            "jail": str(jail), "binds": host.binds, "links": host.links,
            "hide": host.hide,
            "python_world_readable": host.python_world_readable,
            "work_bytes": WORK_BYTES, "tmp_bytes": TMP_BYTES, "nonce_fd": nonce_r,
            "limits": {"as": memory_mb * 1024 * 1024, "cpu": math.ceil(timeout_s) + 1,
                       "fsize": MAX_FILE_BYTES, "nofile": MAX_OPEN_FILES, "nproc": MAX_PROCESSES},
            "loader": _LOADER, "runner_code": _compiled(_RUNNER, "<sandbox-runner>"),
            "runner": {"status_fd": status_w, "nonce_fd": nonce_r, "work": str(work),
                       "path": str(work / PROGRAM_NAME), "site": host.site, "prelude": _PRELUDE,
                       "want": sorted(want)},
        }
        env = dict(_ENV, HOME=str(work), TMPDIR=str(work))  # tempfile stays in the work dir
        out_path, err_path = outer / "stdout", outer / "stderr"
        start = time.monotonic()
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                os.chmod(out_path, 0o600)
                os.chmod(err_path, 0o600)
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", "-c", _LOADER, _compiled(_SETUP, "<sandbox-setup>"),
                     marshal.dumps(cfg).hex()],
                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    pass_fds=(nonce_r, status_w), start_new_session=True)
        finally:
            os.close(nonce_r)
            os.close(status_w)
        timed_out = True
        try:
            timed_out = _wait(proc, timeout_s)
        finally:
            _stop(proc, timed_out)
        status = _drain(status_r)
        os.close(status_r)
        marker, layers = _parse_status(status, nonce)
        if uid is not None and "pidns" not in layers:
            _kill_uid(uid)
        elapsed = time.monotonic() - start
        return SandboxResult(
            passed=marker and proc.returncode == 0 and not timed_out,
            returncode=proc.returncode,
            timed_out=timed_out,
            stdout=_read_truncated(out_path),
            stderr=_read_truncated(err_path),
            elapsed_s=elapsed,
            layers=layers,
        )
    finally:
        _remove_tree(outer)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # outside a jail the program may have made a directory unwritable
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o700)
        shutil.rmtree(path, ignore_errors=True)


_PROBE = (
    "import collections, hashlib, json, math, os, re, sys, tempfile\n"
    "with open('probe.txt', 'w') as f:\n    f.write('x')\n"
    "with tempfile.TemporaryFile() as t:\n    t.write(b'x')\n"
    "print('ok', hashlib.md5(b'x').hexdigest()[:4])\n"
)


def _working_config() -> tuple[frozenset[str], tuple[str, ...]]:
    """The strongest set of layers under which a simple program runs correctly here."""
    global _config
    with _lock:
        cached = _config
    if cached is not None:
        return cached
    found: tuple[frozenset[str], tuple[str, ...]] | None = None
    for want in _LADDER:
        r = _run(_PROBE, 30.0, 512, None, want)
        if r.passed and r.stdout == "ok 9dd4\n":
            found = (want, r.layers)
            break
    if found is None:
        raise PLMError("sandbox: cannot run even an unconfined probe program "
                       f"({sys.executable}); the last attempt said: {r.stderr.strip()[-500:]}")
    with _lock:
        _config = found
    return found


def sandbox_layers() -> list[str]:
    """The isolation layers programs run under on this machine (probed once per process)."""
    return list(_working_config()[1])


def run_python(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    files: Mapping[str, str] | None = None,
    *,
    disable: Collection[str] = (),
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in the sandbox and report how it went.

    ``files`` maps relative names to text written into the work directory first.
    ``disable`` turns layers off (names from LAYERS), to test the fallbacks.
    """
    if not timeout_s > 0:
        raise PLMError(f"sandbox: timeout_s must be positive, got {timeout_s}")
    if memory_mb < 32:
        raise PLMError(f"sandbox: memory_mb must be at least 32, got {memory_mb}")
    unknown = set(disable) - LAYERS
    if unknown:
        raise PLMError(f"sandbox: unknown layer(s) {sorted(unknown)}; known: {sorted(LAYERS)}")
    want, _ = _working_config()
    return _run(code, timeout_s, memory_mb, files, want - frozenset(disable))


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
    _working_config()  # probe once, not once per thread
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, timeout_s, memory_mb), programs))
