#!/usr/bin/env bash
# The micro-batch study on a CPU: ResNet-20 and VGG-11 on real CIFAR-10, a fixed global batch of
# 64 split into K = 64/b virtual devices (configs/experiment/microbatch.yaml), so only the
# normalization statistics change between cells.
#
#   CIFAR10_ROOT=../shared/data/cifar10-jpg.tar.gz scripts/microbatch_study.sh [OUT]
#   python scripts/report.py OUT --out results/microbatch
#
# SELECT (an extended regex, default: every cell) keeps only the matching cells, e.g. the
# published micro-batch normalizers added later: SELECT='norm=(brn|frn|evonorm|mabn)'.
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
  # The published micro-batch normalizers: batch-dependent ones at b = 1, 2, 8, 64,
  # batch-independent ones at b = 1, 64; second seeds at b = 1 (ResNet-20 also at b = 64).
  local dependent="brn evonorm_b0 mabn" all="brn evonorm_b0 mabn frn evonorm_s0" m n b
  for m in "$R20" "$V11"; do
    for b in 1 64; do for n in $all; do echo "$m norm=$n batch_size_per_device=$b seed=0"; done; done
    for n in $dependent; do echo "$m norm=$n batch_size_per_device=2 seed=0"; done
    for n in $all; do echo "$m norm=$n batch_size_per_device=1 seed=1"; done
    if [ "$m" = "$R20" ]; then
      for n in $all; do echo "$m norm=$n batch_size_per_device=64 seed=1"; done
    fi
    for n in $dependent; do echo "$m norm=$n batch_size_per_device=8 seed=0"; done
  done
}

# Step schedules rescaled to this 1,248-step run (results/microbatch/README.md says why):
# BRN's relaxation keeps the paper's shape, its last milestone at the run's end (5k, 25k, 40k
# of 40k steps -> 12.5%, 62.5%, 100%); MABN's r starts after its 100-step warm-up instead of
# the authors' hard-coded 1000 steps.
study_overrides() {
  case "$*" in
    *norm=brn*) echo "norm.schedule_unit=run norm.renorm_from=0.125 norm.r_max_at=1.0 norm.d_max_at=0.625" ;;
    *norm=mabn*) echo "norm.renorm_from=100" ;;
  esac
}
export -f study_overrides

run_cell() {  # one folder per cell: OUT/resnet20/bn_b1_s0, OUT/resnet20/bcn_ws_private_b1_s0, ...
  local dir
  dir="$OUT/$(sed -e 's/model=//; s/ model.depth=//; s/ norm=/\//; s/ norm.sync_stats=false/_private/' \
                  -e 's/ batch_size_per_device=/_b/; s/ seed=/_s/' <<< "$*")"
  mkdir -p "$dir"
  if "$PY" "$HERE/train.py" $COMMON "$@" $(study_overrides "$@") "hydra.run.dir=$dir" \
      > "$dir/console.log" 2>&1; then
    echo "done   $* ($(tail -n 1 "$dir/console.log" | grep -o 'test loss.*' || true))"
  else
    echo "FAILED $* (see $dir/console.log)"
  fi
}
export -f run_cell

mkdir -p "$OUT"
cells | grep -E -- "${SELECT:-.}" | xargs -P "${JOBS:-2}" -L 1 bash -c 'run_cell "$@"' _
