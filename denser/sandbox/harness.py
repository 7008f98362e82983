"""Unit tests for untrusted programs: function calls and stdin/stdout, scored in the caller.

    from denser.sandbox import TestCase, run_function_tests
    report = run_function_tests(source, "add", [TestCase([1, 2], 3), TestCase([0, 0], 0)])
    report.reward(), report.feedback()    # (0.5, "1 of 2 tests failed: add(1, 2) returned 4, expected 3.")

**Function calls.** The program and a small driver (``_DRIVER``) run in one sandboxed process: the
driver gets only the tests' *inputs* (and a random marker) on stdin, executes the program, calls the
function on each input, and prints each return value as JSON on a line behind the marker. The expected
values never leave the caller, and the comparison happens here, on data parsed from the program's
output: a program that patches the driver, ``print``, ``json`` or ``__eq__`` can change what it
reports, but it can only make a test pass by printing the expected value, which it is never shown.
A test with no result, or with two different results, fails.

**stdin/stdout.** Each test is one run of the program with the test's input on stdin; its output
must equal the expected output up to trailing whitespace on each line and trailing blank lines.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

from denser.sandbox.runner import Limits, Program, Result, last_error_line, run_program, run_programs

_DRIVER = r'''
import json, os, sys
_cfg = json.loads(sys.stdin.read())
_marker = _cfg["marker"]
def _emit(obj):
    try:
        text = json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps({"i": obj["i"], "repr": repr(obj.get("value"))[:500]})
    os.write(1, ("\n" + _marker + " " + text + "\n").encode())
_ns = {"__name__": "solution", "__builtins__": __builtins__}
with open("solution.py") as _f:
    _src = _f.read()
try:
    exec(compile(_src, "solution.py", "exec"), _ns)
except BaseException as _e:
    _emit({"i": -1, "error": type(_e).__name__ + ": " + str(_e)[:300]})
    raise SystemExit(1)
_fn = _ns.get(_cfg["function"])
if _fn is None and isinstance(_ns.get("Solution"), type):
    _fn = getattr(_ns["Solution"](), _cfg["function"], None)
if not callable(_fn):
    _emit({"i": -1, "error": "the program defines no function " + _cfg["function"]})
    raise SystemExit(1)
_emit({"i": -2, "loaded": True})
for _i, _args in enumerate(_cfg["inputs"]):
    try:
        _v = _fn(*_args)
    except BaseException as _e:
        _emit({"i": _i, "error": type(_e).__name__ + ": " + str(_e)[:300]})
        continue
    _emit({"i": _i, "value": _v})
'''


@dataclass(frozen=True)
class TestCase:
    """One unit test.

    Attributes:
        input: function calls: the positional arguments (a list); stdin/stdout: the program's input text.
        expected: function calls: the return value (JSON data: tuples compare as lists); stdin/stdout:
            the expected output text.
    """

    __test__ = False  # not a pytest class

    input: Any
    expected: Any


@dataclass(frozen=True)
class CaseResult:
    """One test's outcome: ``actual`` is what the program returned or printed (None if nothing),
    ``error`` the exception it raised or why the test has no result."""

    input: Any
    expected: Any
    actual: Any
    passed: bool
    error: str | None = None


@dataclass(frozen=True)
class TestReport:
    """The outcome of a program's tests: each test's result, and the run(s) behind them."""

    __test__ = False

    cases: tuple[CaseResult, ...]
    result: Result
    function: str | None = None
    limits: Limits | None = None
    load_error: str | None = None
    loaded: bool = True

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def total(self) -> int:
        return len(self.cases)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total

    def reward(self, all_or_nothing: bool = False) -> float:
        """The fraction of tests passed, or 1.0 only when all pass."""
        if self.total == 0:
            return 0.0
        if all_or_nothing:
            return 1.0 if self.all_passed else 0.0
        return self.passed / self.total

    def feedback(self, max_failures: int = 2) -> str | None:
        """One line for the teacher (SDPO's rich feedback): how the run ended when it did not finish,
        else up to ``max_failures`` failing tests with input, expected and actual output; None when all pass."""
        if self.all_passed:
            return None
        if self.load_error is not None:
            return _clip(f"The program failed before the tests ran: {self.load_error}", 400)
        failed = [c for c in self.cases if not c.passed]
        head = f"{len(failed)} of {self.total} tests failed"
        if self.result.status not in ("ok", "error"):
            end = self.result.describe(self.limits)[:-1]
            if not self.loaded:
                return f"{end} before the tests ran; {head}."
            first = next((i for i, c in enumerate(self.cases) if not c.passed), 0)
            return f"{end} (in test {first + 1} of {self.total}); {head}."
        shown = [self._describe(c) for c in failed[:max_failures]]
        return _clip(f"{head}: " + "; ".join(shown) + ".", 800)

    def _describe(self, c: CaseResult) -> str:
        if self.function is not None:
            call = f"{self.function}({', '.join(_short(a) for a in c.input)})"
            if c.error is not None:
                return f"{call} raised {_clip(c.error, 200)}"
            return f"{call} returned {_short(c.actual)}, expected {_short(c.expected)}"
        if c.error is not None:
            return f"input {_short(c.input)}: {_clip(c.error, 200)}"
        return f"input {_short(c.input)}: expected output {_short(c.expected)}, got {_short(c.actual)}"


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _short(value: Any, n: int = 120) -> str:
    return _clip(repr(value), n)


def _normalise(value: Any) -> Any:
    """Expected values as the program's JSON output will read (tuples -> lists)."""
    return json.loads(json.dumps(value))


def values_equal(actual: Any, expected: Any) -> bool:
    """JSON data equality, with floats equal to 1e-9 relative (and an int equal to the same float)."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        if isinstance(expected, int) and isinstance(actual, int):
            return actual == expected
        return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(actual) == len(expected) and all(values_equal(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(values_equal(actual[k], expected[k]) for k in expected)
    return type(actual) is type(expected) and actual == expected


def _parse_results(stdout: str, marker: str) -> tuple[dict[int, dict], set[int]]:
    found: dict[int, dict] = {}
    dup: set[int] = set()
    prefix = marker + " "
    for line in stdout.splitlines():
        if not line.startswith(prefix):
            continue
        try:
            entry = json.loads(line[len(prefix):])
            i = entry["i"]
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
        if not isinstance(i, int) or isinstance(i, bool):
            continue
        if i in found and found[i] != entry:
            dup.add(i)
        found[i] = entry
    return found, dup


def run_function_tests(
    source: str,
    function: str,
    tests: Sequence[TestCase],
    limits: Limits | None = None,
    **options,
) -> TestReport:
    """Run ``function`` of the program ``source`` on each test's arguments in one sandboxed process and
    compare its return values with the expected ones here. ``options`` go to :func:`run_program`."""
    if not function.isidentifier():
        raise ValueError(f"function must be a Python name, got {function!r}")
    for i, t in enumerate(tests):
        if not isinstance(t.input, (list, tuple)):
            raise ValueError(f"function test {i}: input must be the list of arguments, got {type(t.input).__name__}")
    limits = limits or Limits()
    marker = "@@denser-result-" + secrets.token_hex(16)
    inputs = [list(t.input) for t in tests]
    stdin = json.dumps({"marker": marker, "function": function, "inputs": inputs})
    result = run_program(_DRIVER, stdin, limits, files={"solution.py": source}, **options)
    found, dup = _parse_results(result.stdout, marker)
    load = found.get(-1)
    load_error = load.get("error", "no result") if load is not None else None
    if load_error is None and not any(i in found for i in range(len(tests))):
        if result.status in ("ok", "error"):
            load_error = last_error_line(result.stderr) or "it exited before any test ran"
            if result.status == "ok":
                load_error = "it exited before any test ran"
    cases = []
    for i, t in enumerate(tests):
        entry = found.get(i)
        expected = _normalise(t.expected)
        if i in dup:
            cases.append(CaseResult(t.input, expected, None, False, "the program printed two different results"))
        elif entry is None:
            why = result.describe(limits) if result.status != "ok" else "no result"
            cases.append(CaseResult(t.input, expected, None, False, load_error or why or "no result"))
        elif "error" in entry:
            cases.append(CaseResult(t.input, expected, None, False, str(entry["error"])))
        elif "repr" in entry:
            cases.append(CaseResult(t.input, expected, str(entry["repr"]), False, None))
        else:
            actual = entry.get("value")
            try:
                ok = values_equal(actual, expected)
            except RecursionError:
                ok = False
            cases.append(CaseResult(t.input, expected, actual, ok, None))
    return TestReport(tuple(cases), result, function, limits, load_error, -2 in found)


def outputs_equal(actual: str, expected: str) -> bool:
    """stdout equality up to trailing whitespace on each line and trailing blank lines."""

    def norm(s: str) -> list[str]:
        lines = [ln.rstrip() for ln in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(actual) == norm(expected)


def run_io_tests(
    source: str,
    tests: Sequence[TestCase],
    limits: Limits | None = None,
    *,
    workers: int | None = None,
    **options,
) -> TestReport:
    """Run the program once per test with the test's input on stdin (in parallel, ``workers`` at a time)
    and compare its output with the expected output."""
    limits = limits or Limits()
    programs = [Program(source, str(t.input), limits) for t in tests]
    results = run_programs(programs, workers=workers, **options)
    cases = []
    worst = results[0] if results else Result("ok")
    for t, r in zip(tests, results):
        if r.status == "ok":
            cases.append(CaseResult(t.input, t.expected, r.stdout, outputs_equal(r.stdout, str(t.expected))))
        else:
            cases.append(CaseResult(t.input, t.expected, r.stdout or None, False, r.describe(limits)))
            if worst.status == "ok":
                worst = r
    return TestReport(tuple(cases), worst, None, limits, None)
