"""The sandbox (denser/sandbox, docs/sandbox.md): programs a model could write, run as attacks.

Each attack must end with reward 0 (or the program's true score), one line of feedback, this process
alive, no process left behind, nothing written outside the program's directory, the secret unread and no
faked pass. Containment is asserted wherever ``capabilities()`` reports the isolation the docs promise,
and ``test_capabilities_are_what_the_machine_allows`` checks that the probe does not under-report.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from denser.sandbox import (
    Limits,
    Program,
    TestCase,
    capabilities,
    outputs_equal,
    run_function_tests,
    run_io_tests,
    run_program,
    run_programs,
    values_equal,
)
from denser.sandbox.runner import UID_BASE

ROOT = Path(__file__).resolve().parents[1]
FAST = Limits(cpu_s=1, wall_s=3)
ADD_TESTS = [TestCase([1, 2], 3), TestCase([0, 0], 0), TestCase([5, 5], 10), TestCase([-1, 4], 3)]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")


def _proc_stat(pid: str) -> tuple[int, int] | None:
    """(ppid, uid) of a process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[1]), uid


def _leftovers() -> list[int]:
    """Processes of a sandbox user id, and descendants of this process (the pytest process)."""
    procs = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _proc_stat(p)) is not None}
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - mine
        mine |= frontier
    sandboxed = {pid for pid, (_, uid) in procs.items() if uid >= UID_BASE}
    return sorted(mine | sandboxed)


def _no_leftovers() -> None:
    for _ in range(50):  # a killed process may take a moment to be reaped by its parent
        if not _leftovers():
            return
        time.sleep(0.05)
    pytest.fail(f"processes left behind: {_leftovers()}")


