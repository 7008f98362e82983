"""When the teacher knows better: the continual grid's sequence with a teacher that is better than the
initial model on every training task (an "aligned" teacher), against the grid's baselines rerun with
the same code.

    python experiments/aligned_teacher.py build-teacher     # SFT on the three tasks' correct replies -> the aligned teacher
    python experiments/aligned_teacher.py verify-teacher    # rebuild it elsewhere and compare the weights' hash
    python experiments/aligned_teacher.py status            # which runs are finished, started, left
    python experiments/aligned_teacher.py run --jobs 2      # every run not yet finished (resumable)
    python experiments/aligned_teacher.py run --only sdpo_aligned_frozen-s0
    python experiments/aligned_teacher.py rerun opd_aligned-s0   # the same run again; compare the records
    python experiments/aligned_teacher.py report            # denser compare over the finished runs
    python experiments/aligned_teacher.py commands          # every command, the teacher's build first
    python experiments/aligned_teacher.py --model tiny ...  # the same pipeline on the tiny model (a smoke test)

**The aligned teacher** (``build-teacher``): supervised fine-tuning of the embedded model on
``mix:larger+subtract+multiply`` (the grid's three training tasks interleaved, each task's eval
questions at seeds 0, 1 and 2 kept out of its train split) with each question's correct reply in the
model's own format (``7 * 11 = 77\nAnswer: 77``; ``Answer: 54`` for larger): ``TEACHER_STEPS``
batches of ``SFT_BATCH`` rows, AdamW at ``SFT_LR``, seed 0, one thread (deterministic; ``sft`` is
the subcommand it runs). The first recipe, GRPO with the grid's settings on the same mix, made the
model worse on two of the three tasks by step 48 (``grpo_teacher_command`` says by how much): at
this scale GRPO does not make a teacher that knows better, so the teacher is taught the answers,
which is what "a teacher that knows better" means in the paper's setting (a stronger model). Its
weights are cached outside
git (``~/.cache/denser/aligned_teacher/<key>/``, ``$DENSER_CACHE`` replaces ``~/.cache/denser``; the
key is a hash of the build command); ``results/aligned_teacher/teacher.json`` (committed) holds the
command, the commit that trained it, the SHA-256 of the weights (denser's parameter hash, what runs record as
``teacher_model.sha256``, and of ``model.safetensors``) and each task's greedy accuracy (48 eval
prompts per task and seed, the runs' own prompts) for the initial model and the teacher, with
``clearly_above`` (teacher − initial > 2 se, pooled over the three seeds' prompts). Runs refuse a
cached teacher whose hash differs from the JSON's.

**The runs** (``RUNS``): the grid's sequence, tasks, held-out tasks, seeds and measurements
(``continual_grid.COMMON``) for six configurations x three seeds, each with ``--teacher-probe``
(at the start of every stage the teacher-minus-student log-prob of the correct reply and the
teacher's greedy accuracy, in the record as ``stages[k].teacher_probe``):

- ``sdpo_aligned_frozen``: sdpo, ``--teacher frozen --teacher-path <aligned>`` (SDPO-CL's stable teacher);
- ``sdpo_aligned_ema``: sdpo, ``--teacher ema --teacher-path <aligned> --teacher-init-alpha 0.5`` (an
  EMA teacher started halfway between the initial model and the aligned one);
- ``opd_aligned``: opd from the aligned teacher (reverse KL, full vocabulary, the plain prompt);
- ``grpo``, ``sdpo_ema``, ``sdpo_frozen``: the grid's configurations again, with this round's code.

Runs are resumable and published as the grid's are (``runs/aligned_teacher/<name>`` while going,
``results/aligned_teacher/runs/<name>/`` with ``command.txt`` when finished; checkpoints deleted).
``rerun NAME`` runs a finished run again and compares its record field by field
(``continual_grid.record_differences``).

With ``--model tiny`` every command runs the same pipeline on the random tiny model with small
budgets, writing only under ``runs/aligned_teacher_tiny/`` (nothing committed): the smoke test.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the measurements import this checkout's denser, as the subprocesses run it
    sys.path.insert(0, str(ROOT))


def _grid():
    spec = importlib.util.spec_from_file_location("continual_grid", ROOT / "experiments" / "continual_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grid = _grid()
TRAIN_TASKS = grid.TASKS.split(",")  # larger, subtract, multiply
SEEDS = grid.SEEDS
TEACHER_STEPS = 48  # the build's budget: 48 batches of SFT_BATCH rows, about 256 of each task
SFT_BATCH = 16
SFT_LR = 1e-5
TEACHER_EVAL_EVERY = 24
EVAL_SIZE = 48  # per task and seed, as the runs measure


@dataclass(frozen=True)
class Setup:
    """What differs between the real experiment and its tiny smoke version."""

    tiny: bool
    results: Path
    work: Path
    rerun: Path
    common: list[str] = field(default_factory=list)
    teacher_steps: int = TEACHER_STEPS
    eval_every: int = TEACHER_EVAL_EVERY
    eval_size: int = EVAL_SIZE
    max_new_tokens: int = 32
    loop: list[str] = field(default_factory=list)  # denser train's batch flags for the build

    @property
    def teacher_json(self) -> Path:
        return self.results / "teacher.json"


def setup(model: str) -> Setup:
    if model == "default":
        return Setup(False, ROOT / "experiments" / "results" / "aligned_teacher", ROOT / "runs" / "aligned_teacher",
                     ROOT / "runs" / "aligned_teacher_rerun", list(grid.COMMON),
                     loop=["--prompts-per-step", "4", "--num-generations", "4", "--micro-batch-size", "8"])
    if model != "tiny":
        raise SystemExit(f"aligned_teacher: --model must be default or tiny, got {model!r}")
    base = ROOT / "runs" / "aligned_teacher_tiny"
    common = ["--model", "tiny", "--tasks", grid.TASKS, "--eval-tasks", grid.HELD_OUT, "--steps-per-task", "1",
              "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6", "--micro-batch-size", "4",
              "--lr", "1e-3", "--lr-schedule", "constant", "--warmup-steps", "0", "--eval-size", "3",
              "--spectral-rank", "4", "--loss-agg-mode", "seq-mean-token-mean", "--no-progress"]
    return Setup(True, base / "results", base / "work", base / "rerun", common, teacher_steps=2, eval_every=1,
                 eval_size=3, max_new_tokens=6,
                 loop=["--prompts-per-step", "2", "--num-generations", "2", "--micro-batch-size", "4"])


# ------------------------------------------------------------------------------- the aligned teacher


def mix_task() -> str:
    return f"mix:{'+'.join(TRAIN_TASKS)}?exclude_eval_of={','.join(map(str, SEEDS))}"


def grpo_teacher_command(s: Setup, out: Path) -> list[str]:
    """The first recipe (session 3 of the round, not used): GRPO with the grid's loss and optimiser
    settings on the three tasks mixed. Stopped at step 54 of 96: greedy accuracy at step 48 fell on
    every task but ``larger`` (larger 0.562 -> 0.542, subtract 0.333 -> 0.229, multiply 0.479 -> 0.000;
    144 eval prompts), the README main job's decline again: GRPO at this scale does not make a teacher
    that knows better."""
    return [sys.executable, "-m", "denser", "train", "--objective", "grpo", *grid.GRPO, *grid.GRPO_UPDATES,
            "--task", mix_task(), "--model", "tiny" if s.tiny else "default", "--steps", str(s.teacher_steps),
            *s.loop, "--max-new-tokens", str(s.max_new_tokens),
            "--lr", "1e-3" if s.tiny else "2e-5", "--lr-schedule", "constant", "--warmup-steps", "0",
            "--weight-decay", "0.01", "--adam-beta2", "0.999", "--max-grad-norm", "1.0", "--temperature", "1.0",
            "--top-p", "1.0", "--loss-agg-mode", "seq-mean-token-mean", "--seed", "0",
            "--eval-size", str(s.eval_size * len(TRAIN_TASKS)), "--eval-every", str(s.eval_every),
            "--keep-last", "1", "--no-progress", "--output-dir", str(out)]


def teacher_command(s: Setup, out: Path) -> list[str]:
    """The teacher's build: supervised fine-tuning on the three tasks' correct replies (:func:`sft`)."""
    return [sys.executable, str(Path(__file__).resolve()), *(["--model", "tiny"] if s.tiny else []), "sft",
            "--steps", str(s.teacher_steps), "--batch", str(SFT_BATCH), "--lr", "1e-3" if s.tiny else str(SFT_LR),
            "--seed", "0", "--out", str(out)]


def correct_reply(row: dict) -> str:
    """The reply the embedded model writes when it is right: ``a op b = c\nAnswer: c`` for arithmetic,
    ``Answer: c`` for ``larger`` (its own format, measured on the eval prompts; only ``c`` is the task's)."""
    m = re.search(r"What is (\d+) ([-*+]) (\d+)\?", row["question"])
    answer = row["answer"]
    return f"{m.group(1)} {m.group(2)} {m.group(3)} = {answer}\nAnswer: {answer}" if m else f"Answer: {answer}"


def sft(s: Setup, out: Path, steps: int, batch: int, lr: float, seed: int) -> int:
    """Supervised fine-tuning of the initial model on the mixed task's train rows (each task's eval
    questions left out) with their correct replies (:func:`correct_reply`, checked by the task), the
    loss on the reply tokens and the end-of-turn token; AdamW (weight decay 0.01), constant ``lr``,
    gradient norm clipped at 1, one thread, ``steps`` batches of ``batch`` rows drawn in a seeded
    order: deterministic. Writes ``out/checkpoints/step-<steps>/model`` (atomically) and
    ``out/metrics.jsonl`` (the loss of every step)."""
    import random
    import shutil
    import tempfile

    import torch

    from denser.tasks import get_task
    from denser.trainers.models import load_model, render_prompt

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    task = get_task(mix_task(), seed=0)
    model, tok = load_model("tiny" if s.tiny else "default", seed=0)
    rows = list(task.train)
    bad = [r["question"] for r in rows[:64] if not task.is_success(task.check(correct_reply(r), r))]
    if bad:
        raise SystemExit(f"sft: the task does not accept the constructed reply for {bad[0]!r}")
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.999))
    model.train()
    out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "w")
    t0 = time.time()
    for step in range(steps):
        picked = [rows[order[(step * batch + i) % len(rows)]] for i in range(batch)]
        seqs, labels = [], []
        for r in picked:
            prompt = render_prompt(tok, task.prompt(r))
            reply = tok.encode(correct_reply(r), add_special_tokens=False) + [tok.eos_token_id]
            seqs.append(prompt + reply)
            labels.append([-100] * len(prompt) + reply)
        width = max(map(len, seqs))
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in seqs])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
        lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics.write(json.dumps({"step": step + 1, "loss": float(loss), "grad_norm": float(norm),
                                  "time_s": time.time() - t0}) + "\n")
        metrics.flush()
        if (step + 1) % 8 == 0 or step + 1 == steps:
            print(f"sft step {step + 1}/{steps}: loss {float(loss):.4f}", flush=True)
    metrics.close()
    final = out / "checkpoints" / f"step-{steps:06d}" / "model"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=final.parent))
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return 0


