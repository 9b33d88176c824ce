#!/usr/bin/env bash
# The paper's runs: BYOL, SimSiam, DirectPred, DirectCopy and IsoLoss (with DirectPred's and
# DirectCopy's predictor), each with and without the EMA target, on CIFAR-10, CIFAR-100,
# STL-10 and Tiny ImageNet (40 runs). Each line is the seed's command line.
#
#   bash run_experiments.sh              # run them one after the other
#   DRY_RUN=1 bash run_experiments.sh    # only print the commands
#   SEEDS="1 2 3" bash run_experiments.sh  # several seeds (names get a _seed<k> suffix)
#   ONLY='^isoloss(-noema)?_cifar10$' bash run_experiments.sh  # the runs whose name matches the regex
#   CIFAR10_TRAIN=/data/c10/train CIFAR10_VAL=/data/c10/test bash run_experiments.sh
#       # one dataset's folders (also CIFAR100_*, STL10_*, TINYIMAGENET_*; the default is each
#       # config's ./datasets...); EXTRA="..." adds overrides to every run, so it must not name
#       # data paths (one path for all four datasets trained CIFAR-10 four times)
#   PYTHON=python3 bash run_experiments.sh  # the interpreter (default: .venv/bin/python if set up)
# A failed run does not stop the others; the script lists the failures and exits with 1.
# Afterwards: python -m ivreg.analysis.results_table trained_models
set -uo pipefail
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
FAILED=()
MATCHED=0
if [ -n "${ONLY:-}" ]; then
    [[ "" =~ $ONLY ]]
    if [ $? -eq 2 ]; then
        echo "error: ONLY='${ONLY}' is not a valid (extended) regular expression" >&2
        exit 2
    fi
fi

data_paths() {  # data_paths <dataset>: the overrides of its <DATASET>_TRAIN / <DATASET>_VAL
    local key
    key=$(echo "$1" | tr '[:lower:]' '[:upper:]')
    local train="${key}_TRAIN" val="${key}_VAL"
    [ -n "${!train:-}" ] && echo "data.train_path=${!train}"
    [ -n "${!val:-}" ] && echo "data.val_path=${!val}"
    return 0
}

run() {  # run <config folder> <config file> <dataset> <name> [overrides...]
    local folder=$1 config=$2 dataset=$3 name=$4
    shift 4
    [[ "$name" =~ ${ONLY:-.} ]] || return 0
    MATCHED=$((MATCHED + 1))
    local paths
    mapfile -t paths < <(data_paths "$dataset")
    for seed in ${SEEDS:-5}; do
        local suffix=""
        [ -n "${SEEDS:-}" ] && suffix="_seed${seed}"
        # shellcheck disable=SC2086  # EXTRA holds several overrides
        local cmd=("$PYTHON" main_pretrain.py --config-path "scripts/pretrain/${folder}/" --config-name "${config}"
            "data.dataset=${dataset}" "name=${name}${suffix}" "++seed=${seed}" "$@" "${paths[@]}" ${EXTRA:-})
        echo "${cmd[*]}"
        if [ -z "${DRY_RUN:-}" ] && ! "${cmd[@]}"; then
            FAILED+=("${name}${suffix}")
        fi
    done
}

DIRECTCOPY=(method_kwargs.dp_alpha=1 method_kwargs.eps_iso=0.25)

for pair in cifar:cifar10 cifar:cifar100 stl-10:stl10 tinyimagenet:tinyimagenet; do
    folder=${pair%%:*} dataset=${pair##*:}
    run "$folder" byol.yaml             "$dataset" "byol_${dataset}"
    run "$folder" byol-noema.yaml       "$dataset" "simsiam_${dataset}"
    run "$folder" directpred.yaml       "$dataset" "directpred_${dataset}"              optimizer.weight_decay=1e-4
    run "$folder" directpred-noema.yaml "$dataset" "directpred-noema_${dataset}"        optimizer.weight_decay=1e-4
    run "$folder" directpred.yaml       "$dataset" "directcopy_${dataset}"              optimizer.weight_decay=1e-4 "${DIRECTCOPY[@]}"
    run "$folder" directpred-noema.yaml "$dataset" "directcopy-noema_${dataset}"        optimizer.weight_decay=1e-4 "${DIRECTCOPY[@]}"
    run "$folder" isoloss.yaml          "$dataset" "isoloss_${dataset}"                 optimizer.weight_decay=1e-4
    run "$folder" isoloss-noema.yaml    "$dataset" "isoloss-noema_${dataset}"           optimizer.weight_decay=1e-4
    run "$folder" isoloss.yaml          "$dataset" "directcopy-isocopy_${dataset}"      optimizer.weight_decay=1e-4 "${DIRECTCOPY[@]}"
    run "$folder" isoloss-noema.yaml    "$dataset" "directcopy-isocopy-noema_${dataset}" optimizer.weight_decay=1e-4 "${DIRECTCOPY[@]}"
done

if [ "$MATCHED" -eq 0 ]; then
    echo "error: no run's name matches ONLY='${ONLY:-}' (names look like isoloss-noema_cifar10; DRY_RUN=1 lists them)" >&2
    exit 1
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]}" >&2
    exit 1
fi