@pytest.fixture(autouse=True)
def sandbox_tmp(monkeypatch):
    """Each test's working directories go to a folder of its own under /tmp (``TMPDIR``, which the
    sandbox's ``mkdtemp`` and any worker or caller process follow; traversable by the sandbox's user id,
    as /tmp is), so another run on the machine that uses the sandbox at the same time cannot make a
    directory look left behind; after the test it must be empty."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="denser-sandbox-test-", dir="/tmp"))
    root.chmod(0o755)
    monkeypatch.setenv("TMPDIR", str(root))
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    try:
        yield root
        _no_leftovers()
        left = sorted(p.name for p in root.glob("denser-sandbox-*"))
        assert not left, f"a working directory was not deleted: {left}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _one_line(feedback: str | None) -> str:
    assert feedback, "a failing program gets feedback"
    assert "\n" not in feedback and len(feedback) <= 800, feedback
    return feedback


# ---------------------------------------------------------------- basic behaviour


def test_runs_a_program_with_stdin_and_reports_its_end():
    r = run_program("print(input()[::-1])", stdin="abc\n", limits=FAST)
    assert (r.status, r.stdout, r.exit_code, r.timed_out) == ("ok", "cba\n", 0, False)
    r = run_program("import sys\nprint('x', file=sys.stderr)\nsys.exit(3)", limits=FAST)
    assert (r.status, r.exit_code, r.stderr) == ("error", 3, "x\n")
    r = run_program("raise ValueError('bad input')", limits=FAST)
    assert r.status == "error" and r.describe() == "ValueError: bad input"


def test_environment_and_directory_are_fresh():
    src = "import os, json; print(json.dumps([dict(os.environ), os.listdir('.')]))"
    import json

    env, listing = json.loads(run_program(src, limits=FAST).stdout)
    assert sorted(listing) == ["main.py"]
    assert sorted(env) == sorted(["PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
                                  "PYTHONIOENCODING", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"])
    assert env["PYTHONHASHSEED"] == "0" and Path(env["HOME"]).name.startswith("denser-sandbox-")


def test_function_tests_score_and_feedback():
    right = run_function_tests("def add(a, b):\n    return a + b", "add", ADD_TESTS, FAST)
    assert right.reward() == 1.0 and right.feedback() is None and right.all_passed
    half = run_function_tests("def add(a, b):\n    return a * b if a > 0 else a + b", "add", ADD_TESTS, FAST)
    assert [c.passed for c in half.cases] == [False, True, False, True]
    assert half.reward() == 0.5 and half.reward(all_or_nothing=True) == 0.0
    fb = _one_line(half.feedback())
    assert fb == "2 of 4 tests failed: add(1, 2) returned 2, expected 3; add(5, 5) returned 25, expected 10."
    err = run_function_tests("def add(a, b):\n    return a / b", "add", [TestCase([1, 0], 1)], FAST)
    assert _one_line(err.feedback()) == "1 of 1 tests failed: add(1, 0) raised ZeroDivisionError: division by zero."
    cls = run_function_tests("class Solution:\n    def add(self, a, b):\n        return a + b", "add", ADD_TESTS, FAST)
    assert cls.reward() == 1.0
    missing = run_function_tests("def sub(a, b):\n    return a - b", "add", ADD_TESTS, FAST)
    assert missing.reward() == 0.0 and "defines no function add" in _one_line(missing.feedback())
    tup = run_function_tests("def pair(a):\n    return (a, [a])", "pair", [TestCase([1], [1, [1]])], FAST)
    assert tup.reward() == 1.0


def test_values_and_outputs_compare_like_json_data():
    assert values_equal([1, 2.0], [1, 2]) and values_equal(0.1 + 0.2, 0.3)
    assert not values_equal(True, 1) and not values_equal("1", 1) and not values_equal([1], [1, 1])
    assert not values_equal({"a": 1}, {"a": 1, "b": 2})
    assert outputs_equal("3 \n4\n\n", "3\n4") and not outputs_equal("3\n5", "3\n4")


def test_io_tests_run_each_input():
    src = "a, b = map(int, input().split())\nprint(a + b)"
    rep = run_io_tests(src, [TestCase("1 2\n", "3\n"), TestCase("2 2\n", "5"), TestCase("", "0")], FAST, workers=2)
    assert [c.passed for c in rep.cases] == [True, False, False]
    assert rep.reward() == pytest.approx(1 / 3)
    fb = _one_line(rep.feedback())
    assert fb.startswith("2 of 3 tests failed: input '2 2\\n': expected output '5', got '4\\n'; input '':")


def test_pool_returns_results_in_order_and_deterministic():
    progs = [Program(f"import time\ntime.sleep({0.3 if i % 2 == 0 else 0})\nprint({i} * {i})", limits=FAST)
             for i in range(6)]
    first = run_programs(progs, workers=3)
    assert [r.stdout for r in first] == [f"{i * i}\n" for i in range(6)]
    assert [r.stdout for r in run_programs(progs, workers=1)] == [r.stdout for r in first]
    with pytest.raises(ValueError, match="workers"):
        run_programs(progs, workers=-1)


def test_bad_limits_are_refused_with_one_line():
    with pytest.raises(ValueError, match=r"Limits.cpu_s must be > 0"):
        Limits(cpu_s=0)
    with pytest.raises(ValueError, match="plain names"):
        run_program("pass", files={"../x.py": ""})
    with pytest.raises(ValueError, match="input must be the list of arguments"):
        run_function_tests("def f(x): return x", "f", [TestCase("abc", "abc")])


def test_capabilities_are_what_the_machine_allows():
    """The probe does not under-report: where the ``unshare`` command can make a namespace (as this
    process's user), the sandbox must have it in force too."""
    caps = capabilities()
    assert caps.error is None, caps.error
    assert len(caps.lines()) == 4
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("no unshare command to compare the probe with")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]

    def works(*flags: str) -> bool:
        return subprocess.run([exe, *user, *flags, "true"], capture_output=True, timeout=30).returncode == 0

    if works("--net"):
        assert caps.network
    if works("--pid", "--fork", "--mount", "--mount-proc"):
        assert caps.pid and caps.mount
    if os.geteuid() == 0:
        assert caps.uid, "started as root, the program must run as a user id of its own"