def cache_root() -> Path:
    return Path(os.environ.get("DENSER_CACHE", Path.home() / ".cache" / "denser")) / "aligned_teacher"


def teacher_key(s: Setup) -> str:
    """The cache key: a hash of the build command (without its output directory)."""
    cmd = [_shown(Path(a)) if a.startswith("/") else a for a in teacher_command(s, Path("OUT"))[1:]]
    return ("tiny-" if s.tiny else "") + hashlib.sha256(shlex.join(cmd).encode()).hexdigest()[:12]


def _shown(path: Path) -> str:
    """A path as command.txt and teacher.json show it: the repository relative, the home as ~."""
    text = str(path)
    if text.startswith(str(ROOT) + "/"):
        return text[len(str(ROOT)) + 1:]
    home = str(Path.home())
    return "~" + text[len(home):] if text.startswith(home + "/") else text


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _built_at(run_dir: Path) -> str:
    """The commit that trained the cached teacher (written when its training started)."""
    f = run_dir.parent / "commit.txt"
    return f.read_text().strip() if f.is_file() else _git("rev-parse", "HEAD")


def cpu_name() -> str:
    """The CPU the process runs on, as /proc/cpuinfo names it, with AMX when it has it: a build's bits
    depend on it (matmul kernels round differently on different CPUs), so teacher.json and each run's
    command.txt say which one it ran on."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extra = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name} ({', '.join(extra)})" if extra else name


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def final_model(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no checkpoint (the teacher's build did not finish)")
    return ckpts[-1] / "model"


def accuracies(model_path: str, s: Setup) -> dict[str, dict[str, list]]:
    """``{task: {seed: [greedy successes]}}`` on each seed's first ``eval_size`` eval prompts, the
    prompts the runs measure (``denser continual``'s suite: greedy, ``max_new_tokens``)."""
    import torch

    from denser.analysis.suite import EvalSuite
    from denser.tasks import get_task
    from denser.trainers.models import load_model

    model, tok = load_model(model_path, seed=0)
    model.eval()
    tasks = {f"{t}@{seed}": get_task(t, seed=seed) for t in TRAIN_TASKS for seed in SEEDS}
    suite = EvalSuite(tasks, eval_size=s.eval_size, max_new_tokens=s.max_new_tokens)
    with torch.no_grad():
        gens = suite.generate_many(model, tok, list(tasks))
    out: dict[str, dict[str, list]] = {t: {} for t in TRAIN_TASKS}
    for key, g in gens.items():
        t, seed = key.split("@")
        out[t][seed] = [float(x) for x in g.extra["success"]]
    return out


def _summary(per_seed: dict[str, list]) -> dict:
    vals = [v for seed in sorted(per_seed) for v in per_seed[seed]]
    mean = sum(vals) / len(vals)
    se = math.sqrt(mean * (1 - mean) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": mean, "se": se, "n": len(vals),
            "per_seed": {seed: sum(v) / len(v) for seed, v in sorted(per_seed.items())}}


def teacher_record(s: Setup, before: dict, after: dict, cmd: list[str], model_dir: Path, elapsed: float,
                   run_dir: Path) -> dict:
    from denser.trainers.models import load_model
    from denser.trainers.teacher import weights_sha256

    model, _ = load_model(str(model_dir), seed=0)
    tasks = {}
    for t in TRAIN_TASKS:
        b, a = _summary(before[t]), _summary(after[t])
        # paired over the same prompts: the se of the mean difference of per-prompt successes
        d = [y - x for seed in sorted(before[t]) for x, y in zip(before[t][seed], after[t][seed])]
        dm = sum(d) / len(d)
        dse = math.sqrt(sum((v - dm) ** 2 for v in d) / (len(d) - 1) / len(d)) if len(d) > 1 else None
        tasks[t] = {"initial": b, "teacher": a, "gain": dm, "gain_se": dse,
                    "clearly_above": dse is not None and dm > 2 * dse}
    evals = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "eval_accuracy" in row:
                evals.append({k: v for k, v in row.items() if k == "step" or k.startswith("eval_accuracy")})
    return {
        "kind": "denser.aligned_teacher",
        "command": shlex.join(["python", *cmd[1:]]).replace(str(run_dir), "$CACHE/run").replace(str(ROOT) + "/", ""),
        "commit": _built_at(run_dir),
        "measured_at": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cpu": cpu_name(),
        "cache_dir": _shown(run_dir),
        "model_dir": _shown(model_dir),
        "weights_sha256": weights_sha256(model),
        "safetensors_sha256": file_sha256(model_dir / "model.safetensors"),
        "steps": s.teacher_steps,
        "task": mix_task(),
        "eval": {"prompts_per_task_and_seed": s.eval_size, "seeds": list(SEEDS), "decoding": "greedy",
                 "max_new_tokens": s.max_new_tokens},
        "accuracy": tasks,
        "all_clearly_above": all(v["clearly_above"] for v in tasks.values()),
        "loop_evals": evals,
        "build_time_s": elapsed,
    }


def build(s: Setup, root: Path, *, force: bool = False) -> tuple[int, dict | None]:
    """Train the teacher under ``root/<key>/run`` (or reuse a finished build there) and measure it:
    ``(exit code, teacher.json's record)``."""
    run_dir = root / teacher_key(s) / "run"
    cmd = teacher_command(s, run_dir)
    t0 = time.time()
    done = (run_dir / "checkpoints" / f"step-{s.teacher_steps:06d}").is_dir()
    if force or not done:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(shlex.join(cmd), flush=True)  # minutes: a build that did not finish starts over
        (run_dir.parent / "commit.txt").write_text(_git("rev-parse", "HEAD") + "\n")  # the commit that trains it
        with open(run_dir.parent / "build.log", "a") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if rc:
            print(f"build-teacher: the build exited {rc}; see {run_dir.parent / 'build.log'}", file=sys.stderr)
            return rc, None
    model_dir = final_model(run_dir)
    print(f"measuring the initial model and the teacher on {len(TRAIN_TASKS)} tasks x {len(SEEDS)} seeds x "
          f"{s.eval_size} prompts", flush=True)
    before = accuracies("tiny" if s.tiny else "default", s)
    after = accuracies(str(model_dir), s)
    return 0, teacher_record(s, before, after, cmd, model_dir, time.time() - t0, run_dir)


def build_teacher(s: Setup, *, force: bool = False) -> int:
    if _git("status", "--porcelain", "--untracked-files=no") and not s.tiny:
        print("build-teacher: the working tree has uncommitted changes; commit first (teacher.json pins the commit)",
              file=sys.stderr)
        return 2
    rc, record = build(s, cache_root(), force=force)
    if rc:
        return rc
    s.teacher_json.parent.mkdir(parents=True, exist_ok=True)
    if s.teacher_json.is_file():  # an earlier build (another machine, or before the cache was lost)
        record["earlier_builds"] = earlier_builds(json.loads(s.teacher_json.read_text()), record)
        for b in record["earlier_builds"][:1]:
            print(f"build-teacher: the weights {'equal' if b['weights_sha256'] == record['weights_sha256'] else 'differ from'}"
                  f" the earlier build's ({b['weights_sha256'][:16]}..., {b['cpu'] or 'CPU not recorded'}); "
                  f"greedy accuracy per task and seed {'identical' if b['same_accuracy'] else 'DIFFERENT'}")
    s.teacher_json.write_text(json.dumps(record, indent=1) + "\n")
    print(teacher_table(record))
    print(f"wrote {_shown(s.teacher_json)}")
    return 0


def earlier_builds(old: dict, new: dict) -> list[dict]:
    """The builds before ``new``, newest first: each one's commit, CPU, hashes and whether its greedy
    accuracy per task and seed equals ``new``'s. Runs record the hash of the build they used, so a
    rebuild on another CPU (whose bits differ) leaves the earlier runs' teacher on record."""
    if old.get("weights_sha256") == new["weights_sha256"]:
        return old.get("earlier_builds", [])

    def per_seed(r: dict) -> dict:
        return {t: v["teacher"]["per_seed"] for t, v in r["accuracy"].items()}

    this = {k: old.get(k) for k in ("commit", "cpu", "weights_sha256", "safetensors_sha256", "build_time_s")}
    this["same_accuracy"] = per_seed(old) == per_seed(new)
    this["accuracy_per_seed"] = per_seed(old)
    return [this, *old.get("earlier_builds", [])]


def verify_teacher(s: Setup) -> int:
    """Build the teacher again in a scratch directory and compare its weights' hash with teacher.json's."""
    if not s.teacher_json.is_file():
        print(f"verify-teacher: no {_shown(s.teacher_json)}; build-teacher first", file=sys.stderr)
        return 2
    committed = json.loads(s.teacher_json.read_text())
    rc, rebuilt = build(s, s.work.parent / (s.work.name + "_teacher_rebuild"), force=True)
    if rc:
        return rc
    same = rebuilt["weights_sha256"] == committed["weights_sha256"]
    print(f"rebuilt teacher: weights sha256 {rebuilt['weights_sha256'][:16]}... "
          f"{'identical to' if same else 'DIFFERENT from'} teacher.json's {committed['weights_sha256'][:16]}...")
    return 0 if same else 1


def teacher_table(record: dict) -> str:
    lines = ["| task | initial | aligned teacher | gain ± se (paired) | clearly above |", "|---|---|---|---|---|"]
    for t, v in record["accuracy"].items():
        lines.append(f"| {t} | {v['initial']['mean']:.3f} | {v['teacher']['mean']:.3f} | "
                     f"{v['gain']:+.3f} ± {v['gain_se'] or 0:.3f} | {'yes' if v['clearly_above'] else 'no'} |")
    return "\n".join(lines)


def teacher_path(s: Setup) -> Path:
    """The cached teacher's model directory, checked against teacher.json's hash (one clear line when
    it is missing or different)."""
    if not s.teacher_json.is_file():
        raise SystemExit(f"aligned_teacher: no {_shown(s.teacher_json)}; build the teacher first: "
                         f"python experiments/aligned_teacher.py {'--model tiny ' if s.tiny else ''}build-teacher")
    record = json.loads(s.teacher_json.read_text())
    model_dir = Path(os.path.expanduser(record["model_dir"]))
    if not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"aligned_teacher: the cached teacher {record['model_dir']} is gone; rebuild it with "
                         f"python experiments/aligned_teacher.py {'--model tiny ' if s.tiny else ''}build-teacher "
                         f"(at commit {record['commit'][:12]})")
    return model_dir


