#!/usr/bin/env bash
# The paper's latency table (time to first token: FP, dynamic W4A8, static W4A8 with MQuant) for one model family.
# It needs real int8 execution -- frozen fake-quant linears realized as int8 kernels -- and its benchmark,
# bench/ttft.py; until they exist this script says so and exits 3 without printing any number.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/table_common.sh
source scripts/table_common.sh

TTFT=bench/ttft.py
usage() {
  cat <<USAGE
usage: scripts/table_latency.sh FAMILY [CHECKPOINT_FOLDER]

The paper's latency table: time to first token of FP, dynamic W4A8 and static W4A8 (MQuant) with real int8
kernels, through $TTFT. FAMILY: one of $FAMILIES; CHECKPOINT_FOLDER defaults to the family's folder under
weights/, MODEL=tiny uses the built-in tiny model. PYTHON=... (default .venv/bin/python), OUT=DIR (default
outputs/tables): the table goes to OUT/FAMILY-CHECKPOINT/table_latency.md.
USAGE
}
if [[ $# -lt 1 || $# -gt 2 || $1 == -h || $1 == --help ]]; then
  usage
  [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]] && exit 0
  exit 2
fi
FAMILY=$1
family_row "$FAMILY" || die "unknown family '$FAMILY': give one of $FAMILIES"
CKPT=${2:-${MODEL:-$DEFAULT_CKPT}}
[[ -n $CKPT ]] || die "the $FAMILY family has no default checkpoint folder: pass CHECKPOINT_FOLDER (or MODEL=tiny)"

if [[ ! -f $TTFT ]]; then
  echo "$(basename "$0"): the latency table needs $TTFT, the benchmark that times real int8 execution (frozen" \
       "fake-quant linears run as int8 kernels); this checkout has no $TTFT yet, so there is nothing to measure:" \
       "fake-quant runs are no faster than FP. The accuracy tables run now: scripts/table_main.sh and" \
       "scripts/table_ablation.sh." >&2
  exit 3
fi
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-outputs/tables}
RUN_ROOT=$OUT/$FAMILY-$(basename "$CKPT")
mkdir -p "$RUN_ROOT"
"$PYTHON" "$TTFT" --family "$FAMILY" --model_path "$CKPT" | tee "$RUN_ROOT/table_latency.md"
