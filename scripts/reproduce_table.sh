#!/usr/bin/env bash
# The paper-style table (tasks × rates × pruners) for MiniLM on the real GLUE data in ../shared:
# one `kprune run -m` sweep per task, then one `kprune summarize` over all of them.
#
#   scripts/reproduce_table.sh [NUM_TOKENS] [OUT]
#
# NUM_TOKENS  calibration sample size in tokens (the paper: 100000; e.g. 2000 for a quick CPU run)
# OUT         where the sweeps and the table go (default outputs/reproduce-<time>)
# Settings from the environment (defaults in brackets):
#   TASKS ["mrpc stsb"]  PRUNERS [kprune,kwon,magnitude]  RATES [0.4,0.6,0.8]  SEEDS [0]  SHARED [../shared]
#   KPRUNE [.venv/bin/kprune]  KPRUNE_ARGS [""]: more overrides for every job, e.g.
#   KPRUNE_ARGS="hydra/launcher=slurm hydra.launcher.partition=gpu device=cuda"
# A task without a fine-tuned model in $SHARED/models/minilm-<task> (e.g. sst2) is fine-tuned first.
# Exit status: 0 when every job finished, 1 when some failed (they are listed in the table).
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_TOKENS=${1:-100000}
OUT=${2:-outputs/reproduce-$(date +%Y%m%d-%H%M%S)}
TASKS=${TASKS:-mrpc stsb}
PRUNERS=${PRUNERS:-kprune,kwon,magnitude}
RATES=${RATES:-0.4,0.6,0.8}
SEEDS=${SEEDS:-0}
SHARED=${SHARED:-../shared}
KPRUNE=${KPRUNE:-.venv/bin/kprune}
read -r -a EXTRA <<< "${KPRUNE_ARGS:-}"

run() {
  echo "+ $*" >&2
  "$@"
}

status=0
for task in $TASKS; do
  data="$SHARED/data/glue/$task"
  model="$SHARED/models/minilm-$task"
  if [[ ! -d "$model" ]]; then
    model="$OUT/models/minilm-$task"
    [[ -d "$model" ]] || run "$KPRUNE" finetune task="$task" model=minilm data_dir="$data" output_dir="$model"
  fi
  run "$KPRUNE" run -m task="$task" model.path="$model" data_dir="$data" \
    pruner="$PRUNERS" rate="$RATES" seed="$SEEDS" calibration.num_tokens="$NUM_TOKENS" \
    output_dir="$OUT/$task" "${EXTRA[@]}" || status=$?
done
run "$KPRUNE" summarize "$OUT"
exit "$status"
