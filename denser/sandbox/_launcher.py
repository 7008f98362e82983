"""The sandbox's launcher: the first process of every sandboxed run (design.md, Contract 5).

This file is not imported: ``runner.py`` runs its text with ``python -I -S -c`` in a new session, with
one argument, the number of an inherited file descriptor that holds the run's configuration (JSON),
and a second descriptor to write the run's status to. It imports only the standard library.

It sets up what isolation the machine allows, then forks "init", which forks the program:

1. namespaces: as root ``unshare(NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS)``; as another user the same
   with ``NEWUSER`` (the user mapped to itself). If the whole set is refused, smaller sets are tried;
   what is in force is reported.
2. mount namespace: a size-limited tmpfs becomes the working directory (the program's files are written
   into it); private empty tmpfs over ``/tmp``, ``/var/tmp``, ``/dev/shm``; a directory on the
   interpreter's path that other users cannot enter (``/root`` for an interpreter under it) is covered
   by an empty tmpfs that holds only the interpreter's directories, bound back in.
3. init: PID 1 of the new PID namespace, in a session of its own, with a fresh ``/proc``; it dies with
   the launcher (``PR_SET_PDEATHSIG``). It is not the program, because PID 1 ignores signals it has no
   handler for (SIGXCPU included). It reaps, and reports the program's wait status and CPU time.
4. the program: resource limits, then, when started as root, a user id of its own (``uid_base +
   launcher pid``) with no groups and no capabilities; exec of the interpreter.
5. the launcher waits with a wall-clock timer that SIGKILLs init. When init ends, the kernel kills
   every process left in its PID namespace. Without a PID namespace the launcher is a child subreaper
   and kills every descendant (and, with a user id of the run's own, every process of that id) before
   it reports.
"""

import ctypes
import json
import os
import resource
import signal
import stat
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4

_libc = ctypes.CDLL(None, use_errno=True)
SCRATCH_SIZE = ["16m"]


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags):
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(source, target, fstype, flags, data=None):
    _check(
        _libc.mount(
            None if source is None else source.encode(),
            target.encode(),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            None if data is None else data.encode(),
        ),
        f"mount {target}",
    )


def _prctl(option, arg):
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0), "prctl")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _namespaces(root):
    """Enter the namespaces the machine allows; returns the set in force."""
    base = 0 if root else CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    tries = [
        ("mount", "pid", "net", "ipc", "uts"),
        ("pid", "net", "ipc", "uts"),
        ("mount", "net"),
        ("net",),
    ]
    bits = {"mount": CLONE_NEWNS, "pid": CLONE_NEWPID, "net": CLONE_NEWNET, "ipc": CLONE_NEWIPC,
            "uts": CLONE_NEWUTS}
    for names in tries:
        flags = base
        for n in names:
            flags |= bits[n]
        try:
            _unshare(flags)
        except OSError:
            continue
        got = set(names)
        if not root:
            got.add("user")
            try:
                _write("/proc/self/setgroups", "deny")
            except OSError:
                pass
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
        return got
    return set()


def _blocked_ancestor(path):
    """The highest directory above ``path`` that other users cannot enter, or None."""
    cur = "/"
    for part in path.strip("/").split("/")[:-1]:
        cur = os.path.join(cur, part)
        try:
            if not os.stat(cur).st_mode & stat.S_IXOTH:
                return cur
        except OSError:
            return None
    return None


