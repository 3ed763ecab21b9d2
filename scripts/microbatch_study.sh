#!/usr/bin/env bash
# The micro-batch study on CPU: a fixed global batch of 64 split into K = 64/b virtual devices
# (configs/experiment/microbatch.yaml), two jobs side by side with one thread each.
#
#   CIFAR10_ROOT=../shared/data/cifar10-jpg.tar.gz scripts/microbatch_study.sh [MODEL] [DEPTH]
#
# Re-running resumes: finished jobs are skipped, interrupted ones continue from their
# checkpoints. Cells are ordered so that a partial study already answers the main questions.
# Norms that cannot depend on b (gn, ln, in, synchronised bcn) get only a few b values.
set -euo pipefail
MODEL=${1:-resnet}
DEPTH=${2:-20}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
: "${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 data (pickles, image folder or .tar.gz)}"
COMMON=(experiment=microbatch "model=$MODEL" "model.depth=$DEPTH" "data.root=$CIFAR10_ROOT"
        data.download=false data.train_subset=${TRAIN_SUBSET:-20000} trainer.epochs=${EPOCHS:-4}
        trainer.num_threads=1 hydra/launcher=parallel logger.mode=${LOGGER:-disabled}
        "name=microbatch_${MODEL}${DEPTH}")

sweep() { "$PY" "$HERE/train.py" -m "${COMMON[@]}" "$@"; }

sweep norm=bn batch_size_per_device=1,2,64 seed=0
sweep norm=bcn_ws batch_size_per_device=1,64 seed=0
sweep norm=gn batch_size_per_device=1,64 seed=0
sweep norm=bn batch_size_per_device=4,8,16,32 seed=0
sweep norm=bn batch_size_per_device=1,2,64 seed=1
sweep norm=bcn_ws batch_size_per_device=1 seed=1
sweep norm=bn_ws batch_size_per_device=1,2,8,64 seed=0
sweep norm=bcn_ws batch_size_per_device=2,8 seed=0
sweep norm=bcn_ws norm.sync_stats=false batch_size_per_device=1,2,8,64 seed=0
sweep norm=gn_ws,ln,in batch_size_per_device=1,64 seed=0
