#!/usr/bin/env bash
# Plan, train, evaluate and report on MSD Task04 Hippocampus in one command (issue 9).
#
#   scripts/train_hippocampus.sh [DATA_DIR] [OUTPUT_DIR] [extra options for scripts/hippocampus_train.py]
#
# DATA_DIR defaults to ../shared/data/hippocampus (read in place, never copied), OUTPUT_DIR to
# runs/hippocampus. Default budget: 28 min of training wall time (the whole command stays under 30 min
# on 2 CPU cores). The last line printed is `checkpoint=PATH`, loadable with
#   medunet segment --bundle bundles/mri --checkpoint PATH INPUT -o OUT
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${1:-$REPO/../shared/data/hippocampus}"
OUTPUT_DIR="${2:-$REPO/runs/hippocampus}"
shift $(( $# < 2 ? $# : 2 ))
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if [ ! -f "$DATA_DIR/dataset.json" ]; then
    echo "train_hippocampus.sh: error: $DATA_DIR: no dataset.json (expected the MSD Task04 layout)" >&2
    exit 2
fi
exec "$PYTHON" "$REPO/scripts/hippocampus_train.py" --data-dir "$DATA_DIR" --output-dir "$OUTPUT_DIR" "$@"
