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


def test_sdpo_templates_word_for_word():
    """The default context is SDPO's (actor.yaml, self_distillation): the last user message becomes
    reprompt_template with the solution and feedback sections; earlier messages are kept."""
    msgs = build(["A: 4", "A: 5"], [0.0, 1.0], ["off by one", None], 0, feedback_only_without_solution=False)
    assert msgs[:-1] == PROMPT[:-1] and msgs[-1]["role"] == "user" and len(msgs) == len(PROMPT)
    assert msgs[-1]["content"] == (
        "What is 2+3?"
        "\nCorrect solution:\n\nA: 5"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\noff by one"
        "\n\nCorrectly solve the original question.")
    only_feedback = build(["A: 4", "A: 6"], [0.0, 0.0], ["off by one", None], 0)
    assert only_feedback[-1]["content"] == ("What is 2+3?\nThe following is feedback from your unsuccessful earlier "
                                            "attempt:\n\noff by one\n\nCorrectly solve the original question.")


def test_templates_are_options_and_prompt_is_the_last_user_message():
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "a1"}, {"role": "user", "content": "second"}]
    spec = TeacherSpec(reprompt_template="[{prompt}|{solution}|{feedback}]", solution_template="sol={successful_previous_attempt}",
                       feedback_template="fb={feedback_raw}", feedback_only_without_solution=False)
    msgs = teacher_messages(conversation, ["x", "good"], [0.0, 1.0], ["bad", None], 0, spec)
    assert msgs[:3] == conversation[:3]  # every earlier message as it was
    assert msgs[3] == {"role": "user", "content": "[second|sol=good|fb=bad]"}
    assert conversation[3]["content"] == "second"


def test_options_reach_the_spec_and_bad_templates_fail():
    import pytest

    from denser.objectives import get_objective

    spec = get_objective("sdpo", reprompt_template="{prompt}!{solution}", include_feedback=False).teacher_spec()
    assert spec.reprompt_template == "{prompt}!{solution}" and not spec.include_feedback
    assert get_objective("hybrid_adv", feedback_template="F: {feedback_raw}").teacher_spec().feedback_template == "F: {feedback_raw}"
    with pytest.raises(ValueError, match="feedback_template uses the placeholder"):
        TeacherSpec(feedback_template="{feedback}")


def test_unopened_think_prefix_is_stripped_as_sdpo_cl():
    assert remove_thinking("reasoning without an opening tag</think>\nAnswer: 5") == "Answer: 5"
    assert remove_thinking("<think>a</think>b</think> Answer: 5") == "Answer: 5"
    assert remove_thinking("Answer: 5") == "Answer: 5"
    msgs = build(["x", "so 2+3=5</think>Answer: 5"], [0.0, 1.0], [None, None], 0)
    assert "so 2+3" not in msgs[-1]["content"] and msgs[-1]["content"].count("Answer: 5") == 1


def test_feedback_is_used_whenever_the_task_gave_it():
    """As SDPO's code: any non-empty feedback on the sample's own attempt, not only on failures
    (a multi-reward task may give a successful reply feedback on one of its rewards)."""
    msgs = build(["A: 5", "A: 5"], [1.0, 0.0], ["format: add the Answer line", None], 0)
    assert "format: add the Answer line" in msgs[-1]["content"]  # own success excluded, no sibling success
    assert build(["A: 4", "A: 6"], [0.0, 0.0], ["   ", None], 0) is None  # blank feedback is no feedback


# ------------------------------------------------------------------------- the context axis: 'prompt'


def test_prompt_context_is_the_prompt_unchanged_for_every_sample():
    """teacher_context='prompt': every sample's teacher reads the prompt as it is, with or without a
    successful sibling or feedback (the reprompt fields play no part)."""
    for i in range(3):
        msgs = build(["A: 4", "A: 5", "A: 6"], [0.0, 1.0, 0.0], ["wrong", None, None], i, teacher_context="prompt",
                     reprompt_template="never {prompt}")
        assert msgs == PROMPT and msgs is not PROMPT and msgs[0] is not PROMPT[0]
    assert build(["x", "y"], [0.0, 0.0], [None, None], 0, teacher_context="prompt") == PROMPT
    assert build(["x", "y"], [0.0, 0.0], [None, None], 0) is None  # reprompt: nothing to reprompt with