def check_teacher(s: Setup) -> Path:
    model_dir = teacher_path(s)
    record = json.loads(s.teacher_json.read_text())
    if file_sha256(model_dir / "model.safetensors") != record["safetensors_sha256"]:
        raise SystemExit(f"aligned_teacher: {record['model_dir']}/model.safetensors does not have teacher.json's "
                         "SHA-256; rebuild the teacher (build-teacher --force) or restore the JSON")
    return model_dir


# ---------------------------------------------------------------------------------------- the runs

CONFIGS = {  # name -> (label, arguments; TEACHER stands for the aligned teacher's path)
    "grpo": ("grpo (SDPO baseline)", ["--objective", "grpo", *grid.GRPO, *grid.GRPO_UPDATES]),
    "sdpo_ema": ("sdpo (EMA teacher)", ["--objective", "sdpo", "--teacher", "ema", *grid.SDPO]),
    "sdpo_frozen": ("sdpo (frozen teacher)", ["--objective", "sdpo", "--teacher", "frozen", *grid.SDPO]),
    "sdpo_aligned_frozen": ("sdpo (frozen aligned teacher)",
                            ["--objective", "sdpo", "--teacher", "frozen", "--teacher-path", "TEACHER", *grid.SDPO]),
    "sdpo_aligned_ema": ("sdpo (EMA teacher from 0.5 aligned)",
                         ["--objective", "sdpo", "--teacher", "ema", "--teacher-path", "TEACHER",
                          "--teacher-init-alpha", "0.5", *grid.SDPO]),
    "opd_aligned": ("opd (aligned teacher)", ["--objective", "opd", "--teacher-path", "TEACHER"]),
}
RUNS = {f"{c}-s{seed}": {"config": c, "seed": seed, "label": CONFIGS[c][0], "group": f"seed{seed}"}
        for seed in SEEDS for c in CONFIGS}