# ---------------------------------------------------------------- the attacks


def test_attack_infinite_loop():
    limits = Limits(cpu_s=1, wall_s=20)  # the CPU limit ends it, however loaded the machine is
    t0 = time.monotonic()
    rep = run_function_tests("def add(a, b):\n    while True:\n        pass", "add", ADD_TESTS, limits)
    assert time.monotonic() - t0 < limits.wall + 5
    assert rep.reward() == 0.0 and rep.result.status == "timeout" and rep.result.limit == "cpu"
    assert _one_line(rep.feedback()) == "Timed out after 1 s (in test 1 of 4); 4 of 4 tests failed."


def test_attack_fork_bomb():
    assert capabilities().uid or os.geteuid() != 0, "a fork bomb is only contained with RLIMIT_NPROC in force"
    probe = run_program(textwrap.dedent("""
        import os, time
        n = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            n += 1
        print(n)
    """), limits=Limits(cpu_s=1, wall_s=5, processes=8))
    assert probe.stdout.strip() == "7", probe  # the limit is in force before the bomb runs
    _no_leftovers()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    rep = run_function_tests(bomb + "def add(a, b):\n    return a + b\n", "add", ADD_TESTS, FAST)
    assert rep.reward() == 0.0 and rep.result.status == "timeout"
    _one_line(rep.feedback())


def test_attack_allocates_20_gb():
    rep = run_function_tests("def add(a, b):\n    x = bytearray(20 * 2**30)\n    return a + b", "add", ADD_TESTS, FAST)
    assert rep.reward() == 0.0
    assert "MemoryError" in _one_line(rep.feedback())


def test_attack_prints_1_gb():
    src = "import sys\nchunk = 'x' * (1 << 16)\nfor _ in range(1 << 14):\n    sys.stdout.write(chunk)\n"
    r = run_program(src, limits=FAST)
    assert r.status == "output_limit" and r.truncated and len(r.stdout) == FAST.output_bytes
    assert r.describe(FAST) == f"Output limit exceeded ({FAST.output_bytes} bytes)."
    rep = run_function_tests(src + "def add(a, b):\n    return a + b\n", "add", ADD_TESTS, FAST)
    assert rep.reward() == 0.0
    assert "Output limit exceeded" in _one_line(rep.feedback())


def test_attack_writes_outside_its_directory():
    tag = secrets.token_hex(6)
    targets = [ROOT / f"pwned-{tag}.txt", ROOT / "denser" / f"pwned-{tag}.py", Path(f"/tmp/pwned-{tag}"),
               Path(f"/var/tmp/pwned-{tag}"), Path(f"/dev/shm/pwned-{tag}")]
    src = textwrap.dedent(f"""
        import os
        done = []
        for path in {[str(t) for t in targets]!r} + [os.path.join(os.getcwd(), '..', 'pwned-{tag}')]:
            try:
                with open(path, 'w') as f:
                    f.write('pwned')
                done.append(path)
            except OSError:
                pass
        def add(a, b):
            return a + b
    """)
    rep = run_function_tests(src, "add", ADD_TESTS, FAST)
    assert rep.reward() == 1.0  # the true score: the function is right
    for t in [*targets, Path(f"/tmp/pwned-{tag}")]:
        assert not t.exists(), f"the program wrote {t}"
    assert not list(Path("/tmp").glob(f"pwned-{tag}*"))


