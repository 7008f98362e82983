#!/usr/bin/env bash
# Continual post-training on the embedded model (SmolLM2-135M-Instruct): GRPO vs SDPO (EMA teacher)
# vs SDPO (frozen teacher) vs the hybrid loss blend, trained on addition -> compare -> format, with
# arithmetic and logic held out; then one comparison report.
#
#   experiments/continual_compare.sh [RUNS_DIR] [REPORT_DIR]
#
# Scale: chosen for a shared 2-core CPU (a step of the embedded model took 6-140 s there depending on the other jobs), so
# it is a small-sample demonstration, not a measurement: 2 steps per task of 2 prompts x 4
# completions, lr 5e-5 (2.5x the default, so that 2 steps per task move the model visibly), 4 eval
# prompts per task (accuracies move in steps of 0.25). The initial model is measured once (grpo's
# run) and reused by the other runs (--initial-eval-from). Scale up on a GPU with STEPS, PROMPTS,
# EVAL_SIZE, LR.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/continual_compare}
REPORT=${2:-experiments/results/continual_compare}
STEPS=${STEPS:-2}
PROMPTS=${PROMPTS:-2}
EVAL_SIZE=${EVAL_SIZE:-4}
LR=${LR:-5e-5}
COMMON=(--model default --tasks addition,compare,format --eval-tasks arithmetic,logic
        --steps-per-task "$STEPS" --prompts-per-step "$PROMPTS" --num-generations 4 --max-new-tokens 24
        --eval-size "$EVAL_SIZE" --lr "$LR" --spectral-rank 8 --seed 0 --no-progress --overwrite)
run() { local name=$1; shift; echo "=== $name: $(date -u +%H:%M:%S)"; python -m denser continual "$@" "${COMMON[@]}" --output-dir "$RUNS/$name"; }
run grpo        --objective grpo
REUSE=(--initial-eval-from "$RUNS/grpo")
run sdpo_ema    --objective sdpo --teacher ema "${REUSE[@]}"
run sdpo_frozen --objective sdpo --teacher frozen "${REUSE[@]}"
run hybrid      --objective hybrid --teacher ema "${REUSE[@]}"
echo "=== compare: $(date -u +%H:%M:%S)"
python -m denser compare "$RUNS/grpo" "$RUNS/sdpo_ema" "$RUNS/sdpo_frozen" "$RUNS/hybrid" \
    --labels "grpo,sdpo (ema teacher),sdpo (frozen teacher),hybrid (lam 0.5)" --out "$REPORT"
# each run's own report, plots, record and responses next to the comparison (no checkpoints)
for name in grpo sdpo_ema sdpo_frozen hybrid; do
    mkdir -p "$REPORT/runs/$name"
    cp -r "$RUNS/$name/report.md" "$RUNS/$name/continual.json" "$RUNS/$name/plots" "$RUNS/$name/responses" "$REPORT/runs/$name/"
done
echo "=== done: $(date -u +%H:%M:%S)"
