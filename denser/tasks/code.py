"""Code tasks: the reply is a Python program, scored by running hidden unit tests in the sandbox.

``code`` (built-in) asks for one small function (string, list and arithmetic functions a small model
can sometimes write), shows one call of it as an example, and keeps five other calls as hidden tests::

    Write a Python function `add_7(x)` that returns x plus 7. For example, add_7(3) returns 10.
    Reply with the function in a ```python code block.

The program is the reply's last fenced code block (or the whole reply when it has none). It runs in
:mod:`denser.sandbox`, never in the trainer: the tests' arguments go in, the return values come back as
data and are compared here. The reward is the fraction of tests passed (``all_or_nothing=True``: 1
only when all pass); the feedback, in SDPO's rich-feedback form, names up to two failing tests with
input, expected and actual value, or the error, or "Timed out after N s". ``score_batch`` runs a
batch's programs in parallel, ``workers`` at a time (default: the number of cores). A row may carry
its own ``cpu_s`` and ``memory_mb`` limits.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Callable

from denser.sandbox import Limits, TestCase, run_function_tests, run_io_tests
from denser.tasks.base import Score, Task
from denser.tasks.registry import register_task
from denser.tasks.rewards import register_reward

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)

WORDS = ("cat", "tree", "apple", "sun", "banana", "river", "stone", "moon", "kite", "lemon", "zebra", "otter",
         "garden", "paper", "cloud", "egg", "music", "tiger", "yellow", "book")
LETTERS = "abcdeilmnorst"
SUFFIXES = ("ing", "ed", "er", "s", "ly", "ful", "less", "ness")


def extract_program(reply: str) -> str:
    """The program in a reply: its last fenced code block, else the whole reply."""
    blocks = _FENCE.findall(reply)
    return (blocks[-1] if blocks else reply).strip("\n")


def _ints(rng: random.Random) -> list:
    return [rng.randint(-20, 60)]


def _word(rng: random.Random) -> list:
    return [rng.choice(WORDS)]


def _word_with(c: str) -> Callable[[random.Random], list]:
    """Words, some of them ending in an extra ``c``: the tests of a function about the letter ``c``
    then see words with it and words without (few of ``WORDS`` end in a given letter)."""
    return lambda rng: [rng.choice(WORDS) + (c if rng.random() < 0.4 else "")]


def _int_list(rng: random.Random) -> list:
    return [[rng.randint(-5, 30) for _ in range(rng.randint(1, 6))]]


def _families() -> list[tuple[str, str, str, Callable[..., Any], Callable[[random.Random], list]]]:
    """(function name, what it returns, its parameters, the reference, a generator of arguments)."""
    out = []
    for k in range(2, 31):
        out.append((f"add_{k}", f"x plus {k}", "x", lambda x, k=k: x + k, _ints))
    for k in range(2, 13):
        out.append((f"times_{k}", f"x multiplied by {k}", "x", lambda x, k=k: x * k, _ints))
        out.append((f"is_multiple_of_{k}", f"True if the integer n is a multiple of {k}, else False", "n",
                    lambda n, k=k: n % k == 0, _ints))
    for k in range(2, 6):
        out.append((f"repeat_{k}", f"the string s repeated {k} times", "s", lambda s, k=k: s * k, _word))
    for k in range(1, 7):
        out.append((f"first_{k}", f"the first {k} characters of the string s", "s", lambda s, k=k: s[:k], _word))
    for k in range(1, 5):
        out.append((f"last_{k}", f"a list of the last {k} items of the list xs (all of them if it is shorter)",
                    "xs", lambda xs, k=k: xs[-k:], _int_list))
    for k in range(0, 21, 2):
        out.append((f"count_above_{k}", f"how many numbers in the list xs are greater than {k}", "xs",
                    lambda xs, k=k: sum(1 for x in xs if x > k), _int_list))
    for c in LETTERS:
        out.append((f"count_{c}", f"how many times the letter '{c}' appears in the string s", "s",
                    lambda s, c=c: s.count(c), _word_with(c)))
        out.append((f"ends_with_{c}", f"True if the string s ends with '{c}', else False", "s",
                    lambda s, c=c: s.endswith(c), _word_with(c)))
        out.append((f"remove_{c}", f"the string s with every '{c}' removed", "s",
                    lambda s, c=c: s.replace(c, ""), _word_with(c)))
    for suf in SUFFIXES:
        out.append((f"add_{suf}", f"the string s followed by '{suf}'", "s", lambda s, suf=suf: s + suf, _word))
    out += [
        ("total", "the sum of the numbers in the list xs", "xs", sum, _int_list),
        ("largest", "the largest number in the list xs", "xs", max, _int_list),
        ("smallest", "the smallest number in the list xs", "xs", min, _int_list),
        ("reverse_list", "the list xs in reverse order", "xs", lambda xs: xs[::-1], _int_list),
        ("reverse_string", "the string s reversed", "s", lambda s: s[::-1], _word),
        ("shout", "the string s in capital letters", "s", str.upper, _word),
        ("length", "the number of characters in the string s", "s", len, _word),
        ("square", "x multiplied by itself", "x", lambda x: x * x, _ints),
        ("is_even", "True if the integer n is even, else False", "n", lambda n: n % 2 == 0, _ints),
        ("absolute", "the absolute value of x", "x", abs, _ints),
    ]
    return out


FAMILIES = _families()


def _call(name: str, args: list) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


@register_task("code", "write a small Python function; hidden unit tests run in the sandbox")
class CodeTask(Task):
    """Generated Python function problems (``FAMILIES``: about 140 functions) scored by hidden tests.

    Args (besides :class:`~denser.tasks.base.Task`'s):
        num_tests: hidden tests per problem.
        all_or_nothing: reward 1 only when every test passes (default: the fraction passed).
        workers: programs run at a time by :meth:`score_batch` (default: the number of cores; a run's
            ``--reward-workers`` overrides it).
        cpu_s, memory_mb: each program's limits (a row's ``cpu_s``/``memory_mb`` win).
    """

    description = "write a small Python function; hidden unit tests run in the sandbox"
    runs_programs = True
    examples = ((
        "Write a Python function `double_last(xs)` that returns the last item of the list xs times 2. "
        "For example, double_last([4, 1, 3]) returns 6.\nReply with the function in a ```python code block.",
        "```python\ndef double_last(xs):\n    return xs[-1] * 2\n```",
    ),)
    suggested_max_new_tokens = 96
    default_num_eval = 40

    def __init__(self, *, num_tests: int = 5, all_or_nothing: bool = False, workers: int | None = None,
                 cpu_s: float = 2.0, memory_mb: int = 512, **kw: Any):
        super().__init__(**kw)
        self.num_tests = int(num_tests)
        self.all_or_nothing = bool(all_or_nothing)
        self.reward_workers = int(workers) if workers is not None else None
        if self.num_tests < 1:
            raise ValueError(f"task code: num_tests must be >= 1, got {num_tests}")
        if self.reward_workers is not None and self.reward_workers < 1:
            raise ValueError(f"task code: workers must be >= 1, got {workers}")
        self.limits = Limits(cpu_s=float(cpu_s), memory_mb=int(memory_mb))

    def build_splits(self):
        """Every function once, in an order drawn from the seed: the first ``num_eval`` are eval, the
        next ``num_train`` train (so no function is in both); each with tests drawn from the seed."""
        from denser.tasks.base import _to_dataset

        rng = random.Random(f"denser:{self.name}:{self.seed}")
        order = list(range(len(FAMILIES)))
        rng.shuffle(order)
        if self.num_eval >= len(order):
            raise ValueError(f"task code: {len(order)} functions, not enough for {self.num_eval} eval rows "
                             "and a train split; lower num_eval")
        rows = [self.make_problem(random.Random(f"denser:{self.name}:{self.seed}:{i}"), FAMILIES[i]) for i in
                order[: self.num_eval + self.num_train]]
        return _to_dataset(rows[self.num_eval:]), _to_dataset(rows[: self.num_eval])

    def make_problem(self, rng: random.Random, family=None) -> dict[str, Any]:
        name, what, params, ref, gen = family or rng.choice(FAMILIES)
        # the example call depends on the function only: one function, one question
        example = gen(random.Random(f"denser:code-example:{name}"))
        calls: list[list] = []
        for _ in range(200):
            if len(calls) == self.num_tests:
                break
            args = gen(rng)
            if args != example and args not in calls:
                calls.append(args)
        # tests whose expected values are all equal are passed by a constant function (`return 0`):
        # the last test is redrawn until it expects something else (every function has such inputs)
        outputs = {json.dumps(ref(*args)) for args in calls}
        for _ in range(2000):
            if len(calls) < 2 or len(outputs) > 1:
                break
            args = gen(rng)
            if args != example and args not in calls and json.dumps(ref(*args)) not in outputs:
                calls[-1] = args
                outputs.add(json.dumps(ref(*args)))
        tests = [[args, ref(*args)] for args in calls]
        question = (f"Write a Python function `{name}({params})` that returns {what}. "
                    f"For example, {_call(name, example)} returns {ref(*example)!r}.\n"
                    "Reply with the function in a ```python code block.")
        return {"question": question, "answer": f"{name} = {what}", "function": name, "tests": json.dumps(tests)}

    def _limits(self, row: dict[str, Any]) -> Limits:
        cpu, mem = row.get("cpu_s"), row.get("memory_mb")
        if cpu is None and mem is None:
            return self.limits
        return Limits(cpu_s=float(cpu or self.limits.cpu_s), memory_mb=int(mem or self.limits.memory_mb))

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        program = extract_program(completion)
        if not program.strip():
            return Score(0.0, "No code found: reply with the function in a ```python code block.", None)
        tests = [TestCase(args, expected) for args, expected in json.loads(row["tests"])]
        report = run_function_tests(program, row["function"], tests, self._limits(row))
        summary = f"{report.passed}/{report.total} tests"
        return Score(report.reward(self.all_or_nothing), report.feedback(), summary)



# ---------------------------------------------------------------- your data: the `tests` reward


def _parse_tests(value: Any) -> list[dict[str, Any]]:
    """A row's tests in LiveCodeBench's public-test shape: a list (or its JSON text) of
    ``{"input", "output", "testtype"}`` with ``testtype`` ``stdin`` (input and expected output are texts)
    or ``functional`` (input: one JSON value per line, the arguments; output: the JSON return value)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            import ast

            try:
                value = ast.literal_eval(value)  # a list column read back as text by str()
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"tests are not JSON: {e}") from None
    if not isinstance(value, list) or not value:
        raise ValueError("tests must be a non-empty list of {input, output, testtype}")
    for i, t in enumerate(value):
        if not isinstance(t, dict) or not {"input", "output"} <= set(t):
            raise ValueError(f"test {i} must be an object with input and output (and testtype)")
        kind = t.get("testtype", "stdin")
        if kind not in ("stdin", "functional"):
            raise ValueError(f"test {i}: testtype must be 'stdin' or 'functional', got {kind!r}")
    kinds = {t.get("testtype", "stdin") for t in value}
    if len(kinds) > 1:
        raise ValueError("a row's tests must all have one testtype")
    return value


