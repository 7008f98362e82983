"""Where a training step's memory goes, LoRA or full: RSS and high-water mark after each phase.

    PYTHONPATH=. OMP_NUM_THREADS=2 python bench/results/lora-rss-probe.py lora   # or: full

(The numbers it printed on 2026-11-29 are in lora-grpo-train-peak-cpu-2core-2026-11-29.md.)
"""

import sys

from denser.bench.step_case import _reset_peak, _status_kb
from denser.cli import parse_train_args
from denser.trainers.loop import Trainer


def show(tag: str) -> None:
    print(tag, "rss", round(_status_kb("VmRSS") / 1024), "hwm", round(_status_kb("VmHWM") / 1024), flush=True)


mode = sys.argv[1]
cfg, obj = parse_train_args(["--model", "default", "--objective", "grpo", "--steps", "1", "--prompts-per-step", "2",
                             "--max-new-tokens", "16", "--eval-size", "1", "--no-progress", "--cpu",
                             "--output-dir", f"/tmp/probe-{mode}", "--overwrite"]
                            + (["--lora-r", "16"] if mode == "lora" else []))
trainer = Trainer(cfg, obj, log=lambda *a: None)
show("init")
_reset_peak()
trainer.evaluate_all()
show("eval")
_reset_peak()
trainer.step(0)
show("step")
_reset_peak()
trainer.save(1, finished=True)
show("save")
