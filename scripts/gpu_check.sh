#!/usr/bin/env bash
# GPU readiness: every CUDA path of the project in one command, under 8 minutes on one GPU.
#
#   scripts/gpu_check.sh [OUT] [options of scripts/gpu_check.py]
#
# OUT defaults to results/performance-gpu. Writes OUT/summary.json, OUT/README.md (the table,
# the command, the machine, the date), OUT/logs/ and OUT/bench/; exits non-zero naming the
# failed checks. `python scripts/gpu_check.py --help` lists the options (sizes, which checks).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=results/performance-gpu
if [ $# -gt 0 ] && [[ $1 != -* ]]; then OUT=$1; shift; fi
PY=${PYTHON:-$HERE/.venv/bin/python}
[ -x "$PY" ] || PY=python3   # a bare GPU machine with torch installed system-wide
exec "$PY" "$HERE/scripts/gpu_check.py" --device cuda --out "$OUT" "$@"
