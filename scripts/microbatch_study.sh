#!/usr/bin/env bash
# The micro-batch study on a CPU: ResNet-20 and VGG-11 on real CIFAR-10, a fixed global batch of
# 64 split into K = 64/b virtual devices (configs/experiment/microbatch.yaml), so only the
# normalization statistics change between cells.
#
#   CIFAR10_ROOT=../shared/data/cifar10-jpg.tar.gz scripts/microbatch_study.sh [OUT]
#   python scripts/report.py OUT --out results/microbatch
#
#   CIFAR10_ROOT=... STUDY=long scripts/microbatch_study.sh [OUT]     # the long schedule
#   python scripts/report.py OUT --out results/microbatch_long
#
# STUDY=short (default): the fast screen, the first 20000 training images for 4 epochs (1,248
# optimizer steps; TRAIN_SUBSET and EPOCHS override them). STUDY=long: all 50000 images for 20
# epochs (15,620 steps, configs/experiment/microbatch_long.yaml), and its convergence check at
# 40 epochs (cells ending in _e40). BEST names the best published normalizer at b = 1 for the
# long study's second seed and 40-epoch cells (default mabn, the short study's).
#
# SELECT (an extended regex, default: every cell) keeps only the matching cells, e.g. the
# published micro-batch normalizers added later: SELECT='norm=(brn|frn|evonorm|mabn)', or the
# normalizer-free cells: SELECT='norm=nf' (nf and nf_agc), or issue 24's: SELECT='norm=(nf|online|cbn)'.
#
# NORM_TARGET runs the protocol's cells for a normalizer of your own instead of the built-in ones
# (norm=custom norm.target=NORM_TARGET; README: Python API), into folders custom-<Name>:
# short: b = 1, 2, 8, 64 on ResNet-20 and b = 1 on VGG-11, second seeds at b = 1; long: b = 1
# and 64 on ResNet-20, beside the built-in cells already in results/. Its options are its
# defaults (bind others in your module, e.g. MyNorm05 = functools.partial(MyNorm, eps=0.5)).
#   NORM_TARGET=examples.my_norm.BatchInstanceNorm CIFAR10_ROOT=... scripts/microbatch_study.sh
#
# OUT defaults to multirun/microbatch_cpu (multirun/microbatch_long); one folder per cell. The
# cells run from a queue, JOBS (default 2) at a time with one thread each, most important first,
# so a partial study already answers the main questions. Re-running resumes: finished cells are
# skipped, interrupted ones continue from their last epoch's checkpoint. Norms that cannot
# depend on b (gn, ln, in, synchronised bcn) get only a few b values. LOGGER sets logger.mode
# (default disabled). DRY_RUN=1 prints each cell's folder and overrides instead of running it.
# COMMITTED names a folder of records already in the repository, laid out like OUT (default:
# results/microbatch/runs, for STUDY=long results/microbatch_long/runs): a cell whose
# summary.json there says "completed" is skipped, so a study that spans sessions (each with a
# fresh OUT) never re-runs a landed cell (scripts/land_study.sh lands them). The short study's
# cells from before records were landed (2026-11-24 and -30) are rows of
# results/microbatch/runs_2026-11-30.csv only, and would run again.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
STUDY=${STUDY:-short}
case "$STUDY" in
  short) DEFAULT_OUT=multirun/microbatch_cpu
         SCHEDULE="experiment=microbatch data.train_subset=${TRAIN_SUBSET:-20000} trainer.epochs=${EPOCHS:-4} name=microbatch_cpu" ;;
  long)  DEFAULT_OUT=multirun/microbatch_long
         SCHEDULE="experiment=microbatch_long name=microbatch_long" ;;
  *) echo "STUDY=$STUDY: allowed: short, long" >&2; exit 2 ;;
