"""Built-in verifiable tasks, generated locally from a seed.

Every question ends with the answer-format instruction ``End with 'Answer: <...>'.`` and every
reward reads the final answer with :func:`denser.tasks.answers.extract_answer` (an ``Answer:``
line or ``\\boxed{}``; the last one wins). Rewards are 1.0 (right) or 0.0 (wrong), with a short
feedback text on failure that says what is wrong without giving the solution.

=================  =========================  ======================================================
name               skill                      example question
=================  =========================  ======================================================
``addition``       arithmetic (easy)          What is 3 + 12?
``arithmetic``     arithmetic (2-digit)       What is 47 - 18?
``compare``        number sense               Which is larger, 37 or 52?
``reverse``        string manipulation        Reverse the letters of 'cat'.
``count_letter``   string manipulation        How many times does 'r' appear in 'cherry'?
``format``         instruction following      Write 'apple' in capital letters.
``logic``          ordering puzzle            Ann is taller than Bob. Bob is taller than Cid. Who is the shortest?
``larger``         number sense               Which number is larger: 37 or 52?
``smaller``        number sense               Which number is smaller: 37 or 52?
``multiply``       arithmetic (times table)   What is 7 * 13?
``units``          unit conversion            How many minutes are in 3 hours?
``subtract``       arithmetic (easy)          What is 17 - 9?
=================  =========================  ======================================================

The last five are the continual-learning tasks: chosen by measuring the embedded
SmolLM2-135M-Instruct with the default 24-token budget so that each starts between about 20% and
80% accuracy, greedy and sampled (48 eval prompts; the numbers are in each class's docstring). A
135M model copies the worked example's shape closely: an example whose answer has fewer digits
than the task's answers ("Which is larger, 5 or 3? ... Answer: 5") makes it truncate two-digit
answers to one digit (``compare`` starts at 0.31 greedy for that reason), and an example reply
that does not fit the token budget makes it run out before the ``Answer:`` line. So these tasks'
examples have answers shaped like the task's and replies of at most a dozen tokens.
"""

from __future__ import annotations

import random
import re
from typing import Any

from denser.tasks.answers import extract_answer, normalize_text, numbers_equal, parse_number
from denser.tasks.base import Score, Task
from denser.tasks.registry import register_task

WORDS = (
    "cat dog sun hat cup pen box car bus map bag egg ice jam key leg net owl pig rat toy van web "
    "yak zip ant bee cow fox hen bird fish frog lion bear duck goat wolf deer seal crab moth swan "
    "tree leaf rose lily fern moss seed root bark wood rain snow wind star moon lake sand rock hill "
    "book desk door lamp sofa bowl fork dish sock shoe coat ring bell drum flag kite ship boat road "
    "apple lemon mango melon peach grape berry bread honey sugar salt milk cake soup rice corn bean "
    "plant river cloud storm light stone grass water ocean beach table chair clock spoon plate glass "
    "house train truck horse tiger zebra camel sheep mouse snake eagle whale shark robin otter panda "
    "green black white brown happy quick quiet smart brave sweet music paper pencil garden window "
    "rabbit turtle monkey donkey parrot silver orange purple yellow winter summer spring autumn"
).split()

NAMES = (
    "Ann Bob Cid Dan Eve Fay Gus Hal Ivy Jon Kim Leo Max Ned Oli Pam Quinn Ray Sam Tom Uma Val Wes Zoe"
).split()


def _instr(what: str) -> str:
    return f"End with 'Answer: <{what}>'."


def _check_number(completion: str, expected: float, *, unit: str = "number") -> Score:
    got_text = extract_answer(completion)
    if got_text is None:
        return Score(0.0, Task.no_answer_feedback(unit), None)
    got = parse_number(got_text)
    if got is None:
        return Score(0.0, f"Your answer '{got_text[:40]}' is not a single {unit}.", got_text)
    if numbers_equal(got, expected):
        return Score(1.0, None, got_text)
    direction = "too high" if got > expected else "too low"
    return Score(0.0, f"Your answer {_fmt(got)} is wrong: it is {direction}.", got_text)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class ArithmeticTask(Task):
    """``a op b`` with operands drawn uniformly from ``[low, high]`` and ``op`` from ``ops``."""

    ops: tuple[str, ...] = ("+",)
    low: int = 1
    high: int = 9

    def __init__(self, *, ops: str | None = None, low: int | None = None, high: int | None = None, **kw: Any):
        super().__init__(**kw)
        if ops is not None:
            self.ops = tuple(ops)
        if low is not None:
            self.low = int(low)
        if high is not None:
            self.high = int(high)
        bad = set(self.ops) - {"+", "-", "*"}
        if bad or self.low > self.high:
            raise ValueError(f"task {self.name}: ops must be from '+-*' and low <= high")

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        op = rng.choice(self.ops)
        a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
        if op == "-" and b > a:
            a, b = b, a  # non-negative results
        value = a + b if op == "+" else a - b if op == "-" else a * b
        sym = {"+": "+", "-": "-", "*": "*"}[op]
        return {"question": f"What is {a} {sym} {b}? {_instr('number')}", "answer": str(value)}

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        return _check_number(completion, float(row["answer"]))