GROUPS = ", ".join([*dict.fromkeys(r["group"] for r in RUNS.values()), *CONFIGS])
ALIGNED = {c for c, (_, args) in CONFIGS.items() if "TEACHER" in args}


def _first_of_seed(seed: int) -> str:
    return next(n for n, r in RUNS.items() if r["seed"] == seed)


def finished(s: Setup, name: str) -> bool:
    return (s.results / "runs" / name / "continual.json").is_file()


def _stage0_source(s: Setup, name: str) -> Path:
    return s.results / "runs" / name if finished(s, name) else s.work / name


def command(s: Setup, name: str, work: Path | None = None, teacher: Path | None = None) -> list[str]:
    spec = RUNS[name]
    work = work or s.work
    args = CONFIGS[spec["config"]][1]
    if "TEACHER" in args:
        teacher = teacher or teacher_path(s)
        args = [str(teacher) if a == "TEACHER" else a for a in args]
    cmd = [sys.executable, "-m", "denser", "continual", *args, *s.common, "--teacher-probe", "--seed", str(spec["seed"]),
           "--output-dir", str(work / name), "--resume"]
    first = _first_of_seed(spec["seed"])
    if name != first:
        cmd += ["--initial-eval-from", str(_stage0_source(s, first))]
    return cmd


