#!/usr/bin/env bash
# The GPU check quoted in the notes: BYOL (bf16) and IsoLoss without EMA (fp16, where the
# reference produced NaN) on full CIFAR-10, the 20-epoch schedule with 2 warmup epochs,
# stopped after 8 and 9 epochs. Writes logs and epochs.csv files under $OUT.
#   OUT=/tmp/gpu ARCHIVE=../shared/data/cifar10-jpeg.tar.xz bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/ivreg_gpu_check}
ARCHIVE=${ARCHIVE:-../shared/data/cifar10-jpeg.tar.xz}
CACHE=${CACHE:-/tmp/ivreg_cifar10}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
for spec in "isoloss-noema 9 16" "byol 8 bf16"; do
    set -- $spec
    python3 benchmarks/cifar10_short.py --method "$1" --stop-after "$2" --precision "$3" \
        --archive "$ARCHIVE" --cache "$CACHE" --workers 12 --out "${RUNS:-/tmp/ivreg_gpu_runs}" ${EXTRA_ARGS:-} 2>&1 \
        | grep -v -E "Warning|warn\(|^\s*$" | tee "$OUT/$1.log"
    cp "$(ls -d "${RUNS:-/tmp/ivreg_gpu_runs}"/cifar10_short_"$1"_* | tail -1)/epochs.csv" "$OUT/$1_epochs.csv" 2>/dev/null
done