@register_task("addition", "addition of two numbers from 1 to 14; the default task")
class Addition(ArithmeticTask):
    """The default task, tuned on the embedded SmolLM2-135M-Instruct (16 train prompts x 8 samples,
    temperature 1): operands 1-9 gave 55% success and 85% greedy eval accuracy (little left to
    learn); 1-19 gave 27% with 7 of 16 groups never succeeding; 1-14 (this task, 48 new tokens)
    gives 49% sampled success, 15 of 16 groups succeeding at least once and none always, and 66%
    greedy accuracy on the 50 eval problems; 22% of samples (43% of failures) lack the ``Answer:`` line,
    which a short run can fix."""

    description = "addition of two numbers from 1 to 14; the default task"
    examples = ((f"What is 20 + 5? {_instr('number')}", "20 + 5 = 25\nAnswer: 25"),)  # outside 1-14
    ops = ("+",)
    low, high = 1, 14
    default_num_eval = 50  # 196 distinct problems: 50 held out, 146 for training
    suggested_max_new_tokens = 32


@register_task("arithmetic", "two-digit addition, subtraction and multiplication")
class Arithmetic(ArithmeticTask):
    description = "two-digit addition, subtraction and multiplication"
    examples = ((f"What is 7 * 3? {_instr('number')}", "7 * 3 = 21\nAnswer: 21"),)
    ops = ("+", "-", "*")
    low, high = 10, 99


def _check_pick(task: Task, completion: str, row: dict[str, Any], wrong_end: str) -> Score:
    """Score a choice between ``row["answer"]`` and ``row["other"]``; picking the other gets feedback
    naming it the ``wrong_end`` of the two."""
    got_text = extract_answer(completion)
    if got_text is None:
        return Score(0.0, task.no_answer_feedback("number"), None)
    got = parse_number(got_text)
    if got is not None and numbers_equal(got, float(row["answer"])):
        return Score(1.0, None, got_text)
    if got is not None and numbers_equal(got, float(row["other"])):
        return Score(0.0, f"{_fmt(got)} is the {wrong_end} of the two numbers.", got_text)
    return Score(0.0, f"Your answer '{got_text[:40]}' is not one of the two numbers.", got_text)


@register_task("compare", "which of two numbers (10-99) is larger")
class Compare(Task):
    description = "which of two numbers (10-99) is larger"
    examples = ((f"Which is larger, 5 or 3? {_instr('number')}", "5 is larger than 3.\nAnswer: 5"),)
    suggested_max_new_tokens = 32

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        a, b = rng.sample(range(10, 100), 2)
        return {"question": f"Which is larger, {a} or {b}? {_instr('number')}", "answer": str(max(a, b)),
                "other": str(min(a, b))}

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        return _check_pick(self, completion, row, wrong_end="smaller")


@register_task("reverse", "reverse the letters of a short word")
class Reverse(Task):
    description = "reverse the letters of a short word"
    examples = ((f"Reverse the letters of the word 'lid'. {_instr('word')}", "l-i-d backwards is d-i-l.\nAnswer: dil"),)
    default_num_eval = 40  # the word list has ~190 words

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        word = rng.choice(WORDS)
        return {"question": f"Reverse the letters of the word '{word}'. {_instr('word')}", "answer": word[::-1],
                "word": word}

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        got_text = extract_answer(completion)
        if got_text is None:
            return Score(0.0, self.no_answer_feedback("word"), None)
        got, want, word = normalize_text(got_text), row["answer"], row["word"]
        got = got.replace(" ", "").replace("-", "")  # "t a c" and "t-a-c" are lenient spellings of "tac"
        if got == want:
            return Score(1.0, None, got_text)
        if got == word:
            return Score(0.0, "That is the word unchanged, not reversed.", got_text)
        if len(got) != len(want):
            return Score(0.0, f"Wrong length: the reversed word has {len(want)} letters, yours has {len(got)}.",
                         got_text)
        if sorted(got) == sorted(want):
            return Score(0.0, "Right letters, wrong order.", got_text)
        return Score(0.0, f"Wrong letters: the reversed word uses exactly the letters of '{word}'.", got_text)