def _mask(paths, scratch):
    """Cover each directory in ``scratch`` (``/tmp`` ...) with an empty private tmpfs, and every directory
    that other users cannot enter above a path in ``paths`` (the interpreter's) with an empty tmpfs, then
    bind each path in ``paths`` that a cover hid back at its place."""
    real = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    keep = [p for p in real if not any(p != q and p.startswith(q + "/") for q in real)]
    covers = {d: "mode=1777" for d in scratch if os.path.isdir(d)}
    for p in keep:
        anc = _blocked_ancestor(p)
        if anc is not None:
            covers.setdefault(anc, "mode=0755")
    top = [c for c in covers if not any(c != o and c.startswith(o + "/") for o in covers)]
    hidden = [p for p in keep if any(p.startswith(c + "/") for c in top)]
    held = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in hidden]
    for c in sorted(top):
        _mount("tmpfs", c, "tmpfs", MS_NOSUID | MS_NODEV, covers[c] + ",size=" + SCRATCH_SIZE[0])
    for p, fd in held:
        os.makedirs(p, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        os.close(fd)


def _set_limits(lim):
    def cap(res, soft, hard=None):
        hard = soft if hard is None else hard
        try:
            cur_soft, cur_hard = resource.getrlimit(res)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                soft = min(soft, hard)
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            resource.setrlimit(res, (min(soft, resource.getrlimit(res)[1]),) * 2)

    cpu = max(1, int(-(-lim["cpu_s"] // 1)))
    cap(resource.RLIMIT_CPU, cpu, cpu + 1)
    cap(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    cap(resource.RLIMIT_FSIZE, lim["output_bytes"] + 1)  # one byte more: the caller sees it went over
    cap(resource.RLIMIT_NOFILE, lim["open_files"])
    cap(resource.RLIMIT_NPROC, lim["processes"])
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_STACK, lim["stack_mb"] << 20)
    cap(resource.RLIMIT_MEMLOCK, 0)
    cap(resource.RLIMIT_MSGQUEUE, 0)


def _children(pid):
    """Pids whose parent is ``pid`` (scans /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def _kill_uid(uid):
    """Kill every process of ``uid`` (a user id only this run uses): a child takes the id and signals -1."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                os.kill(-1, signal.SIGKILL)  # zombies count too: the caller reaps and calls again
            except ProcessLookupError:
                pass
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _reap_all(uid):
    """Without a PID namespace: kill and reap every descendant (they were reparented to us)."""
    me = os.getpid()
    for _ in range(10000):
        if uid is not None:
            _kill_uid(uid)
        kids = _children(me)
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        reaped = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            reaped = True
        if not kids and not reaped:
            return
        time.sleep(0.001)


def _init(cfg, lim, ns, uid, gid, launcher, errr, errw, resr, resw):
    """The launcher's child: PID 1 of the program's PID namespace (when there is one). It forks the
    program, reaps whatever is reparented to it, and sends the program's wait status to the launcher.
    It is not the program itself: PID 1 ignores signals it has no handler for (SIGXCPU included)."""
    try:
        os.close(errr)
        os.close(resr)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if "pid" not in ns and os.getppid() != launcher:
            os._exit(1)
        os.setsid()
        if "pid" in ns and "mount" in ns:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ,
                    signal.SIGXCPU):
            signal.signal(sig, signal.SIG_DFL)
        me = os.getpid()
        prog = os.fork()
        if prog == 0:
            try:
                _set_limits(lim)
                if uid is not None:
                    os.setgroups([])
                    os.setgid(gid)
                    os.setuid(uid)
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != me:
                    os._exit(1)
                _prctl(PR_SET_DUMPABLE, 0)
                os.execve(cfg["python"], [cfg["python"], *cfg["argv"]], cfg["env"])
            except BaseException as e:  # noqa: BLE001 - reported to the parent, never raised
                os.write(errw, f"{type(e).__name__}: {e}".encode()[:2000])
                os._exit(127)
        os.close(errw)
        while True:
            try:
                got, wstatus, ru = os.wait4(-1, 0)
            except ChildProcessError:
                os._exit(1)
            if got == prog:
                break
        os.write(resw, json.dumps([wstatus, ru.ru_utime + ru.ru_stime]).encode())
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(errw, f"{type(e).__name__}: {e}".encode()[:2000])
        except OSError:
            pass
    os._exit(0)


def main():
    cfg_fd = int(sys.argv[1])
    with os.fdopen(cfg_fd, "rb") as f:
        cfg = json.loads(f.read())
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the caller dies (killed trainer): so do we, and init with us
    if os.getppid() != cfg["parent"]:
        return
    lim = cfg["limits"]
    root = os.geteuid() == 0
    status = {"isolation": []}

    def report(**kw):
        status.update(kw)
        os.write(status_fd, json.dumps(status).encode())

    os.umask(0o022)
    workdir = cfg["workdir"]
    ns = _namespaces(root) if cfg["namespaces"] else set()
    uid = gid = None
    if root and cfg["drop_uid"]:
        uid = gid = cfg["uid_base"] + os.getpid()
    try:
        if "mount" in ns:
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            owner = f",uid={uid},gid={gid}" if uid is not None else ""
            _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
                   f"mode=0700,size={lim['disk_mb']}m{owner}")
        for name, text in cfg["files"].items():
            path = os.path.join(workdir, name)
            _write(path, text)
        if uid is not None:
            os.chown(workdir, uid, gid)
            os.chmod(workdir, 0o700)
        os.chdir(workdir)
        if "mount" in ns:
            SCRATCH_SIZE[0] = f"{lim['disk_mb']}m"
            _mask([*cfg["expose"], workdir], ("/tmp", "/var/tmp", "/dev/shm"))
    except OSError as e:
        report(error=f"sandbox setup failed: {e}")
        return
    status["isolation"] = sorted(ns) + (["uid"] if uid is not None else [])
    status["uid"] = uid if uid is not None else os.getuid()

    if "pid" not in ns:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    errr, errw = os.pipe2(os.O_CLOEXEC)  # the program's setup error, if any; EOF once it execs
    resr, resw = os.pipe2(os.O_CLOEXEC)  # init -> launcher: the program's wait status and CPU time
    launcher = os.getpid()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _init(cfg, lim, ns, uid, gid, launcher, errr, errw, resr, resw)
    os.close(errw)
    os.close(resw)
    timed_out = []

    def on_alarm(signum, frame):
        timed_out.append(True)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    def on_term(signum, frame):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.setitimer(signal.ITIMER_REAL, lim["wall_s"])
    with os.fdopen(errr, "rb") as f:
        setup_error = f.read().decode(errors="replace")
    with os.fdopen(resr, "rb") as f:
        res = f.read()
    os.wait4(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    wall = time.monotonic() - t0
    if "pid" not in ns:
        _reap_all(uid)
    if setup_error:
        report(error=f"sandbox setup failed: {setup_error}")
        return
    if timed_out or not res:  # init was killed (timer): the program with it
        report(exit_code=None, signal=signal.SIGKILL, cpu_s=0.0, wall_s=wall, timed_out=bool(timed_out))
        return
    wstatus, cpu = json.loads(res)
    report(
        exit_code=os.waitstatus_to_exitcode(wstatus) if os.WIFEXITED(wstatus) else None,
        signal=os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None,
        cpu_s=cpu,
        wall_s=wall,
        timed_out=False,
    )


main()
