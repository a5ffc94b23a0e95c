#!/usr/bin/env bash
# Train one bundle's shipped weights with its own train.json on the sample split, 1 CPU thread, into
# experiments/runs/shipped/<bundle>/ with its own MLflow store; then write the weights and their provenance into
# bundles/<bundle>/models/ (experiments/ship_weights.py). Extra arguments are config overrides, e.g.
#   bash experiments/train_shipped.sh edsr --amp bf16 --max_epochs 3 --max_train_seconds 3900
# Environment: PYTHON (default .venv/bin/python), DATASET_DIR (default data/samples), RUNS_DIR (default
# experiments/runs/shipped), SUFFIX (appended to the run folder's name). On a CUDA machine train.json picks the GPU
# itself; give the loader workers there (--num_workers 4), since one process cannot keep a GPU busy.
set -euo pipefail
bundle="$1"; shift
config="${CONFIG:-train}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${RUNS_DIR:-$root/experiments/runs/shipped}/$bundle${SUFFIX:-}"
py="${PYTHON:-.venv/bin/python}"
data="${DATASET_DIR:-$root/data/samples}"
mkdir -p "$out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
cd "$root"
start=$(date +%s)
"$py" -m monai.bundle run \
    --config_file "bundles/$bundle/configs/$config.json" --meta_file "bundles/$bundle/configs/metadata.json" \
    --bundle_root "bundles/$bundle" --dataset_dir "$data" \
    --output_dir "$out/out" --ckpt_dir "$out/models" --tracking_uri "sqlite:///$out/mlflow.db" "$@"
echo "wall seconds: $(( $(date +%s) - start ))"