def shown_command(s: Setup, name: str, work: Path | None = None) -> str:
    return " ".join(_shown(Path(a)) if a.startswith("/") else shlex.quote(a)
                    for a in ["python", *command(s, name, work)[1:]])


def _wait_for_stage0(s: Setup, name: str, log) -> None:
    first = _first_of_seed(RUNS[name]["seed"])
    while name != first:
        src = _stage0_source(s, first) / "continual.json"
        if src.is_file() and json.loads(src.read_text()).get("stages"):
            return
        log(f"{name}: waiting for {first}'s stage 0")
        time.sleep(5 if s.tiny else 60)


def _publish(s: Setup, name: str) -> None:
    src, dst = s.work / name, s.results / "runs" / name
    dst.mkdir(parents=True, exist_ok=True)
    for item in ("report.md", "plots", "responses", "teacher_probe"):
        if (src / item).is_dir():
            shutil.copytree(src / item, dst / item, dirs_exist_ok=True)
        elif (src / item).is_file():
            shutil.copy2(src / item, dst / item)
    cmd = shown_command(s, name)
    header = ["# made by: python experiments/aligned_teacher.py run (OMP_NUM_THREADS=1)", f"# cpu: {cpu_name()}"]
    if "--teacher-path" in cmd:  # which build of the teacher (its bits depend on the CPU that built it)
        header.append(f"# teacher weights sha256: {json.loads(s.teacher_json.read_text())['weights_sha256']}")
    (dst / "command.txt").write_text("\n".join(header) + "\n" + cmd + "\n")
    shutil.copy2(src / "continual.json", dst / "continual.json.tmp")
    os.replace(dst / "continual.json.tmp", dst / "continual.json")  # last: its presence means finished
    for ckpt in src.glob("**/checkpoints"):
        shutil.rmtree(ckpt, ignore_errors=True)


