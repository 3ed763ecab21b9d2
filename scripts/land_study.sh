#!/usr/bin/env bash
# Copy a study queue's finished cells into the repository: the run records only (config.yaml,
# metrics.jsonl, summary.json, probes.jsonl), never checkpoints or logs, laid out as the queue's
# OUT so that scripts/microbatch_study.sh (COMMITTED) skips them in a later session.
#
#   scripts/land_study.sh multirun/microbatch_long results/microbatch_long/runs
set -euo pipefail
OUT=${1:?usage: land_study.sh QUEUE_OUT DEST}
DEST=${2:?usage: land_study.sh QUEUE_OUT DEST}
[ -d "$OUT" ] || { echo "land_study.sh: QUEUE_OUT=$OUT is not a folder" >&2; exit 2; }
landed=0
while IFS= read -r -d '' summary; do
  grep -qs '"status": "completed"' "$summary" || continue
  cell=$(dirname "${summary#"$OUT"/}")
  mkdir -p "$DEST/$cell"
  for f in config.yaml metrics.jsonl summary.json probes.jsonl; do
    [ -f "$OUT/$cell/$f" ] && cp "$OUT/$cell/$f" "$DEST/$cell/$f"
  done
  echo "landed $cell"; landed=$((landed + 1))
done < <(find "$OUT" -mindepth 3 -maxdepth 3 -name summary.json -print0 | sort -z)
echo "$landed finished cell(s) in $DEST"
