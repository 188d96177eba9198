#!/usr/bin/env bash
# The paper's latency table (time to first token: FP, dynamic W4A8, static W4A8 with MQuant) for one model family.
# It runs bench/ttft.py, which times real int8 execution (calibrated fake-quant linears realized as int8 kernels,
# docs/realquant.md) on random-weight language-model stacks at the family's widths; families whose widths it does
# not model are refused with exit 3, without printing any number.
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
case $FAMILY in
  qwen2vl) ;;
  *) echo "$(basename "$0"): $TTFT times random-weight Qwen2-VL language-model stacks (2B / 7B widths) and MiniVLM;" \
          "it has no $FAMILY widths yet, so there is nothing to measure for $FAMILY" >&2
     exit 3 ;;
esac
RUN_ROOT=$OUT/$FAMILY-$(basename "$CKPT")
mkdir -p "$RUN_ROOT"
if [[ $CKPT == tiny ]]; then  # a smoke run: one small layer, one round
  ARGS=(--part stack --widths 2B --layers 1 --visual 256 --repeats 1 --no_fuse)
else  # the paper's setting: large images at 7B widths (WIDTHS / LAYERS / VISUAL override)
  ARGS=(--part stack --widths "${WIDTHS:-7B}" --layers "${LAYERS:-2}" --visual "${VISUAL:-1024,4096}")
fi
"$PYTHON" "$TTFT" "${ARGS[@]}" --json "$RUN_ROOT/table_latency.json" | tee "$RUN_ROOT/table_latency.md"
