"""bench/trl_loop.py's summary (the runs themselves need the embedded model and TRL: a benchmark, not a test)."""

import random

from bench.trl_loop import median_after_first, table


def test_the_table_is_the_median_after_the_warm_up_and_their_ratio():
    rng = random.Random()
    d = [rng.uniform(20, 30)] + [rng.uniform(2, 4) for _ in range(4)]  # a slow first step is left out
    t = [rng.uniform(20, 30)] + [rng.uniform(8, 12) for _ in range(5)]
    rows = [{"side": "denser", "objective": "grpo", "step_seconds": d},
            {"side": "trl", "objective": "grpo", "step_seconds": t},
            {"side": "denser", "objective": "sdpo", "step_seconds": d},
            {"side": "trl", "objective": "sdpo", "error": "ImportError: no trl"}]
    md, mt = sorted(d[1:])[1:3], sorted(t[1:])[2]  # 4 steps after the first: the mean of the middle two
    assert median_after_first(d) == sum(md) / 2 and median_after_first(t) == mt
    lines = table(rows).splitlines()
    grpo = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert grpo[:4] == ["grpo", f"{sum(md) / 2:.2f}", f"{mt:.2f}", f"{mt / (sum(md) / 2):.2f}x"]
    sdpo = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert sdpo[2:4] == ["-", "-"] and sdpo[5] == "failed: ImportError: no trl"


def test_denser_side_runs_the_sdpo_that_trl_side_runs():
    """The two sides' SDPO settings, read back from denser's resolved run: a flag dropped from
    DENSER_SDPO leaves denser's defaults (top-k + tail, feedback in the teacher context) and fails here."""
    from bench.trl_loop import LR, TRL_SDPO, denser_command
    from denser.cli.flags import parse_train_args

    cfg, obj = parse_train_args(denser_command("sdpo", 3, "/tmp/unused"))
    trl_mode = {"full_logits": "full"}[TRL_SDPO["distillation_mode"]]
    assert (obj.distill_mode, obj.alpha, obj.teacher) == (trl_mode, TRL_SDPO["distillation_alpha"],
                                                          TRL_SDPO["teacher_model_kind"])
    assert obj.include_feedback is False  # TRL's include_environment_feedback defaults to False
    assert (cfg.prompts_per_step, cfg.num_generations, cfg.max_new_tokens) == (1, 8, 32)
    assert cfg.lr == LR  # TRL's side gets learning_rate=LR
    _, grpo = parse_train_args(denser_command("grpo", 3, "/tmp/unused"))
    assert type(grpo).__name__ != type(obj).__name__


def test_trl_side_trains_on_the_prompts_denser_trains_on_in_its_order(tmp_path, monkeypatch):
    """TRL's dataset (read unshuffled) holds the prompts `denser train` asks its engine for at each step,
    in that order: recorded from a real run of the loop (its eval's prompts come two at a time, apart)."""
    from bench.trl_workload import trl_workload
    from denser.cli import main
    from denser.trainers.prompts import PromptSchedule

    asked: list[list[dict]] = []
    real = PromptSchedule.prompt_ids

    def spy(self, rows):
        asked.append([self.task.prompt(r) for r in rows])
        return real(self, rows)

    monkeypatch.setattr(PromptSchedule, "prompt_ids", spy)
    assert main(["train", "--objective", "grpo", "--model", "tiny", "--task", "addition", "--prompts-per-step", "1",
                 "--num-generations", "2", "--max-new-tokens", "4", "--steps", "3", "--eval-size", "2",
                 "--no-progress", "--output-dir", str(tmp_path / "run")]) == 0
    trained = [msgs for call in asked if len(call) == 1 for msgs in call]
    assert len(trained) == 3
    work = trl_workload("addition", n_prompts=3, prompts_per_step=1)
    assert list(work.dataset["prompt"]) == trained
    assert list(trl_workload("addition", n_prompts=3).dataset["prompt"]) != trained  # the task's own first rows differ


def test_equal_work_makes_every_completion_full_length_and_every_sdpo_sample_distilled(tmp_path, monkeypatch):
    """--equal-work's denser side, run on the tiny model: the addition task's prompts, every completion the
    whole budget (no EOS before it), every sample with a teacher; its flags are those of the real run."""
    import json

    from bench.trl_loop import EQUAL_WORK_PLUGIN, EQUAL_WORK_TASK, MAX_NEW, denser_command
    from denser.cli import main
    from denser.tasks import get_task

    flags = denser_command("sdpo", 2, str(tmp_path / "run"), equal_work=True)
    assert flags[flags.index("--min-new-tokens") + 1] == str(MAX_NEW) and EQUAL_WORK_TASK in flags
    tiny = [*flags, "--model", "tiny", "--max-new-tokens", "6", "--min-new-tokens", "6", "--eval-size", "2"]
    from denser.engines.hf import HFRolloutEngine

    asked: list[tuple[bool, int]] = []  # (sampled, min_new_tokens) of every generate call
    real = HFRolloutEngine.generate

    def spy(self, prompt_ids, params, **kw):
        asked.append((params.do_sample and params.num_generations > 1, params.min_new_tokens))
        return real(self, prompt_ids, params, **kw)

    monkeypatch.setattr(HFRolloutEngine, "generate", spy)
    assert main(["train", *tiny]) == 0
    # the training rollouts carry the minimum to the engine; the evaluations stop freely
    assert sorted(set(asked)) == [(False, 0), (True, 6)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time_s" in r]
    assert len(steps) == 2
    assert all(r["response_length"] == 6 and r["teacher_frac"] == 1.0 and r["reward_mean"] == 1.0 for r in steps)
    task, addition = get_task(EQUAL_WORK_TASK, seed=0), get_task("addition", seed=0)
    assert list(task.train["question"][:20]) == list(addition.train["question"][:20])
    assert EQUAL_WORK_PLUGIN.is_file()
