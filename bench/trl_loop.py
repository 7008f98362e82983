"""The whole training step against TRL: seconds per step of `denser train` and of TRL's own
``GRPOTrainer`` / ``SDPOTrainer`` on the same model, prompts, reward and completion budget, generation
included (the step benchmark, ``denser.bench.step``, times the update alone).

    PYTHONPATH=. python -m bench.trl_loop                                   # grpo and sdpo, both sides, 6 steps
    PYTHONPATH=. python -m bench.trl_loop --objectives grpo --steps 3 --sides denser,trl

Workload (issue 26's comparison shape): the embedded SmolLM2-135M-Instruct in fp32 on the CPU, the
default task (``addition``, seed 0), one prompt x 8 completions a step, at most 32 new tokens, sampled at
temperature 1, one optimiser step per rollout, AdamW (fused on both sides) at learning rate 2e-5 on both
sides (TRL's own defaults differ per trainer: its SDPO at 5e-5 stopped finding correct answers after its
first update, so it distilled nothing after step 1), no gradient checkpointing.
SDPO on both sides: full-vocabulary JSD (alpha 0.5) from an EMA teacher, the teacher shown a successful
completion of the group and no feedback (TRL's defaults; denser's side passes ``DENSER_SDPO``, since its
own defaults are the top-100 tokens + tail and the task's feedback in the teacher context).

Each (side, objective) runs in its own process. A step's seconds are each side's own step boundaries:
denser's ``step_time_s`` (generation, signals, update), TRL's time from ``on_step_begin`` to
``on_step_end`` (generation, reward, loss, backward, optimiser step). The first step is a warm-up and
left out of the median. Both sides sample with transformers' ``generate``: TRL's on the prompt repeated 8
times, denser's ``hf`` engine with its default shared prefill (the prompt prefilled once). Seconds compare
only on a quiet machine, within one run.

Both sides train on the same prompts, step by step: TRL's dataset holds the prompts of denser's seeded
schedule for those steps, in its order, and TRL's shuffling is off. (Before 2026-12-06 each side drew
its own order, and the prompts differed in difficulty: the embedded model answers "What is 11 + 2?"
with 33 under either engine, so TRL's side had fewer successes and distilled less.) The samples still
differ (each side its own random stream), so an SDPO step with no successful completion distils
nothing on one side and may on the other. Each row keeps, per step, what it computed (``logged``:
reward, the fraction of samples with a teacher or of groups with a success, completion length) beside
its seconds, so a reader can see whether both sides did the same work.

``--equal-work`` takes the sampling out of the comparison: both sides hold every completion to the full
budget (denser's ``--min-new-tokens 32``, TRL's ``generation_kwargs={"min_new_tokens": 32}``: no EOS before
it) and score every completion 1.0 (``bench/equal_work.py``'s ``addition-all-pass`` task on denser's side, the
same constant reward on TRL's), so every step computes the same on both: 8 completions of 32 tokens, and
under SDPO every sample distilled from a teacher shown a sibling's completion (TRL's teacher forward runs
on every sample either way; denser's only on samples that have a teacher, which is then all of them). The
GRPO advantages are then all 0; both sides still run the whole forward and backward.

Results: ``<out-dir>/trl-loop-<tag>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "TRL_LOOP_RESULT "
PROMPTS, GROUP, MAX_NEW = 1, 8, 32
LR = 2e-5  # both sides (denser's default; TRL's SDPOConfig would take TrainingArguments' 5e-5, GRPOConfig 1e-6)
TASK = "addition"
EQUAL_WORK_PLUGIN = Path(__file__).resolve().parent / "equal_work.py"
EQUAL_WORK_TASK = "addition-all-pass"  # addition's prompts, every completion 1.0


# SDPO's settings on both sides: TRL's SDPOConfig fields and the denser flags that mean the same (full
# vocabulary, alpha 0.5, EMA teacher, the teacher shown a correct sibling only: TRL's default leaves the
# task's feedback out of the teacher context, denser's puts it in, so denser's side turns it off)
TRL_SDPO = dict(distillation_mode="full_logits", distillation_alpha=0.5, teacher_model_kind="ema")
DENSER_SDPO = ["--distill-mode", "full", "--alpha", "0.5", "--teacher", "ema", "--no-include-feedback"]


def denser_command(objective: str, steps: int, out_dir: str, equal_work: bool = False) -> list[str]:
    task = ["--import", str(EQUAL_WORK_PLUGIN), "--task", EQUAL_WORK_TASK, "--min-new-tokens", str(MAX_NEW)] \
        if equal_work else ["--task", TASK]
    return ["--objective", objective, "--model", "default", *task, "--prompts-per-step", str(PROMPTS),
            "--num-generations", str(GROUP), "--max-new-tokens", str(MAX_NEW), "--steps", str(steps),
            "--lr", str(LR), "--eval-size", "4", "--no-progress", "--output-dir", out_dir, "--overwrite",
            *(DENSER_SDPO if objective == "sdpo" else [])]


def denser_child(objective: str, steps: int, out_dir: str, equal_work: bool = False) -> dict:
    """`denser train` as a user runs it; the per-step seconds from its metrics.jsonl."""
    cmd = [sys.executable, "-m", "denser", "train", *denser_command(objective, steps, out_dir, equal_work)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in rows if "step_time_s" in r]
    # what each step computed besides its seconds (the reward, how many samples had a teacher)
    logged = [{k: v for k, v in r.items() if k in ("reward_mean", "teacher_frac", "response_length")} for r in steps_]
    return {"step_seconds": [r["step_time_s"] for r in steps_], "logged": logged, "command": " ".join(cmd[1:])}


def trl_child(objective: str, steps: int, out_dir: str, equal_work: bool = False) -> dict:
    """TRL's trainer at the same workload: the embedded model's safetensors directory, denser's tokenizer
    (chat template, pad token), the task's train prompts and its reward."""
    from transformers import TrainerCallback

    from bench.trl_workload import trl_workload

    work = trl_workload(TASK, n_prompts=steps * PROMPTS, prompts_per_step=PROMPTS)  # denser's prompts, in its order
    reward = work.reward
    if equal_work:  # every completion a success, every completion the full budget (as denser's side)
        def reward(completions, **kw):
            return [1.0] * len(completions)

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    common = dict(output_dir=out_dir, report_to=[], use_cpu=True, bf16=False, max_steps=steps,
                  per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                  max_completion_length=MAX_NEW, logging_steps=1, save_strategy="no", disable_tqdm=True,
                  gradient_checkpointing=False, optim="adamw_torch_fused", temperature=1.0, top_p=1.0,
                  shuffle_dataset=False, learning_rate=LR,
                  **({"generation_kwargs": {"min_new_tokens": MAX_NEW}} if equal_work else {}))
    if objective == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        extra = {}
    elif objective == "sdpo":
        from trl.experimental.sdpo import SDPOConfig as Config
        from trl.experimental.sdpo import SDPOTrainer as Trainer

        extra = TRL_SDPO
    else:
        raise ValueError(f"TRL side: objective {objective!r}: grpo or sdpo")
    args = Config(**common, **extra)
    trainer = Trainer(model=work.model(), reward_funcs=reward, args=args, train_dataset=work.dataset,
                      processing_class=work.tokenizer, callbacks=[StepTimer()])
    trainer.train()
    import trl

    logged = [{k: v for k, v in r.items() if any(w in k for w in ("reward", "distill", "teacher", "success", "step_time", "completions/mean_length"))}
              for r in trainer.state.log_history if "loss" in r]
    return {"step_seconds": times, "logged": logged, "command": f"trl {trl.__version__} {Trainer.__name__}"}