def _check_tests(answer: str) -> str | None:
    try:
        tests = _parse_tests(answer)
        if tests[0].get("testtype") == "functional":
            for t in tests:
                for line in str(t["input"]).splitlines():
                    json.loads(line)
                if isinstance(t["output"], str):
                    json.loads(t["output"])
    except ValueError as e:
        return f"reward 'tests': {e}"
    return None


def _function_name(row: dict[str, Any]) -> str | None:
    for key in ("function", "func_name", "fn_name"):
        if row.get(key):
            return str(row[key])
    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    if isinstance(meta, dict) and meta.get("func_name"):
        return str(meta["func_name"])
    return None


def _row_limits(row: dict[str, Any]) -> Limits:
    cpu = row.get("cpu_s", row.get("time_limit"))
    mem = row.get("memory_mb", row.get("memory_limit"))
    return Limits(cpu_s=float(cpu) if cpu else 2.0, memory_mb=int(mem) if mem else 512)


def _first(row: dict[str, Any], *keys: str) -> Any:
    return next((row[k] for k in keys if row.get(k) is not None), None)


@register_reward("tests", description="run the reply's program against the row's tests in the sandbox "
                 "(LiveCodeBench's stdin and functional shapes); the fraction passed",
                 check_answer=_check_tests)
def tests_reward(completion: str, row: dict[str, Any]) -> Score:
    """The fraction of the row's tests the reply's program passes; feedback as the ``code`` task's.

    The tests come from the row's ``tests`` (or ``public_test_cases``) column, else from its answer
    (``answer_column=tests``); functional tests call ``function``/``func_name`` (or ``metadata``'s
    ``func_name``); ``cpu_s``/``time_limit`` and ``memory_mb``/``memory_limit`` columns set the limits."""
    program = extract_program(completion)
    if not program.strip():
        return Score(0.0, "No code found: reply with the program in a ```python code block.", None)
    tests = _parse_tests(_first(row, "tests", "public_test_cases", "answer"))
    limits = _row_limits(row)
    if tests[0].get("testtype") == "functional":
        name = _function_name(row)
        if name is None:
            raise ValueError("reward 'tests': functional tests need a function, func_name or metadata.func_name column")
        cases = [TestCase([json.loads(line) for line in str(t["input"]).splitlines()],
                          json.loads(t["output"]) if isinstance(t["output"], str) else t["output"]) for t in tests]
        report = run_function_tests(program, name, cases, limits)
    else:
        report = run_io_tests(program, [TestCase(str(t["input"]), str(t["output"])) for t in tests], limits)
    return Score(report.reward(), report.feedback(), f"{report.passed}/{report.total} tests")