@register_task("count_letter", "count how often a letter occurs in a word")
class CountLetter(Task):
    description = "count how often a letter occurs in a word"
    examples = ((f"How many times does the letter 'o' appear in 'potato'? {_instr('number')}",
                 "p-o-t-a-t-o has two o's.\nAnswer: 2"),)
    default_num_eval = 60

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        word = rng.choice(WORDS)
        letter = rng.choice(sorted(set(word)))
        return {"question": f"How many times does the letter '{letter}' appear in '{word}'? {_instr('number')}",
                "answer": str(word.count(letter))}

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        return _check_number(completion, float(row["answer"]))


_FORMATS = {
    "upper": ("Write the word '{w}' in capital letters.", lambda w: w.upper()),
    "dashes": ("Spell the word '{w}' with a dash between letters, like c-a-t.", lambda w: "-".join(w)),
    "brackets": ("Write the word '{w}' inside square brackets, like [cat].", lambda w: f"[{w}]"),
}


@register_task("format", "instruction following: rewrite a word in a requested format")
class Format(Task):
    description = "instruction following: rewrite a word in a requested format"
    examples = ((f"Write the word 'pot' inside round brackets, like (cat). {_instr('text')}", "Answer: (pot)"),)
    default_num_eval = 60

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        word = rng.choice(WORDS)
        kind = rng.choice(sorted(_FORMATS))
        template, render = _FORMATS[kind]
        return {"question": f"{template.format(w=word)} {_instr('text')}", "answer": render(word),
                "word": word, "kind": kind}

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        got_text = extract_answer(completion)
        if got_text is None:
            return Score(0.0, self.no_answer_feedback("text"), None)
        got = got_text.strip()
        want, word, kind = row["answer"], row["word"], row["kind"]
        if got == want:
            return Score(1.0, None, got_text)
        bare = re.sub(r"[^\w]|_", "", got)  # the letters, without any decoration
        if bare.lower() != word:
            return Score(0.0, f"The answer must be the word '{word}' itself, rewritten.", got_text)
        if kind == "upper":
            return Score(0.0, "Not all letters are capital letters.", got_text)
        if kind == "dashes":
            return Score(0.0, "Letters must be lower case with exactly one dash between each pair, like c-a-t.",
                         got_text)
        return Score(0.0, "The lower-case word must be wrapped in square brackets and nothing else, like [cat].",
                     got_text)


@register_task("logic", "three-person ordering puzzle (who is tallest/shortest)")
class Logic(Task):
    description = "three-person ordering puzzle (who is tallest/shortest)"
    examples = ((f"Ada is older than Ben. Ben is older than Cy. Who is the oldest? {_instr('name')}",
                 "Ada is older than Ben, and Ben is older than Cy.\nAnswer: Ada"),)

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        people = rng.sample(NAMES, 3)  # tallest first
        facts = [f"{people[0]} is taller than {people[1]}.", f"{people[1]} is taller than {people[2]}."]
        rng.shuffle(facts)
        ask = rng.choice(("tallest", "shortest"))
        answer = people[0] if ask == "tallest" else people[2]
        return {"question": f"{' '.join(facts)} Who is the {ask}? {_instr('name')}", "answer": answer,
                "people": " ".join(people), "ask": ask}

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        got_text = extract_answer(completion)
        if got_text is None:
            return Score(0.0, self.no_answer_feedback("name"), None)
        people = row["people"].split()
        got = normalize_text(got_text)
        words = set(re.findall(r"[^\W\d_]+", got))
        named = [p for p in people if p.casefold() in words]
        if len(named) == 1 and named[0] == row["answer"]:
            return Score(1.0, None, got_text)
        if len(named) != 1:
            return Score(0.0, f"Name exactly one of {', '.join(sorted(people))}.", got_text)
        name = named[0]
        i = people.index(name)
        if row["ask"] == "tallest":
            return Score(0.0, f"{name} is not the tallest: {people[i - 1]} is taller than {name}.", got_text)
        return Score(0.0, f"{name} is not the shortest: {name} is taller than {people[i + 1]}.", got_text)


# ------------------------------------------------------------------------------------------------
# continual-learning tasks: each starts between about 20% and 80% on the embedded model


