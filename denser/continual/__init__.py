"""Continual post-training: one model trained on a sequence of tasks, measured after every stage.

    denser continual --objective sdpo --tasks addition,compare,reverse --eval-tasks logic,format \\
        --steps-per-task 4 --model default

Stage 0 is the model before training; stage k trains ``--steps-per-task`` steps on the k-th task,
starting from stage k-1's final weights. Every stage is an ordinary :class:`~denser.trainers.loop.Trainer`
run in ``<run>/stages/NN-<task>/`` (its own ``config.yaml``, ``metrics.jsonl`` and a final
checkpoint loadable by ``from_pretrained``), so everything the loop does (signals, NaN guards,
checkpoints) is the same as for ``denser train``. Between stages the runner carries:

- the weights (always): stage k's model is stage k-1's final checkpoint;
- the AdamW state (``--carry-optimizer``) or a fresh optimizer (``--reset-optimizer``, the
  default, as when each stage is a separate fine-tuning job). The learning-rate schedule (and any
  schedule of the objective, e.g. hybrid's density schedule) restarts in every stage;
- the SDPO EMA teacher (when the objective has one): it keeps averaging across stages; with
  ``--teacher-reset`` the teacher restarts from the stage's starting policy every stage instead
  (``ema``, ``frozen`` and the ``trust-region`` reference alike), as SDPO-CL's runs restarted per
  stage do;
- anchors stay at the start of the sequence: a ``frozen`` SDPO teacher, the ``trust-region``
  reference (unless ``--teacher-reset``) and the GRPO reference model (``kl_coef > 0``, always) are
  the initial model of stage 0 in every stage, not the stage's start.

Before training and after every stage the runner measures, on fixed prompts (the first
``--eval-size`` rows of each task's eval split) of every training task and every ``--eval-tasks``
task (held out: never trained on): greedy accuracy (the accuracy matrix), parameter drift from
the initial weights, response drift from the initial model's responses and formatting artifacts
(:mod:`denser.analysis`), each accuracy with its standard error over prompts. With
``--eval-samples n`` it also records mean@n (``n`` completions per prompt at ``--eval-temperature``
and ``--eval-top-p``, seeded) per task, at the stages ``--sampled-eval-stages`` selects (``first-last``:
stage 0 and the last stage, the default; ``all``; ``none``): ``stages[k]["sampled_accuracy"]``.
``--eval-size 0`` (the default) takes each task's whole eval split, at most 64 rows;
``--max-new-tokens 0`` (the default) is the largest ``suggested_max_new_tokens`` of the sequence's
tasks, for every stage and every eval. ``<run>/continual.json`` holds everything, rewritten after every stage;
``<run>/report.md`` and ``<run>/plots/*.png`` are rendered from it; the responses themselves are
in ``<run>/responses/stage-NNN.jsonl``.

Each stage's Trainer gets these as constructor arguments (``anchor``, ``optimizer_state``,
``teacher_state``, from the previous stage's ``Trainer.carry_state()``), and its own
before/after evaluation in ``Trainer.train()`` is the same fixed-prompt evaluator (its
``evaluator`` argument), so nothing is generated twice and the stage's ``metrics.jsonl`` shows
the accuracies of the matrix. Single process only.

With ``--report-to``, the whole sequence is one tracker run (:mod:`denser.trainers.tracking`): each
stage's trainer logs through a view of it (``Trainer(tracker=...)``) with stage-prefixed keys
(``stage1/addition/reward_mean``) and steps counted over the sequence (stage k's step j is
``(k - 1) * steps_per_task + j``); after every stage the runner logs the accuracy of every column
(``eval/<task>/accuracy``), the averages and the drift (``drift/relative_l2``, ``drift/kl``).

SIGTERM and Ctrl-C stop a run as they stop ``denser train`` (exit code 143 / 130): inside a stage's
training, the stage's trainer saves its last finished step in the stage's directory; during a
measurement, the measurement is abandoned. ``--resume`` (the same command with ``--resume``) then
continues inside the stopped stage from that checkpoint, or measures the stage again, and the
finished ``continual.json`` is the one of a run never stopped (but for wall-clock times); see
:mod:`denser.continual.record`.

From Python, ``denser.continual(objective="grpo", tasks=["addition", "compare"], model="tiny")`` runs what
the command runs and returns ``continual.json``'s dict (:func:`~denser.continual.runner.continual`).

This package sits above :mod:`denser.analysis` and :mod:`denser.trainers` and drives both; the
command line (``denser continual``) is in :mod:`denser.cli`. Its modules: :mod:`~denser.continual.config`
(the flags), :mod:`~denser.continual.record` (``continual.json`` and where ``--resume`` continues),
:mod:`~denser.continual.measure` (the measurement after every stage), :mod:`~denser.continual.runner`
(the stages).
"""

import sys
import types

from denser.continual.config import SAMPLED_EVAL_STAGES, ContinualConfig, default_run_dir
from denser.continual.record import FORMAT_VERSION, RUN_FILES
from denser.continual.runner import ContinualRunner, continual

__all__ = ["FORMAT_VERSION", "RUN_FILES", "SAMPLED_EVAL_STAGES", "ContinualConfig", "ContinualRunner",
           "continual", "default_run_dir"]


class _CallablePackage(types.ModuleType):
    """``denser.continual(...)`` runs :func:`continual`: once this package is imported, Python binds the
    name ``denser.continual`` to it (not to the API function beside ``denser.train``), so the package
    itself is the function too."""

    def __call__(self, *args, **kwargs):
        return continual(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
