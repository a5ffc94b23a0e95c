#!/usr/bin/env bash
# Train one bundle's shipped weights with its own train.json on the sample split, 1 CPU thread, into
# experiments/runs/shipped/<bundle>/ with its own MLflow store; then write the weights and their provenance into
# bundles/<bundle>/models/ (experiments/ship_weights.py). Extra arguments are config overrides, e.g.
#   bash experiments/train_shipped.sh edsr --amp bf16 --max_epochs 3 --max_train_seconds 3900
set -euo pipefail
bundle="$1"; shift
config="${CONFIG:-train}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/experiments/runs/shipped/$bundle${SUFFIX:-}"
mkdir -p "$out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
cd "$root"
start=$(date +%s)
.venv/bin/python -m monai.bundle run \
    --config_file "bundles/$bundle/configs/$config.json" --meta_file "bundles/$bundle/configs/metadata.json" \
    --bundle_root "bundles/$bundle" --dataset_dir "$root/data/samples" \
    --output_dir "$out/out" --ckpt_dir "$out/models" --tracking_uri "sqlite:///$out/mlflow.db" "$@"
echo "wall seconds: $(( $(date +%s) - start ))"
