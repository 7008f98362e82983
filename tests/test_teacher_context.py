"""SDPO teacher contexts built from hand-made groups."""

from denser.objectives.teacher import TeacherSpec, remove_thinking, teacher_messages

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


def build(texts, rewards, feedback, i, **kw):
    return teacher_messages(PROMPT, texts, rewards, feedback, i, TeacherSpec(**kw))


def test_failed_sample_gets_first_successful_sibling():
    msgs = build(["A: 4", "A: 5", "A: 5 again"], [0.0, 1.0, 1.0], ["wrong sum", None, None], 0,
                 feedback_only_without_solution=True)
    user = msgs[-1]["content"]
    assert user.startswith("What is 2+3?")
    assert "A: 5" in user and "A: 5 again" not in user  # the first success only
    assert "wrong sum" not in user  # feedback only without a solution
    assert msgs[0] == PROMPT[0] and PROMPT[1]["content"] == "What is 2+3?"  # input not mutated


def test_self_success_is_excluded():
    # sample 1 is the only success: with self-exclusion it has no demonstration -> no teacher
    assert build(["x", "A: 5"], [0.0, 1.0], ["no", None], 1, dont_reprompt_on_self_success=True) is None
    msgs = build(["x", "A: 5"], [0.0, 1.0], ["no", None], 1, dont_reprompt_on_self_success=False)
    assert "A: 5" in msgs[-1]["content"]
    # with another success available, the successful sample learns from the sibling, not itself
    msgs = build(["mine", "theirs"], [1.0, 1.0], [None, None], 0)
    assert "theirs" in msgs[-1]["content"] and "mine" not in msgs[-1]["content"]


def test_thinking_removed_from_demonstration():
    assert remove_thinking("<think>long\nreasoning</think> Answer: 5") == "Answer: 5"
    msgs = build(["x", "<think>hmm 2+3</think>Answer: 5"], [0.0, 1.0], ["f", None], 0)
    assert "hmm" not in msgs[-1]["content"] and "Answer: 5" in msgs[-1]["content"]
    msgs = build(["x", "<think>hmm</think>Answer: 5"], [0.0, 1.0], ["f", None], 0, remove_thinking=False)
    assert "<think>hmm</think>" in msgs[-1]["content"]


def test_feedback_when_no_success_and_none_without_either():
    msgs = build(["A: 4", "A: 6"], [0.0, 0.0], ["off by one", "too large"], 1)
    assert "too large" in msgs[-1]["content"] and "off by one" not in msgs[-1]["content"]
    assert build(["A: 4", "A: 6"], [0.0, 0.0], ["f1", "f2"], 0, include_feedback=False) is None
    assert build(["A: 4", "A: 6"], [0.0, 0.0], [None, None], 0) is None  # no success, no feedback


def test_feedback_and_solution_together():
    msgs = build(["A: 4", "A: 5"], [0.0, 1.0], ["off by one", None], 0, feedback_only_without_solution=False)
    text = msgs[-1]["content"]
    assert "A: 5" in text and "off by one" in text