esac
OUT=$(realpath -m "${1:-$DEFAULT_OUT}")
DEFAULT_COMMITTED=$HERE/results/microbatch/runs
[ "$STUDY" = long ] && DEFAULT_COMMITTED=$HERE/results/microbatch_long/runs
export COMMITTED=${COMMITTED:-${DEFAULT_COMMITTED:-}}
export PY=${PYTHON:-$HERE/.venv/bin/python} HERE OUT STUDY
: "${CIFAR10_ROOT:?set CIFAR10_ROOT to the CIFAR-10 data (pickles, image folder or .tar.gz)}"
export COMMON="$SCHEDULE data.root=$CIFAR10_ROOT data.download=false trainer.num_threads=1
  trainer.progress=false logger.mode=${LOGGER:-disabled}"

R20="model=resnet model.depth=20"
V11="model=vgg model.depth=11"
short_cells() {  # one cell a line: overrides, most important first
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
  # Issue 24's methods: normalizer-free nets (nf: no batch statistics, so b changes only the
  # float order; its b = 2 and 64 cells show it), nf with adaptive gradient clipping, Online
  # Normalization (per-device streams: b is how many samples a step streams) and Cross-Iteration
  # BN (per-device windows of k iterations' statistics).
  local new="nf nf_agc online cbn"
  for m in "$R20" "$V11"; do for n in $new; do echo "$m norm=$n batch_size_per_device=1 seed=0"; done; done
  for n in $new; do echo "$R20 norm=$n batch_size_per_device=64 seed=0"; done
  for n in $new; do for m in "$R20" "$V11"; do echo "$m norm=$n batch_size_per_device=1 seed=1"; done; done
  for n in nf online cbn; do echo "$R20 norm=$n batch_size_per_device=2 seed=0"; done
}

long_cells() {  # the long schedule (issue 20's list), most important first
  local n b best=${BEST:-mabn}
  # The main question: the two calibration cells (issue 20: 13.95 and 14.04% test error), BN's
  # degradation, and every method at one image per device.
  echo "$R20 norm=bn batch_size_per_device=64 seed=0"
  echo "$R20 norm=bcn_ws batch_size_per_device=1 seed=0"
  for b in 1 2; do echo "$R20 norm=bn batch_size_per_device=$b seed=0"; done
  for n in gn mabn evonorm_s0 frn brn; do echo "$R20 norm=$n batch_size_per_device=1 seed=0"; done
  # Issue 24's methods at b = 1 belong to the same question: Online Normalization,
  # Cross-Iteration BN, normalizer-free (b-independent), and normalizer-free with AGC.
  for n in online cbn nf nf_agc; do echo "$R20 norm=$n batch_size_per_device=1 seed=0"; done
  # and beside their b = 64 (nf: b-independent, b = 64 differs only in float order): the last
  # of issue 24's cells, queued here so that issue closes before issue 20's long tail.
  for n in online cbn nf; do echo "$R20 norm=$n batch_size_per_device=64 seed=0"; done
  # The rest at b = 1, BN between, the batch-dependent methods at b = 2.
  for n in gn_ws evonorm_b0 bn_ws ln in; do echo "$R20 norm=$n batch_size_per_device=1 seed=0"; done
  echo "$R20 norm=bcn_ws norm.sync_stats=false batch_size_per_device=1 seed=0"
  echo "$R20 norm=bn batch_size_per_device=8 seed=0"
  for n in mabn brn evonorm_b0 bn_ws; do echo "$R20 norm=$n batch_size_per_device=2 seed=0"; done
  # Seed spread, and each batch-dependent method beside its own large-batch reference.
  for n in bn:64 bcn_ws:1 "$best":1; do
    echo "$R20 norm=${n%:*} batch_size_per_device=${n#*:} seed=1"
  done
  for n in brn evonorm_b0 mabn bn_ws; do echo "$R20 norm=$n batch_size_per_device=64 seed=0"; done
  # How far from convergence: twice the schedule.
  for n in bn:64 bcn_ws:1 gn:1 "$best":1; do
    echo "$R20 norm=${n%:*} batch_size_per_device=${n#*:} seed=0 trainer.epochs=40"
  done
  for b in 64 1; do echo "$V11 norm=bn batch_size_per_device=$b seed=0"; done
  echo "$V11 norm=bcn_ws batch_size_per_device=1 seed=0"
}
custom_cells() {  # NORM_TARGET: a normalizer of your own, on the study's protocol
  local n="norm=custom norm.target=$NORM_TARGET" b
  if [ "$STUDY" = long ]; then
    for b in 1 64; do echo "$R20 $n batch_size_per_device=$b seed=0"; done; return
  fi
  for b in 1 64 2 8; do echo "$R20 $n batch_size_per_device=$b seed=0"; done
  echo "$V11 $n batch_size_per_device=1 seed=0"
  for m in "$R20" "$V11"; do echo "$m $n batch_size_per_device=1 seed=1"; done
}
cells() {
  if [ -n "${NORM_TARGET:-}" ]; then custom_cells
  elif [ "$STUDY" = long ]; then long_cells
  else short_cells; fi
}