def test_attack_reads_the_trainers_environment(monkeypatch):
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv("DENSER_TEST_SECRET", secret)
    src = textwrap.dedent(f"""
        import os, glob
        found = [os.environ.get('DENSER_TEST_SECRET', '')]
        for path in ['/proc/{os.getpid()}/environ', '/proc/1/environ'] + glob.glob('/proc/*/environ'):
            try:
                found.append(open(path, 'rb').read().decode(errors='replace'))
            except OSError:
                pass
        print('|'.join(found))
        def add(a, b):
            return '|'.join(found)
    """)
    rep = run_function_tests(src, "add", ADD_TESTS[:1], FAST)
    text = rep.result.stdout + rep.result.stderr + str(rep.cases[0].actual) + str(rep.feedback())
    assert secret not in text
    assert rep.reward() == 0.0


def test_attack_connects_to_a_loopback_socket():
    assert capabilities().network, "docs/sandbox.md claims no network where a network namespace works"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        src = textwrap.dedent(f"""
            import socket
            try:
                socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hello')
                print('connected')
            except OSError as e:
                print('refused', e)
            def add(a, b):
                return a + b
        """)
        rep = run_function_tests(src, "add", ADD_TESTS, FAST)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert "connected" not in rep.result.stdout and "refused" in rep.result.stdout
    assert rep.reward() == 1.0  # the true score


def test_attack_kills_its_parent():
    me = os.getpid()
    src = textwrap.dedent(f"""
        import os, signal
        for pid in (os.getppid(), {me}, 1, 0, -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        def add(a, b):
            return a + b
    """)
    rep = run_function_tests(src, "add", ADD_TESTS, FAST)
    assert os.getpid() == me  # still here
    assert rep.reward() == 0.0 and rep.result.status == "killed"
    assert _one_line(rep.feedback()) == "The program was killed by SIGKILL before the tests ran; 4 of 4 tests failed."


def test_attack_setsid_and_sleep_past_the_timeout():
    t0 = time.monotonic()
    rep = run_function_tests("import os, time\nos.setsid()\ntime.sleep(60)\n", "add", ADD_TESTS, FAST)
    assert time.monotonic() - t0 < FAST.wall + 5
    assert rep.reward() == 0.0 and rep.result.status == "timeout" and rep.result.limit == "wall"
    assert _one_line(rep.feedback()).startswith("Timed out after 3 s")
    # a child that leaves the session and outlives the program is killed with it
    escape = textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        def add(a, b):
            return a + b
    """)
    rep = run_function_tests(escape, "add", ADD_TESTS, FAST)
    assert rep.reward() == 1.0


def test_attack_deep_recursion():
    src = "import sys\nsys.setrecursionlimit(10**8)\ndef add(a, b):\n    return add(a, b) + 1\n"
    rep = run_function_tests(src, "add", ADD_TESTS, FAST)
    assert rep.reward() == 0.0
    _one_line(rep.feedback())
    plain = run_function_tests("def add(a, b):\n    return add(a, b)\n", "add", ADD_TESTS[:1], FAST)
    assert "RecursionError" in _one_line(plain.feedback())


def test_attack_exits_before_the_tests_run():
    for src in ("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b",
                "import os\nos._exit(0)\ndef add(a, b):\n    return a + b"):
        rep = run_function_tests(src, "add", ADD_TESTS, FAST)
        assert rep.reward() == 0.0 and not any(c.passed for c in rep.cases)
        assert _one_line(rep.feedback()).startswith("The program failed before the tests ran")


def test_attack_fakes_the_harness_comparison():
    """The program takes over the driver (its marker, os.write, print, json, __eq__) and reports
    every test as passed: none passes, because the comparison happens in the caller on data."""
    cheat = textwrap.dedent("""
        import builtins, json, os, sys
        frame = sys._getframe(1)
        marker = frame.f_globals.get('_marker', 'x')
        real_write = os.write
        for i in range(4):
            real_write(1, (marker + ' ' + json.dumps({'i': i, 'passed': True, 'value': 'expected'}) + '\\n').encode())
            real_write(1, (marker + ' ' + json.dumps({'i': i, 'value': i}) + '\\n').encode())
        os.write = lambda fd, data: len(data)
        json.dumps = lambda *a, **k: '{"i": 0, "passed": true}'
        builtins.isinstance = lambda *a: True
        class Yes:
            def __eq__(self, other):
                return True
        def add(a, b):
            return Yes()
    """)
    rep = run_function_tests(cheat, "add", ADD_TESTS, FAST)
    assert rep.reward() == 0.0 and not any(c.passed for c in rep.cases)
    _one_line(rep.feedback())
    # half right, and an always-equal object for the rest: exactly the true score (a program that breaks
    # the driver, as the one above does, can only lower its own score)
    half = textwrap.dedent("""
        class Yes:
            def __eq__(self, other):
                return True
        def add(a, b):
            return a + b if a > 0 else Yes()
    """)
    rep = run_function_tests(half, "add", ADD_TESTS, FAST)
    assert [c.passed for c in rep.cases] == [True, False, True, False]


# ---------------------------------------------------------------- without namespaces


def _system_python() -> str | None:
    for p in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(p) and os.stat(p).st_mode & 0o001 and not p.startswith(str(Path.home())):
            return p
    return None


@pytest.mark.skipif(os.geteuid() != 0 or _system_python() is None,
                    reason="the fallback drops to a user id only as root, and needs an interpreter that user can run")
def test_fallback_without_namespaces_still_reaps_and_limits():
    """Where unshare is refused: the launcher is a child subreaper and kills every process of the
    program's own user id, and RLIMIT_NPROC holds because that id is not root."""
    py = _system_python()
    src = textwrap.dedent("""
        import os, time
        n = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.setsid()
                time.sleep(60)
                os._exit(0)
            n += 1
        print(n)
    """)
    r = run_program(src, limits=Limits(cpu_s=1, wall_s=5, processes=8), namespaces=False, python=py)
    assert r.isolation == ("uid",) and r.stdout.strip() == "7", r
    _no_leftovers()
    r = run_program("import os, time\nos.setsid()\ntime.sleep(60)", limits=FAST, namespaces=False, python=py)
    assert r.status == "timeout"


