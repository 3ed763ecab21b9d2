#!/usr/bin/env bash
# The micro-batch study on a CPU: ResNet-20 and VGG-11 on real CIFAR-10, a fixed global batch of
# 64 split into K = 64/b virtual devices (configs/experiment/microbatch.yaml), so only the
# normalization statistics change between cells.
#
#   CIFAR10_ROOT=../shared/data/cifar10-jpg.tar.gz scripts/microbatch_study.sh [OUT]
#   python scripts/report.py OUT --out results/microbatch
#
# OUT defaults to multirun/microbatch_cpu; one folder per cell. The cells run from a queue,
# JOBS (default 2) at a time with one thread each, most important first, so a partial study
# already answers the main questions. Re-running resumes: finished cells are skipped,
# interrupted ones continue from their checkpoints. Norms that cannot depend on b (gn, ln, in,
# synchronised bcn) get only a few b values. TRAIN_SUBSET, EPOCHS, JOBS and LOGGER override the
# schedule (defaults: the first 20000 training images, 4 epochs, 2 jobs, wandb disabled).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-multirun/microbatch_cpu}")
export PY=${PYTHON:-$HERE/.venv/bin/python} HERE OUT
: "${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 data (pickles, image folder or .tar.gz)}"
export COMMON="experiment=microbatch data.root=$CIFAR10_ROOT data.download=false
  data.train_subset=${TRAIN_SUBSET:-20000} trainer.epochs=${EPOCHS:-4} trainer.num_threads=1
  trainer.progress=false logger.mode=${LOGGER:-disabled} name=microbatch_cpu"

R20="model=resnet model.depth=20"
V11="model=vgg model.depth=11"
cells() {  # one cell a line: overrides, most important first
  for b in 1 64 2; do echo "$R20 norm=bn batch_size_per_device=$b seed=0"; done
  echo "$R20 norm=bcn_ws batch_size_per_device=1 seed=0"
  for b in 1 64; do echo "$R20 norm=gn batch_size_per_device=$b seed=0"; done
  for b in 1 64 2; do echo "$V11 norm=bn batch_size_per_device=$b seed=0"; done
  echo "$V11 norm=bcn_ws batch_size_per_device=1 seed=0"
  for b in 1 2 64; do echo "$R20 norm=bn batch_size_per_device=$b seed=1"; done
  echo "$R20 norm=bcn_ws batch_size_per_device=1 seed=1"
  for b in 4 8 16 32; do echo "$R20 norm=bn batch_size_per_device=$b seed=0"; done
  echo "$R20 norm=bcn_ws batch_size_per_device=64 seed=0"
  for b in 1 2 8 64; do echo "$R20 norm=bn_ws batch_size_per_device=$b seed=0"; done
  for b in 1 64; do echo "$R20 norm=bcn_ws norm.sync_stats=false batch_size_per_device=$b seed=0"; done
  for n in ln in gn_ws; do for b in 1 64; do echo "$R20 norm=$n batch_size_per_device=$b seed=0"; done; done
  for b in 2 8; do echo "$R20 norm=bcn_ws batch_size_per_device=$b seed=0"; done
  for b in 2 8; do echo "$R20 norm=bcn_ws norm.sync_stats=false batch_size_per_device=$b seed=0"; done
  for b in 1 64; do echo "$V11 norm=gn batch_size_per_device=$b seed=0"; done
  for b in 8 32; do echo "$V11 norm=bn batch_size_per_device=$b seed=0"; done
  echo "$V11 norm=bcn_ws batch_size_per_device=64 seed=0"
  for b in 1 2 64; do echo "$V11 norm=bn batch_size_per_device=$b seed=1"; done
  echo "$V11 norm=bcn_ws batch_size_per_device=1 seed=1"
}

run_cell() {  # one folder per cell: OUT/resnet20/bn_b1_s0, OUT/resnet20/bcn_ws_private_b1_s0, ...
  local dir
  dir="$OUT/$(sed -e 's/model=//; s/ model.depth=//; s/ norm=/\//; s/ norm.sync_stats=false/_private/' \
                  -e 's/ batch_size_per_device=/_b/; s/ seed=/_s/' <<< "$*")"
  mkdir -p "$dir"
  if "$PY" "$HERE/train.py" $COMMON "$@" "hydra.run.dir=$dir" > "$dir/console.log" 2>&1; then
    echo "done   $* ($(tail -n 1 "$dir/console.log" | grep -o 'test loss.*' || true))"
  else
    echo "FAILED $* (see $dir/console.log)"
  fi
}
export -f run_cell

mkdir -p "$OUT"
cells | xargs -P "${JOBS:-2}" -L 1 bash -c 'run_cell "$@"' _
