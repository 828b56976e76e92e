#!/usr/bin/env bash
# Reproduce the embedded profile's tiny MoDA model: synthetic corpus -> training -> export.
#
#   bench/train_tiny.sh                 # full run: a few minutes of corpus + ~60 min training (1 thread)
#   SMOKE=1 bench/train_tiny.sh         # 1-minute smoke run into /tmp (checks the whole chain)
#
# Knobs (environment): N utterances (3000), SEED corpus seed (0), STEPS (13000), BATCH (64),
# MINUTES training wall-time cap (75), WORKERS corpus processes (2), THREADS torch threads (1,
# leaving the second core free),
# DATA corpus dir (out/moda-tiny/data), RUN run dir (out/moda-tiny/run),
# EXPORT (models/embedded/moda-tiny.safetensors), PY (.venv/bin/python).
# Re-running resumes training from $RUN/checkpoint.pt; the corpus is rebuilt only if $DATA is absent.
# Output: $EXPORT (+ .json with params, feature config, normalisation, null audio feature;
# + .onnx, the graph the live path runs on ONNX Runtime),
# $RUN/losses.csv + losses.png, then bench/eval_moda_tiny.py's table vs the procedural generator.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
if [[ "${SMOKE:-0}" == 1 ]]; then
  N=${N:-48}; STEPS=${STEPS:-100000}; MINUTES=${MINUTES:-1}; BATCH=${BATCH:-16}
  DATA=${DATA:-/tmp/moda-tiny-smoke/data}; RUN=${RUN:-/tmp/moda-tiny-smoke/run}
  EXPORT=${EXPORT:-/tmp/moda-tiny-smoke/moda-tiny.safetensors}; EVAL_ARGS="--heldout 2 --seeds 2"
else
  N=${N:-3000}; STEPS=${STEPS:-13000}; MINUTES=${MINUTES:-75}; BATCH=${BATCH:-64}
  DATA=${DATA:-out/moda-tiny/data}; RUN=${RUN:-out/moda-tiny/run}
  EXPORT=${EXPORT:-models/embedded/moda-tiny.safetensors}; EVAL_ARGS="--heldout 16 --seeds 3"
fi
SEED=${SEED:-0}; WORKERS=${WORKERS:-2}; THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS

echo "== corpus: $N utterances (seed $SEED) -> $DATA"
if [[ -f "$DATA/index.json" ]]; then
  echo "   (exists, reused)"
else
  "$PY" -m avatar_agent.train.cli prep --out "$DATA" --n "$N" --seed "$SEED" --workers "$WORKERS"
fi

echo "== train: preset tiny, $STEPS steps x $BATCH, <= $MINUTES min, $THREADS threads -> $RUN"
"$PY" -m avatar_agent.train.cli train --data "$DATA" --out "$RUN" --preset tiny \
  --steps "$STEPS" --batch "$BATCH" --max-minutes "$MINUTES" --threads "$THREADS" \
  --relative --p-tail-zero 0.5 \
  --export "$EXPORT"

echo "== ONNX graph of $EXPORT (what the live path runs; checked against torch)"
"$PY" -m avatar_agent.nn.moda_onnx "$EXPORT"

echo "== evaluate $EXPORT"
# shellcheck disable=SC2086
"$PY" bench/eval_moda_tiny.py --model "$EXPORT" $EVAL_ARGS