class _PickNumber(Task):
    """Pick one of two distinct numbers from 10 to 99 (``larger`` / ``smaller``)."""

    word: str = "larger"
    #: the worked example's pair, kept out of the problem space
    example_pair: tuple[int, int] = (47, 74)
    default_num_eval = 48
    suggested_max_new_tokens = 24

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        while True:
            a, b = rng.sample(range(10, 100), 2)
            if {a, b} != set(self.example_pair):
                break
        pick, other = (max(a, b), min(a, b)) if self.word == "larger" else (min(a, b), max(a, b))
        return {"question": f"Which number is {self.word}: {a} or {b}? {_instr('number')}", "answer": str(pick),
                "other": str(other)}

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        return _check_pick(self, completion, row, wrong_end="smaller" if self.word == "larger" else "larger")


@register_task("larger", "which of two numbers (10-99) is larger, two-digit worked example")
class Larger(_PickNumber):
    """``compare`` with a prompt the embedded model follows: its one-digit example ("5 or 3 ...
    Answer: 5") made the model answer one digit (0.31 greedy, most failures a truncated number);
    a two-digit example pair outside the problem space and a bare ``Answer:`` reply start it at
    0.56 greedy and 0.50 sampled (mean@4, temperature 0.6, top-p 0.95) on the 48 eval prompts (a
    reply "74 is larger than 47." before the answer: 0.38). The start is a position habit, not a
    comparison: greedy, the model names the second number 39 times in 48 (the example's answer is
    the second), so training has to teach the comparison itself."""

    description = "which of two numbers (10-99) is larger, two-digit worked example"
    word = "larger"
    examples = ((f"Which number is larger: 47 or 74? {_instr('number')}", "Answer: 74"),)


@register_task("smaller", "which of two numbers (10-99) is smaller")
class Smaller(_PickNumber):
    """The mirror of ``larger``: pairs from 10 to 99, the other choice; 0.52 greedy, 0.47 sampled
    (it names the first number 33 times in 48, the example's position). Trained after ``larger``
    it competes with it directly."""

    description = "which of two numbers (10-99) is smaller"
    word = "smaller"
    examples = ((f"Which number is smaller: 47 or 74? {_instr('number')}", "Answer: 47"),)


@register_task("multiply", "multiplication of two numbers from 3 to 19")
class Multiply(ArithmeticTask):
    """Times tables beyond 10: operands 3-19 (289 problems) start at 0.48 greedy and 0.42 sampled on
    the 48 eval prompts; operands 2-12 started at 0.79 (too easy), 2-15 at 0.67."""

    description = "multiplication of two numbers from 3 to 19"
    examples = ((f"What is 21 * 3? {_instr('number')}", "21 * 3 = 63\nAnswer: 63"),)  # outside 3-19
    ops = ("*",)
    low, high = 3, 19
    default_num_eval = 48
    suggested_max_new_tokens = 24


@register_task("subtract", "subtraction of two numbers from 1 to 19 (non-negative result)")
class Subtract(ArithmeticTask):
    """Addition's sibling: the embedded model writes ``12 - 1 = 12`` or leaves out the
    ``Answer:`` line (a third of the sampled replies); 0.33 greedy and 0.23 sampled on the 48 eval
    prompts (with a bare ``Answer: 20`` example reply: 0.12 greedy)."""

    description = "subtraction of two numbers from 1 to 19 (non-negative result)"
    examples = ((f"What is 25 - 5? {_instr('number')}", "25 - 5 = 20\nAnswer: 20"),)  # outside 1-19
    ops = ("-",)
    low, high = 1, 19
    default_num_eval = 48
    suggested_max_new_tokens = 24


#: (larger unit, smaller unit, how many smaller units make one larger unit)
UNIT_CONVERSIONS = (
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("weeks", "days", 7), ("days", "hours", 24),
    ("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("dozens", "eggs", 12), ("years", "months", 12),
)


@register_task("units", "unit conversion: how many minutes are in 3 hours")
class Units(Task):
    """Knowing a conversion factor and multiplying by it: 2-20 of eight everyday units (152
    problems). With the worked reply "3 * 100 = 300" it starts at 0.42 greedy and 0.35 sampled on
    the 48 eval prompts; with a reply in words ("3 dollars is 3 * 100 = 300 pennies.") it ran out of
    24 tokens before the answer (0.21)."""

    description = "unit conversion: how many minutes are in 3 hours"
    examples = ((f"How many pennies are in 3 dollars? {_instr('number')}", "3 * 100 = 300\nAnswer: 300"),)
    default_num_eval = 48
    suggested_max_new_tokens = 24

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        big, small, factor = rng.choice(UNIT_CONVERSIONS)
        n = rng.randint(2, 20)
        return {"question": f"How many {small} are in {n} {big}? {_instr('number')}", "answer": str(n * factor),
                "unit": small}

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        return _check_number(completion, float(row["answer"]), unit=f"number of {row['unit']}")
