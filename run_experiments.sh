#!/usr/bin/env bash
# The paper's runs: BYOL, SimSiam, DirectPred, DirectCopy and IsoLoss (with DirectPred's and
# DirectCopy's predictor), each with and without the EMA target, on CIFAR-10, CIFAR-100,
# STL-10 and Tiny ImageNet (40 runs). Each line is the seed's command line.
#
#   bash run_experiments.sh              # run them one after the other
#   DRY_RUN=1 bash run_experiments.sh    # only print the commands
#   SEEDS="1 2 3" bash run_experiments.sh  # several seeds (names get a _seed<k> suffix)
#   EXTRA="data.train_path=/data data.val_path=/data" bash run_experiments.sh
# Afterwards: python -m ivreg.analysis.results_table trained_models
set -euo pipefail
cd "$(dirname "$0")"

run() {  # run <config folder> <config file> <dataset> <name> [overrides...]
    local folder=$1 config=$2 dataset=$3 name=$4
    shift 4
    for seed in ${SEEDS:-5}; do
        local suffix=""
        [ -n "${SEEDS:-}" ] && suffix="_seed${seed}"
        local cmd=(python3 main_pretrain.py --config-path "scripts/pretrain/${folder}/" --config-name "${config}"
            "data.dataset=${dataset}" "name=${name}${suffix}" "++seed=${seed}" "$@" ${EXTRA:-})
        echo "${cmd[*]}"
        [ -n "${DRY_RUN:-}" ] || "${cmd[@]}"
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