def test_teacher_context_is_validated_once_with_one_line():
    import pytest

    from denser.objectives import get_objective

    with pytest.raises(ValueError, match=r"^teacher: teacher_context='plain' must be one of 'reprompt', 'prompt'$"):
        TeacherSpec(teacher_context="plain")
    with pytest.raises(ValueError, match=r"^objective 'sdpo' field 'teacher_context' must be one of"):
        get_objective("sdpo", teacher_context="plain")
    assert TeacherSpec().teacher_context == "reprompt"
    assert get_objective("hybrid", teacher_context="prompt").teacher_spec().teacher_context == "prompt"


def _trainer(tmp_path, name, cfg=None, **objective):
    from test_train import ParityAddition

    from denser.objectives import get_objective
    from denser.trainers.config import TrainConfig
    from denser.trainers.loop import Trainer

    cfg = TrainConfig(model="tiny", steps=1, eval_size=2, max_new_tokens=6, num_generations=3, prompts_per_step=2,
                      micro_batch_size=3, progress=False, lr=1e-3, output_dir=str(tmp_path / name), **(cfg or {}))
    return Trainer(cfg, get_objective("sdpo", **objective), task=ParityAddition(), log=lambda m: None)


def test_loop_builds_prompt_contexts_for_every_sample(tmp_path):
    """The context builder (trainers/signals.py) honours teacher_context: 'prompt' gives each sample
    the token ids of its own prompt (as the prompt schedule renders them, independently), whole
    (--teacher-max-context-tokens cuts reprompts only), and a teacher for every sample; the same rollout under 'reprompt' gives longer contexts and a mask
    that follows the rewards. A live teacher on its own prompt is the student: the distillation
    loss is zero (up to float noise) on every token."""
    import torch

    from denser.trainers.scoring import score_rollout

    plain = _trainer(tmp_path, "plain", {"teacher_max_context_tokens": 8}, teacher="live", teacher_context="prompt",
                     distill_mode="full")
    sdpo = _trainer(tmp_path, "sdpo", teacher="live", include_feedback=False)
    rows = plain.prompts.rows_for_step(0)
    rollout = plain._rollout(rows)
    scores = score_rollout(plain.task, rollout, rows, plain.cfg)
    contexts, mask = plain.signals.teacher_contexts(rollout, rows, scores)
    prompt_ids = plain.prompts.prompt_ids(rows)
    g = rollout.num_generations
    assert contexts == [prompt_ids[s // g] for s in range(rollout.num_samples)]
    assert min(map(len, contexts)) > 8  # not cut
    assert mask.dtype == torch.bool and mask.all() and len(mask) == rollout.num_samples
    re_contexts, re_mask = sdpo.signals.teacher_contexts(rollout, rows, scores)
    rewards = [sc.score for sc in scores.scores]
    for s in range(rollout.num_samples):  # reprompt without feedback: a teacher iff a sibling succeeded
        p = s // g
        assert bool(re_mask[s]) == any(rewards[j] >= 0.5 for j in range(p * g, (p + 1) * g) if j != s)
        assert len(re_contexts[s]) > len(contexts[s]) if re_mask[s] else re_contexts[s] == contexts[s]
    row = plain.step(0)
    assert row["skipped"] == 0
    assert row["teacher_frac"] == 1.0 and abs(row["distill_loss"]) < 1e-5


def test_prompt_context_needs_nothing_of_the_task(tmp_path):
    """A task that gives no successes or feedback cannot feed SDPO's reprompt, but can the plain prompt."""
    import pytest
    from test_train import ParityAddition

    from denser.objectives import get_objective
    from denser.trainers.signals import check_signals

    class RewardsOnly(ParityAddition):
        provides = frozenset({"rewards", "advantages"})

    with pytest.raises(ValueError, match="needs signal 'teacher' but task"):
        check_signals(get_objective("sdpo"), RewardsOnly())
    check_signals(get_objective("sdpo", teacher_context="prompt"), RewardsOnly())
    check_signals(get_objective("hybrid_adv", teacher_context="prompt"), RewardsOnly())