# Step schedules that outlast the run (results/microbatch/README.md and
# results/microbatch_long/README.md say why). BRN relaxes r_max = 1, d_max = 0 from step 5k,
# reaching d_max at 25k and r_max at 40k. The short study keeps that shape as fractions of its
# 1,248 steps (12.5%, 62.5%, 100%); the long one keeps the paper's start at step 5,000 (the run
# holds it) and compresses the rest so that r_max is reached at min(40k, the run's last step)
# and d_max 4/7 of the way there, as in the paper. MABN's r starts after its 100-step warm-up
# instead of the authors' hard-coded 1000 steps.
study_overrides() {
  case "$*" in
    *norm=brn*)
      if [ "$STUDY" = short ]; then
        echo "norm.schedule_unit=run norm.renorm_from=0.125 norm.r_max_at=1.0 norm.d_max_at=0.625"
      else
        local epochs r
        epochs=$(grep -o 'trainer.epochs=[0-9]*' <<< "$*" | cut -d= -f2)
        r=$(( 50000 / 64 * ${epochs:-20} )); r=$(( r > 40000 ? 40000 : r ))
        echo "norm.renorm_from=5000 norm.r_max_at=$r norm.d_max_at=$(( 5000 + (r - 5000) * 4 / 7 ))"
      fi ;;
    *norm=mabn*) echo "norm.renorm_from=100" ;;
  esac
}
export -f study_overrides

run_cell() {  # one folder per cell: OUT/resnet20/bn_b1_s0, OUT/resnet20/bcn_ws_private_b1_s0,
  # OUT/resnet20/bn_b64_s0_e40, OUT/resnet20/custom-MyNorm_b1_s0 (norm.target=pkg.MyNorm), ...
  local dir
  dir="$OUT/$(sed -e 's/ norm.target=[^ ]*[.:\/]\([^ .:\/]*\)/-\1/' \
                  -e 's/model=//; s/ model.depth=//; s/ norm=/\//; s/ norm.sync_stats=false/_private/' \
                  -e 's/ batch_size_per_device=/_b/; s/ seed=/_s/; s/ trainer.epochs=/_e/' <<< "$*")"
  if [ -n "$COMMITTED" ] && grep -qs '"status": "completed"' "$COMMITTED/${dir#"$OUT"/}/summary.json"; then
    echo "committed ${dir#"$OUT"/} ($COMMITTED)" >&2; return
  fi
  if [ -n "${DRY_RUN:-}" ]; then
    echo "$dir" $COMMON "$@" $(study_overrides "$@"); return
  fi
  if grep -qs '"status": "completed"' "$dir/summary.json"; then
    echo "done   $* (finished earlier in $OUT)"; return  # its console.log stays as it was
  fi
  mkdir -p "$dir"
  if "$PY" "$HERE/train.py" $COMMON "$@" $(study_overrides "$@") "hydra.run.dir=$dir" \
      > "$dir/console.log" 2>&1; then
    echo "done   $* ($(tail -n 1 "$dir/console.log" | grep -o 'test loss.*' || true))"
  else
    echo "FAILED $* (see $dir/console.log)"
  fi
}
export -f run_cell

[ -n "${DRY_RUN:-}" ] || mkdir -p "$OUT"
cells | grep -E -- "${SELECT:-.}" | xargs -P "${JOBS:-2}" -L 1 bash -c 'run_cell "$@"' _
