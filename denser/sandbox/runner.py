"""Run one untrusted program, or a batch in parallel, in a limited child process (design.md, Contract 5).

    from denser.sandbox import Limits, run_program
    r = run_program("print(input()[::-1])", stdin="abc\\n", limits=Limits(cpu_s=2))
    r.status, r.stdout                  # ("ok", "cba\\n")

Every run: a launcher process in a new session (``_launcher.py``) sets up the isolation the machine
allows and forks the program, which never shares the caller's interpreter. The caller's side here only
writes the configuration, waits with a safety timeout, and reads at most ``Limits.output_bytes`` of each
output back from unlinked temporary files. A result is always returned, never an exception from the
program: ``status`` says how it ended.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

_LAUNCHER = (Path(__file__).with_name("_launcher.py")).read_text()

#: user ids given to sandboxed programs when started as root: ``UID_BASE + launcher pid``, one per run
UID_BASE = 2_100_000_000

#: statuses a :class:`Result` can have
STATUSES = ("ok", "error", "timeout", "output_limit", "killed", "sandbox_error")


@dataclass(frozen=True)
class Limits:
    """What one program may use. Per process: a program that forks gets these again in each child,
    at most ``processes`` of them.

    Attributes:
        cpu_s: CPU seconds (``RLIMIT_CPU``): the deterministic limit; SIGXCPU, then SIGKILL a second later.
        wall_s: wall-clock seconds, after which the program and everything it started is killed;
            ``None``: ``2 * cpu_s + 1`` (a program that sleeps or waits uses no CPU).
        memory_mb: address space per process (``RLIMIT_AS``); allocations past it fail (MemoryError).
        output_bytes: stdout and stderr are each kept up to this many bytes, and no file the program
            writes may grow past it (``RLIMIT_FSIZE``: the program is killed by SIGXFSZ).
        disk_mb: size of the working directory and of the private ``/tmp`` (with a mount namespace).
        open_files: file descriptors per process (``RLIMIT_NOFILE``).
        processes: processes and threads of the program's user id (``RLIMIT_NPROC``); with a PID
            namespace every one of them dies with the program.
        stack_mb: stack size (``RLIMIT_STACK``).
    """

    cpu_s: float = 2.0
    wall_s: float | None = None
    memory_mb: int = 512
    output_bytes: int = 1 << 20
    disk_mb: int = 16
    open_files: int = 64
    processes: int = 16
    stack_mb: int = 64

    def __post_init__(self) -> None:
        for name in ("cpu_s", "memory_mb", "output_bytes", "disk_mb", "open_files", "processes", "stack_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.wall_s is not None and not self.wall_s > 0:
            raise ValueError(f"Limits.wall_s must be > 0 or None, got {self.wall_s!r}")

    @property
    def wall(self) -> float:
        return self.wall_s if self.wall_s is not None else 2 * self.cpu_s + 1


@dataclass(frozen=True)
class Result:
    """How one program ended.

    Attributes:
        status: ``ok`` (exit 0), ``error`` (another exit code), ``timeout`` (CPU or wall-clock limit),
            ``output_limit`` (wrote past ``output_bytes``), ``killed`` (another signal), or
            ``sandbox_error`` (the sandbox could not run it; ``error`` says why).
        stdout, stderr: the outputs, decoded as UTF-8 (bad bytes replaced), at most ``output_bytes`` each.
        exit_code: the exit status, or None when killed by a signal.
        signal: the signal that ended it, or None.
        timed_out: the CPU or wall-clock limit ended it; ``limit`` says which ("cpu", "wall", "output").
        cpu_s, wall_s: its CPU time (the first process's and the children it waited for) and wall time.
        truncated: an output was longer than ``output_bytes``.
        isolation: what was in force for this run (see :func:`capabilities`).
    """

    status: str
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    limit: str | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    truncated: bool = False
    error: str | None = None
    isolation: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self, limits: Limits | None = None) -> str:
        """One line saying how the program ended, for feedback (empty for ``ok``)."""
        if self.status == "timeout":
            secs = (limits.cpu_s if self.limit == "cpu" else limits.wall) if limits else None
            return f"Timed out after {secs:g} s." if secs else "Timed out."
        if self.status == "output_limit":
            n = limits.output_bytes if limits else None
            return f"Output limit exceeded ({n} bytes)." if n else "Output limit exceeded."
        if self.status == "killed":
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"The program was killed by {name}."
        if self.status == "sandbox_error":
            return f"The sandbox could not run the program: {self.error}"
        if self.status == "error":
            last = last_error_line(self.stderr)
            return last or f"The program exited with code {self.exit_code}."
        return ""


def last_error_line(stderr: str) -> str:
    """The last non-empty line of a traceback (``ValueError: ...``), at most 300 characters."""
    for line in reversed(stderr.strip().splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


def _program_env(workdir: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


def _expose_paths(python: str) -> list[str]:
    paths = {os.path.dirname(os.path.realpath(python)), sys.prefix, sys.base_prefix, sys.exec_prefix}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        import site

        paths.update(p for p in site.getsitepackages() if os.path.isdir(p))
    return sorted(paths)


def run_program(
    source: str,
    stdin: str | bytes = "",
    limits: Limits | None = None,
    *,
    files: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    python: str | None = None,
    namespaces: bool = True,
    drop_uid: bool = True,
) -> Result:
    """Run the Python program ``source`` in the sandbox and return how it ended.

    Args:
        source: the program's text; it runs as ``python main.py ARGS`` in its working directory.
        stdin: its standard input.
        limits: :class:`Limits` (defaults when None).
        files: more files for its working directory, ``{name: text}``.
        args: its command-line arguments.
        env: variables added to its environment (which holds nothing of the caller's).
        python: the interpreter (default: the caller's, ``sys.executable``).
        namespaces, drop_uid: use the namespaces and the unprivileged user id the machine allows (the
            default); False only to test the fallbacks.
    """
    limits = limits or Limits()
    python = python or sys.executable
    all_files = {"main.py": source, **(files or {})}
    for name in all_files:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"sandbox file names must be plain names, got {name!r}")
    workdir = tempfile.mkdtemp(prefix="denser-sandbox-")
    fds: list[int] = []
    try:
        return _run(workdir, all_files, stdin, limits, args, env, python, namespaces, drop_uid, fds)
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        _remove(workdir)


def _remove(path: str) -> None:
    def retry(func, p, _exc):  # a program may leave directories it made unreadable
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def _run(workdir, files, stdin, limits, args, env, python, namespaces, drop_uid, fds) -> Result:
    status_r, status_w = os.pipe()
    fds += [status_r, status_w]
    cfg = {
        "status_fd": status_w,
        "workdir": workdir,
        "files": files,
        "python": python,
        "argv": ["-s", "-B", "main.py", *args],
        "parent": os.getpid(),
        "env": _program_env(workdir, env),
        "expose": _expose_paths(python),
        "namespaces": namespaces,
        "drop_uid": drop_uid,
        "uid_base": UID_BASE,
        "limits": {**asdict(limits), "wall_s": limits.wall},
    }
    with tempfile.TemporaryFile() as cfg_f, tempfile.TemporaryFile() as in_f, \
            tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        cfg_f.write(json.dumps(cfg).encode())
        cfg_f.seek(0)
        in_f.write(stdin.encode() if isinstance(stdin, str) else stdin)
        in_f.seek(0)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(cfg_f.fileno())],
                stdin=in_f, stdout=out_f, stderr=err_f, pass_fds=(cfg_f.fileno(), status_w),
                env={"PATH": "/usr/bin:/bin"}, cwd="/", start_new_session=True,
            )
        except OSError as e:  # no process left to start one (the machine, not the program)
            return Result("sandbox_error", error=f"could not start the launcher: {e}")
        os.close(status_w)
        fds.remove(status_w)
        try:
            proc.wait(timeout=limits.wall + 10)
        except subprocess.TimeoutExpired:  # the launcher itself is stuck: kill its group (init dies with it)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        raw = b""
        while chunk := os.read(status_r, 65536):
            raw += chunk
        out, out_trunc = _read_capped(out_f, limits.output_bytes)
        err, err_trunc = _read_capped(err_f, limits.output_bytes)
    try:
        st = json.loads(raw) if raw else {}
    except ValueError:
        st = {}
    iso = tuple(st.get("isolation", ()))
    if "error" in st or "exit_code" not in st:
        why = st.get("error") or f"the launcher ended with {proc.returncode}: {last_error_line(err)}"
        return Result("sandbox_error", out, err, error=why, isolation=iso)
    sig, code = st["signal"], st["exit_code"]
    cpu, timed_out = st["cpu_s"], st["timed_out"]
    limit = None
    if timed_out:
        status, limit = "timeout", "wall"
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_s):
        status, limit, timed_out = "timeout", "cpu", True
    elif sig == signal.SIGXFSZ:
        status, limit = "output_limit", "output"
    elif sig is not None:
        status = "killed"
    else:
        status = "ok" if code == 0 else "error"
    if (out_trunc or err_trunc) and status in ("ok", "error", "killed"):  # Python ignores SIGXFSZ: EFBIG
        status, limit = "output_limit", "output"
    return Result(status, out, err, code, sig, timed_out, limit, cpu, st["wall_s"], out_trunc or err_trunc,
                  None, iso)


def _read_capped(f, cap: int) -> tuple[str, bool]:
    f.seek(0)
    data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def default_workers() -> int:
    """The number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Program:
    """One program of a batch: its text, stdin, limits and extra files (see :func:`run_program`)."""

    source: str
    stdin: str = ""
    limits: Limits | None = None
    files: Mapping[str, str] | None = None
    args: tuple[str, ...] = ()


def run_programs(programs: Sequence[Program], *, workers: int | None = None, **options) -> list[Result]:
    """Run ``programs`` with at most ``workers`` at a time (default: the number of cores) and return
    their results in the same order. Each program runs alone in its sandbox, so a result depends only
    on its program (and, for wall-clock limits, on the machine's load)."""
    workers = workers or default_workers()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def one(p: Program) -> Result:
        return run_program(p.source, p.stdin, p.limits, files=p.files, args=p.args, **options)

    if workers == 1 or len(programs) <= 1:
        return [one(p) for p in programs]
    with ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, programs))


@dataclass(frozen=True)
class Capabilities:
    """What the sandbox can isolate on this machine, found by running a program.

    Attributes:
        network: a new network namespace: no interface but a down loopback, so no connection anywhere.
        pid: a new PID namespace: the program sees only its own processes, and all of them die with it.
        mount: a new mount namespace: a private size-limited working directory and ``/tmp``, a fresh
            ``/proc``, directories the program's user could not enter anyway hidden.
        user: a user namespace (when not started as root).
        uid: the program runs as a user id of its own, with no groups and no capabilities (root only).
        root: the caller runs as root (then ``RLIMIT_NPROC`` holds only because of ``uid``).
        error: why the probe program could not run, or None.
    """

    network: bool
    pid: bool
    mount: bool
    user: bool
    uid: bool
    root: bool
    error: str | None = None

    def lines(self) -> list[str]:
        """What is and is not isolated, one line each (for logs and ``denser`` commands)."""
        yes = {
            "network": "network: none (a new network namespace)",
            "pid": "processes: a PID namespace of its own; every process it starts dies with it",
            "mount": "files: private working directory and /tmp; the rest of the filesystem read as its user",
            "uid": "user: a user id of its own, no groups, no capabilities",
        }
        no = {
            "network": "network: NOT isolated (no network namespace): the program can connect",
            "pid": "processes: no PID namespace; descendants are killed by the launcher (subreaper)",
            "mount": "files: no mount namespace; /tmp and other world-writable directories are shared",
            "uid": ("user: runs as the caller's user; RLIMIT_NPROC holds" if not self.root
                    else "user: NOT dropped: the program runs as root"),
        }
        return [(yes if getattr(self, k) else no)[k] for k in ("network", "pid", "mount", "uid")]


@functools.cache
def capabilities() -> Capabilities:
    """Probe once per process what isolation is in force (runs one tiny program)."""
    r = run_program("pass", limits=Limits(cpu_s=5, wall_s=30))
    iso = set(r.isolation)
    return Capabilities(
        network="net" in iso, pid="pid" in iso, mount="mount" in iso, user="user" in iso, uid="uid" in iso,
        root=os.geteuid() == 0, error=r.error if r.status != "ok" else None,
    )