def _launch(s: Setup, name: str, work: Path, log) -> int:
    cmd = command(s, name, work)
    (work / name).mkdir(parents=True, exist_ok=True)
    log(f"{name}: {shlex.join(cmd)}")
    with open(work / f"{name}.log", "a") as out:
        return subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def run_one(s: Setup, name: str) -> int:
    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    _wait_for_stage0(s, name, log)
    t0 = time.time()
    rc = _launch(s, name, s.work, log)
    if rc == 0:
        _publish(s, name)
    log(f"{name}: exit {rc} after {(time.time() - t0) / 60:.1f} min (log {s.work / name}.log)")
    return rc


def verify(s: Setup, name: str) -> int:
    """The rerun of ``name`` against its committed record (``continual_grid.record_differences``)."""
    original_file, rerun_file = s.results / "runs" / name / "continual.json", s.rerun / name / "continual.json"
    for f in (original_file, rerun_file):
        if not f.is_file():
            print(f"verify {name}: no {_shown(f)}", file=sys.stderr)
            return 2
    # stage 0 is reused from the seed's first run, read from its work directory while that run was going and
    # from its published copy after: the same measurement, so the two paths count as one
    first = _first_of_seed(RUNS[name]["seed"])
    same = (str(s.work / first), str(s.results / "runs" / first))
    original, rerun = (json.loads(f.read_text().replace(*same)) for f in (original_file, rerun_file))
    diffs, done = grid.record_differences(original, rerun, original["config"]["output_dir"], str(s.rerun / name))
    total = len(original["stages"])
    lines = [f"# Rerun of `{name}`: {'identical' if not diffs else 'DIFFERENT'} ({done} of {total} stages)", "",
             "```", shown_command(s, name, s.rerun), "```", "",
             f"Compared with the committed `runs/{name}/continual.json`, every field (accuracy matrix, teacher probe, "
             "drift, every training step's loss, the configuration) except wall-clock times and the run's directory.",
             "", f"- fields that differ: {', '.join(diffs) or 'none'}"]
    (s.results / f"rerun-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not diffs else 1


def report(s: Setup) -> int:
    done = [n for n in RUNS if finished(s, n)]
    if not done:
        print("no finished runs yet", file=sys.stderr)
        return 1
    dirs = [_shown(s.results / "runs" / n) for n in done]
    labels = ",".join(RUNS[n]["label"] for n in done)
    cmd = [sys.executable, "-m", "denser", "compare", *dirs, "--labels", labels, "--out", _shown(s.results)]
    print(shlex.join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", choices=["default", "tiny"],
                   help="tiny: the whole pipeline on the tiny model under runs/aligned_teacher_tiny/ (a smoke test)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-teacher", help="train (or reuse the cached) aligned teacher and write teacher.json")
    b.add_argument("--force", action="store_true", help="train it again even when the cache holds it")
    sub.add_parser("verify-teacher", help="build the teacher again in a scratch cache and compare its hash with teacher.json")
    r = sub.add_parser("run", help="run every unfinished run (or those of --only)")
    r.add_argument("--only", default="", help=f"comma-separated run names, seed groups or configurations ({GROUPS})")
    r.add_argument("--jobs", type=int, default=1, help="runs at once (each single-threaded)")
    sub.add_parser("status", help="finished / started / left")
    sub.add_parser("report", help="denser compare over the finished runs")
    sub.add_parser("commands", help="print the teacher's build command and every run's command")
    f = sub.add_parser("sft", help="(what build-teacher runs) the supervised fine-tuning that makes the teacher")
    f.add_argument("--steps", type=int, required=True)
    f.add_argument("--batch", type=int, required=True)
    f.add_argument("--lr", type=float, required=True)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, required=True)
    rr = sub.add_parser("rerun", help="run a finished run again and compare its record with the committed one")
    rr.add_argument("name", choices=list(RUNS))
    v = sub.add_parser("verify", help="compare a rerun (finished or not) with the committed record")
    v.add_argument("name", choices=list(RUNS))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    s = setup(args.model)
    if args.cmd == "build-teacher":
        return build_teacher(s, force=args.force)
    if args.cmd == "sft":
        return sft(s, args.out, args.steps, args.batch, args.lr, args.seed)
    if args.cmd == "verify-teacher":
        return verify_teacher(s)
    if args.cmd == "commands":
        build = ["python", *teacher_command(s, cache_root() / teacher_key(s) / "run")[1:]]
        print(" ".join(_shown(Path(a)) if a.startswith("/") else shlex.quote(a) for a in build))
        for name in RUNS:
            try:
                print(shown_command(s, name))
            except SystemExit:
                print(f"# {name}: needs the teacher (build-teacher first)")
        return 0
    if args.cmd == "status":
        teacher = "built" if s.teacher_json.is_file() else "not built"
        print(f"aligned teacher: {teacher} ({_shown(s.teacher_json)})")
        for name, spec in RUNS.items():
            state = "finished" if finished(s, name) else ("started" if (s.work / name).exists() else "left")
            print(f"{name:26s} {spec['group']:8s} {state}")
        return 0
    if args.cmd == "report":
        return report(s)
    if args.cmd == "verify":
        return verify(s, args.name)
    if args.cmd == "rerun":
        if not finished(s, args.name):
            p.error(f"rerun: {args.name} has no record yet; `run --only {args.name}` first")
        if RUNS[args.name]["config"] in ALIGNED:
            check_teacher(s)
        return _launch(s, args.name, s.rerun, lambda msg: print(msg, flush=True)) or verify(s, args.name)
    wanted = {w for w in args.only.split(",") if w}
    unknown = wanted - set(RUNS) - {r["group"] for r in RUNS.values()} - set(CONFIGS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; names: {', '.join(RUNS)}; groups: {GROUPS}")
    todo = [n for n, r in RUNS.items() if not finished(s, n)
            and (not wanted or n in wanted or r["group"] in wanted or r["config"] in wanted)]
    if any(RUNS[n]["config"] in ALIGNED for n in todo):
        check_teacher(s)  # one clear line before any run starts
    for n in todo:  # a run reuses its seed's stage 0: the run measuring it must be finished, going or scheduled
        first = _first_of_seed(RUNS[n]["seed"])
        if first not in todo and not finished(s, first) and not (s.work / first).exists():
            p.error(f"{n} reuses {first}'s measurement of the initial model; run {first} first or with it "
                    f"(--only {first},{n})")
    print(f"{len(todo)} runs to do: {', '.join(todo)}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        codes = list(pool.map(lambda n: run_one(s, n), todo))
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
