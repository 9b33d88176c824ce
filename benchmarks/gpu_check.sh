#!/usr/bin/env bash
# The GPU check quoted in the notes, in one script for one device session. Sections, chosen
# with SECTIONS (default: aug steps accuracy, run in the order given). On an H100 (2026-11-27) the
# accuracy section took 392 s with ACCURACY_RUNS="isoloss-noema:9:16 byol:8:bf16
# isoloss-noema:3:bf16" and steps 123 s; aug had not finished after about 70 s, so split the
# sections over calls of at most 10 minutes:
#   aug       views/s of the per-image, batched eager and batched compiled pipelines; then, for
#             datasets kept on disk (ImageNet-sized JPEGs), of per-image workers against the
#             hybrid pipeline (workers decode and crop, colour ops batched on the GPU)
#   steps     steps/s of BYOL and IsoLoss without EMA (the timing), then a short profiled
#             run of each: kernel launches and host syncs per step, top CUDA ops, and from its
#             trace (benchmarks/trace_gaps.py) the GPU's busy share, launches per top-level CPU
#             op and the longest idle gaps (steps.txt; the traces in traces.tgz)
#   eigh      milliseconds per eigendecomposition of a 256x256 correlation matrix (the
#             spectral predictor's once per step; the issue measured 5 ms for eigh on the H100):
#             cuSOLVER and MAGMA, float32 and float64, on the host with the copies, and the
#             products-only Newton-Schulz alternative with its error; then the LARS update with
#             its trust ratios per tensor and gathered (eigh.txt; seconds)
#   compile   steps/s of IsoLoss without EMA and BYOL eager (one backbone pass per view, and
#             one for all views) and with CUDA graphs (compile mode reduce-overhead) of backbone
#             and projector, and of the whole forward step, with the graphs compiled and any
#             CUDA-graph skips and their reasons (compile.txt). Eight runs, most of the time
#             compiling; not yet timed on a GPU (estimated 6-8 minutes), COMPILE_VARIANTS
#             splits it over calls
#   accuracy  IsoLoss without EMA in fp16 (where the reference produced NaN; epochs.csv counts
#             the steps GradScaler skipped) and in bf16 (no GradScaler, so no skipped steps),
#             and BYOL (bf16), on full CIFAR-10, the 20-epoch schedule with 2 warmup epochs,
#             stopped after 9, 9 and 8 epochs; one file per run in $OUT holds its log, its
#             epochs.csv and, for the DirectPred-family runs, the projection geometry of the
#             last checkpoint. ACCURACY_RUNS="method:epochs:precision[:seed[:pipeline[:compile]]] ..."
#             chooses other runs (seed 5, pipeline auto, eager where not given; compile is
#             scope-mode), e.g. a seed sweep of IsoLoss without EMA:
#             ACCURACY_RUNS="isoloss-noema:9:bf16:1 isoloss-noema:9:bf16:2 isoloss-noema:9:bf16:3"
#             or the fast path against the worker pipeline, as the speed issue asks:
#             ACCURACY_RUNS="byol:4:bf16:5:resident:step-reduce-overhead byol:4:bf16:5:workers"
#   cudatests the tests that need CUDA (CI has none): batched augmentation and LARS on CUDA against the
#             CPU, eigh on the host and the timed auto choice, and one epoch of each of IsoLoss
#             and BYOL with every GPU default (resident data, kNN on it, background checkpoints,
#             bf16) (cudatests.txt; pytest is on the device image)
#   linear    main_linear.py for 2 epochs on the newest pretraining run (run it after accuracy,
#             or set LINEAR_CKPT), the training split on the GPU against per-image crops in
#             DataLoader workers (linear.txt)
# Everything lands in at most 7 + (number of runs) files under $OUT, each written as it goes,
# so a run cut off by a time limit still returns what it measured.
#   OUT=/tmp/gpu ARCHIVE=../shared/data/cifar10-jpeg.tar.xz bash benchmarks/gpu_check.sh
#   SECTIONS="steps" bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/ivreg_gpu_check}
ARCHIVE=${ARCHIVE:-../shared/data/cifar10-jpeg.tar.xz}
CACHE=${CACHE:-/tmp/ivreg_cifar10}
RUNS=${RUNS:-/tmp/ivreg_gpu_runs}
SECTIONS=${SECTIONS:-aug steps accuracy}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu (with EXTRA_ARGS="--accelerator cpu ...") dry-runs the script
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# line-buffered: a section cut off by the device's time limit keeps every line it printed
quiet() { grep --line-buffered -v -E "Warning|warn\(|^\s*$"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
for section in $SECTIONS; do
    start=$(date +%s)
    case $section in
    aug)
        python3 benchmarks/throughput.py --section aug --device "$DEVICE" 2>&1 | quiet | tee "$OUT/aug.txt"
        python3 benchmarks/throughput.py --section hybrid --device "$DEVICE" 2>&1 | quiet | tee -a "$OUT/aug.txt"
        ;;
    steps)
        python3 benchmarks/throughput.py --section steps --device "$DEVICE" --methods byol isoloss-noema 2>&1 \
            | quiet | tee "$OUT/steps.txt"
        python3 benchmarks/throughput.py --section steps --device "$DEVICE" --methods byol isoloss-noema \
            --steps 20 --profile --trace-dir "$RUNS/traces" 2>&1 | quiet | tee -a "$OUT/steps.txt"
        # GPU busy share, launches per top-level CPU op, longest idle gaps; the traces come back too
        python3 benchmarks/trace_gaps.py "$RUNS"/traces/trace_*.json --steps 20 2>&1 | tee -a "$OUT/steps.txt"
        tar czf "$OUT/traces.tgz" -C "$RUNS/traces" .
        ;;
    eigh)
        python3 benchmarks/throughput.py --section eigh --device "$DEVICE" 2>&1 | quiet | tee "$OUT/eigh.txt"
        python3 benchmarks/throughput.py --section lars --device "$DEVICE" 2>&1 | quiet | tee -a "$OUT/eigh.txt"
        ;;
    compile)
        # eager, one backbone pass per view (the reference's way) and one pass for all views
        # (the default), against the CUDA-graph paths (compile_mode reduce-overhead) of the two
        # compile scopes, on the same machine: backbone and projector compiled as modules, and
        # the whole forward step (two graphs, split at the eigendecomposition).
        # COMPILE_VARIANTS ("scope:mode ...", "eager" or "per-view") chooses others; a variant
        # may add config overrides after commas, e.g. "eager,++method_kwargs.eigh_on_host=True".
        for variant in ${COMPILE_VARIANTS:-per-view eager modules:reduce-overhead step:reduce-overhead}; do
            IFS=, read -r base overrides <<< "$variant"
            flags=""
            if [ "$base" = per-view ]; then
                flags="--batch-views False"
            elif [ "$base" != eager ]; then
                IFS=: read -r scope mode <<< "$base"
                flags="--compile --compile-scope $scope --compile-mode $mode"
            fi
            for override in ${overrides//,/ }; do
                flags="$flags --override $override"
            done
            # TORCH_LOGS=cudagraphs: why a graph did not run as a CUDA graph, if one did not
            TORCH_LOGS=cudagraphs python3 benchmarks/throughput.py --section steps --device "$DEVICE" \
                --methods isoloss-noema byol --steps 60 $flags 2>&1 | quiet | tee -a "$OUT/compile.txt"
        done
        ;;
    accuracy)
        for spec in ${ACCURACY_RUNS:-isoloss-noema:9:16 byol:8:bf16 isoloss-noema:9:bf16}; do
            IFS=: read -r method epochs precision seed pipeline compiled <<< "$spec"
            seed=${seed:-5}
            pipeline=${pipeline:-auto}
            compiled=${compiled:-eager}
            compile_flags=""
            if [ "$compiled" != eager ]; then  # scope-mode, e.g. step-reduce-overhead
                compile_flags="--compile ++performance.compile_scope=${compiled%%-*} ++performance.compile_mode=${compiled#*-}"
            fi
            log="$OUT/${method}_${precision}_seed${seed}_${pipeline}_${compiled}.txt"
            python3 benchmarks/cifar10_short.py --method "$method" --stop-after "$epochs" \
                --precision "$precision" --seed "$seed" --pipeline "$pipeline" --archive "$ARCHIVE" --cache "$CACHE" \
                --workers 12 --out "$RUNS" $compile_flags ${EXTRA_ARGS:-} 2>&1 | quiet | tee "$log"
            run_dir=$(ls -d "$RUNS"/cifar10_short_"${method}_${precision}_${pipeline}"_* | tail -1)  # the newest: this one
            { echo "== $run_dir/epochs.csv"; cat "$run_dir/epochs.csv"; } >>"$log" 2>&1
            case $method in  # bulk collapse, outliers' share of C, float16 margins
            isoloss* | directpred*)
                python3 -m ivreg.analysis.projections "$run_dir" --batches 2 2>&1 | quiet | tee -a "$log"
                ;;
            esac
        done
        ;;
    cudatests)
        python3 -m pytest -q -rs -p no:cacheprovider tests/test_predictors.py tests/data/test_batched_aug.py tests/test_optim.py \
            tests/test_train.py -k cuda 2>&1 | tee "$OUT/cudatests.txt"
        ;;
    linear)
        # main_linear.py on the newest pretraining run under $RUNS (the accuracy section's
        # last, or LINEAR_CKPT): 2 epochs with the training split on the GPU (resident) and
        # with per-image crops in 12 DataLoader workers; epochs.csv holds the epoch times
        ckpt=${LINEAR_CKPT:-$(ls -td "$RUNS"/cifar10_short_* 2>/dev/null | head -1)}
        for pipeline in resident workers; do
            rm -rf "$RUNS/linear/linear-$pipeline"
            # the CIFAR recipe (on the GPU, fp16), not main_linear.py's default digits one (CPU)
            python3 main_linear.py --config-path scripts/linear/cifar --config-name linear.yaml \
                pretrained_feature_extractor="$ckpt" max_epochs=2 data.pipeline=$pipeline \
                data.num_workers=12 checkpoint.dir="$RUNS/linear" name="linear-$pipeline" \
                ${LINEAR_ARGS:-} 2>&1 | quiet | tee -a "$OUT/linear.txt"
            { echo "== linear-$pipeline/epochs.csv"; cat "$RUNS/linear/linear-$pipeline/epochs.csv"; } >>"$OUT/linear.txt" 2>&1
        done
        ;;
    *)
        echo "unknown section $section (aug, steps, eigh, compile, accuracy, cudatests, linear)" >&2
        ;;
    esac
    echo "[$section: $(($(date +%s) - start)) s]" | tee -a "$OUT/gpu.txt"
done