def median_after_first(xs: list[float]) -> float | None:
    rest = xs[1:] or xs
    return statistics.median(rest) if rest else None


def table(rows: list[dict]) -> str:
    """One line per objective: each side's median seconds per step after the first, their ratio, and
    every step's seconds (or why a side did not run)."""
    def cell(r: dict | None) -> tuple[float | None, str]:
        if r is None:
            return None, "not run"
        if "step_seconds" not in r:
            return None, f"failed: {r['error']}"
        return median_after_first(r["step_seconds"]), " ".join(f"{v:.2f}" for v in r["step_seconds"])

    by = {(r["side"], r["objective"]): r for r in rows}
    lines = ["| objective | denser s/step | TRL s/step | TRL / denser | denser's steps | TRL's steps |",
             "|---|---:|---:|---:|---|---|"]
    for obj in dict.fromkeys(r["objective"] for r in rows):
        (d, d_steps), (t, t_steps) = cell(by.get(("denser", obj))), cell(by.get(("trl", obj)))
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        ratio = f"{t / d:.2f}x" if d and t else "-"
        lines.append(f"| {obj} | {fmt(d)} | {fmt(t)} | {ratio} | {d_steps} | {t_steps} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        side, objective, steps, out_dir, equal_work = argv[1], argv[2], int(argv[3]), argv[4], argv[5:] == ["equal"]
        fn = denser_child if side == "denser" else trl_child
        print(MARK + json.dumps(fn(objective, steps, out_dir, equal_work)), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.trl_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="grpo,sdpo")
    p.add_argument("--sides", default="denser,trl")
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first is a warm-up)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default=f"cpu-{os.cpu_count()}core")
    p.add_argument("--equal-work", action="store_true",
                   help="every completion the full budget and a success on both sides (the docstring above)")
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")
    sides = [s for s in a.sides.split(",") if s]
    if set(sides) - {"denser", "trl"}:
        p.error(f"--sides: denser and/or trl, got {a.sides!r}")
    objectives = [o for o in a.objectives.split(",") if o]
    if set(objectives) - {"grpo", "sdpo"}:
        p.error(f"--objectives: grpo and/or sdpo, got {a.objectives!r}")
    rows = []
    for obj in objectives:
        for side in sides:
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run([sys.executable, "-m", "bench.trl_loop", "--child", side, obj, str(a.steps), tmp,
                                       *(["equal"] if a.equal_work else [])],
                                      capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
            out = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
            row = {"side": side, "objective": obj, **(json.loads(out[-1]) if out else
                                                      {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]})}
            rows.append(row)
            print(f"{obj:5s} {side:7s} " + (" ".join(f"{s:.2f}" for s in row["step_seconds"]) if "step_seconds" in row
                                            else f"failed: {row['error']}"), flush=True)
    date = _dt.date.today().isoformat()
    stem = Path(a.out_dir) / f"trl-loop-{a.tag}-{date}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    cmd = "PYTHONPATH=. python -m bench.trl_loop " + " ".join(argv)
    meta = {"date": date, "command": cmd.strip(), "equal_work": a.equal_work,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": os.getloadavg(), "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    md = [f"# The whole step against TRL ({date})", "", f"    {cmd.strip()}", "",
          f"Machine: {meta['machine']}; load average at the end {tuple(round(x, 1) for x in meta['load_average'])} "
          "(seconds compare only on a quiet machine). Median seconds per step after the first; each step's "
          "seconds in the last column.", "", table(rows), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print(table(rows))
    print(f"wrote {stem}.json and .md")
    return 0 if all("step_seconds" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