def test_the_docs_example_runs_as_written():
    import re

    page = (ROOT / "docs" / "sandbox.md").read_text()
    block = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    exec(compile(block, "docs/sandbox.md", "exec"), {"__name__": "docs_example"})


def test_a_killed_caller_takes_its_programs_with_it(sandbox_tmp):
    """The trainer dies by SIGKILL mid-run: the launcher has PR_SET_PDEATHSIG, init has it too, so the
    program and what it started die with it (an empty working directory stays in the temporary folder)."""
    code = ("from denser.sandbox import Limits, run_program\n"
            "run_program('import os, time\\nif os.fork() == 0:\\n    os.setsid()\\ntime.sleep(60)', "
            "limits=Limits(cpu_s=1, wall_s=60))\n")
    caller = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        for _ in range(200):  # until both of the program's processes run
            if len([p for p in _leftovers() if _proc_stat(str(p)) and _proc_stat(str(p))[1] >= UID_BASE]) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the program never started")
    finally:
        caller.kill()
        caller.wait()
    _no_leftovers()
    for path in sandbox_tmp.glob("denser-sandbox-*"):
        shutil.rmtree(path)


def test_bench_sandbox_runs_and_writes_its_results(tmp_path, capsys):
    from denser import bench

    assert bench.main(["sandbox", "--n", "2", "--workers", "2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sandbox overhead per program" in out and "| sleep 0.2 s |" in out
    import json

    res = json.loads(next(tmp_path.glob("sandbox-*.json")).read_text())
    assert [r["program"] for r in res["rows"]] == ["pass", "cpu 0.2 s", "sleep 0.2 s"]
    assert res["workers"] == 2 and res["bare_python_s"] > 0 and len(list(tmp_path.glob("sandbox-*.md"))) == 1
