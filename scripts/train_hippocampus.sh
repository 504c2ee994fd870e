#!/usr/bin/env bash
# Train the `mri` bundle on MSD Task04 Hippocampus within a wall-clock budget, then evaluate its final
# weights with `medunet evaluate` (left-right test-time mirroring). The script only calls the product:
# the bundle is the trainer, the Predictor predicts, the evaluator reports.
#
#   scripts/train_hippocampus.sh [DATA_DIR] [OUTPUT_DIR] [more bundle ids, e.g. --time_budget 600]
#
# DATA_DIR defaults to ../shared/data/hippocampus (read in place, never copied), OUTPUT_DIR to
# runs/hippocampus. TIME_BUDGET (seconds, default 1680 = 28 min of training and validation) keeps the
# whole command under 30 min on 2 CPU cores. WORKERS=2 trains data-parallel through torchrun (gloo on
# the loopback interface, one thread and half the batch per process).
#
# Writes OUTPUT_DIR/eval (history.csv, training_curve.png, MLflow store, evaluation/ with metrics.csv,
# summary.json, results.md and best/worst overlays) and OUTPUT_DIR/models (model.pt + plan.json).
# The last line printed is `checkpoint=PATH`, loadable with
#   medunet segment --bundle bundles/mri --checkpoint PATH -i INPUT -o OUT
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${1:-$REPO/../shared/data/hippocampus}"
OUTPUT_DIR="${2:-$REPO/runs/hippocampus}"
shift $(( $# < 2 ? $# : 2 ))
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BUNDLE="$REPO/bundles/mri"
if [ ! -f "$DATA_DIR/dataset.json" ]; then
    echo "train_hippocampus.sh: error: $DATA_DIR: no dataset.json (expected the MSD Task04 layout)" >&2
    exit 2
fi
WORKERS="${WORKERS:-1}"
case "$WORKERS" in
    ''|*[!0-9]*|0) echo "train_hippocampus.sh: error: WORKERS=$WORKERS: expected a number >= 1" >&2; exit 2 ;;
esac
IDS=(--bundle_root "$BUNDLE" --dataset_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR/eval" --ckpt_dir "$OUTPUT_DIR/models")
cd "$REPO"
if [ "$WORKERS" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$WORKERS" -m monai.bundle run training \
        --config_file "['$BUNDLE/configs/train.json','$BUNDLE/configs/multi_gpu_train.json']" \
        --replan True --time_budget "${TIME_BUDGET:-1680}" "${IDS[@]}" "$@"
else
    "$PYTHON" -m monai.bundle run training --config_file "$BUNDLE/configs/train.json" \
        --replan True --time_budget "${TIME_BUDGET:-1680}" "${IDS[@]}" "$@"
fi
"$(dirname "$PYTHON")/medunet" evaluate "$BUNDLE" --dataset-dir "$DATA_DIR" --output-dir "$OUTPUT_DIR/eval" \
    --ckpt-dir "$OUTPUT_DIR/models" --set tta=true
echo "checkpoint=$OUTPUT_DIR/models/model.pt"
