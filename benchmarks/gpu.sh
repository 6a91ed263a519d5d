#!/usr/bin/env bash
# Throughput on one GPU (H100/H200), at most 8 minutes (three steps limited to 240 + 120 + 120 s; LIMITS="240 120 120"
# sets them, 0 skips a step; on one H200 step 1 took 158 s with half the inference images and without the device
# decoding measurements, seventh session; the limits since are estimates):
# training and inference images/s end to end for efficientnet_b0 at 224 px with bf16 and fp16 autocast and
# channels_last, from the JPEGs on disk (decoded by the loader workers, and decoded on the GPU by nvJPEG:
# --decode-on-device) and from the pre-resized uint8 image cache (its build time is reported beside it), against the
# bare model on tensors in memory.
#
#   bash benchmarks/gpu.sh                         # data: $MULTIMODAL_COMP5329 or ../shared/comp5329
#   DATA=/path/to/comp5329 OUT=/tmp/results bash benchmarks/gpu.sh
#
# Needs only torch, timm, accelerate, tokenizers, pandas, Pillow (torchvision comes with timm); nothing is
# downloaded (random weights). Each step has its own time limit, so a slow step cannot eat the others' time.
# Results: $OUT/throughput-gpu-{bf16,fp16,options}.json; the log is on stdout.
# On the lent GPU machine: benchmarks/device/README.md (`step.sh speed` runs this on the images carried there).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA=${DATA:-${MULTIMODAL_COMP5329:-../shared/comp5329}}
OUT=${OUT:-benchmarks/results}
CACHE=${CACHE_DIR:-${TMPDIR:-/tmp}/mm-image-cache}
CORES=$(nproc)
BATCH=${BATCH:-256}
read -r LIMIT1 LIMIT2 LIMIT3 <<< "${LIMITS:-240 120 120}"
mkdir -p "$OUT" "$CACHE"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, \
'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"
echo "cpu cores: $CORES, load: $(cut -d' ' -f1-3 /proc/loadavg)"

# DEVICE=cpu EXTRA=--smoke bash benchmarks/gpu.sh checks this script on a machine without a GPU, in seconds.
DEVICE=${DEVICE:-cuda}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
COMMON=(--data-dir "$DATA" --encoder efficientnet_b0 --sizes 224 --batch-size "$BATCH" --workers "$CORES"
        --device "$DEVICE" --channels-last --cache-dir "$CACHE" --cache-workers "$CORES" --warmup 5 --rounds 1)

status=0
step() {  # step N LIMIT command...: runs the command under its time limit; a limit of 0 skips it
    local n=$1 limit=$2; shift 2
    if [ "$limit" -le 0 ]; then echo "step $n skipped (limit 0)"; return; fi
    timeout "$limit" "$@" || { echo "step $n failed or timed out ($?)"; status=1; }
}
echo "== 1/3 bf16: training and inference, bare vs end to end (JPEG, nvJPEG, uint8 cache), data loader alone"
step 1 "$LIMIT1" "$PY" benchmarks/throughput.py "${COMMON[@]}" --precision bf16 --sections train,infer,loader \
    --train-batches 30 --infer-images 32768 --loader-images 16384 --keep-cache --label "gpu bf16 channels_last" \
    --output "$OUT/throughput-gpu-bf16.json" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}

echo "== 2/3 fp16: training and inference (cache reused when step 1 built it)"
step 2 "$LIMIT2" "$PY" benchmarks/throughput.py "${COMMON[@]}" --precision fp16 --sections train,infer --reuse-cache \
    --no-device-decode \
    --train-batches 30 --infer-images 32768 --label "gpu fp16 channels_last" \
    --output "$OUT/throughput-gpu-fp16.json" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}

echo "== 3/3 options on the GPU (bf16): channels_last, torch.compile (forward; the training step last), persistent workers"
step 3 "$LIMIT3" "$PY" benchmarks/throughput.py "${COMMON[@]}" --precision bf16 --sections options --no-cache \
    --option-batches 30 --loader-images 1024 --draft-sizes 224 --try-compile --label "gpu options" \
    --output "$OUT/throughput-gpu-options.json" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}

rm -f "$CACHE"/images-*.npy "$CACHE"/images-*.json  # the uint8 cache (GBs); KEEP: rerun step 1 to rebuild

echo "== two GPUs (not run by this script): training with Accelerate, batch $BATCH per process"
echo "accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 train.py --data-dir $DATA" \
     "--encoder efficientnet_b0 --no-pretrained --channels-last --batch-size $BATCH --workers $((CORES / 2))" \
     "--image-cache $CACHE --epochs 1 --output-dir /tmp/mm-2gpu --overwrite" \
     "  # the uint8 cache; on GPUs the training augmentation then runs batched on each GPU (--device-augment)"
exit $status
