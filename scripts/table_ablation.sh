#!/usr/bin/env bash
# The paper's ablation for one model family, vision W4A8 / LLM W4A8: the static per-tensor baseline with one scale,
# then + MSQ, + AIFS, + RMS (= MQuant), and the attention-sink scale set (ours) on top, on OCRBench, TextVQA_VAL,
# DocVQA_VAL and MME. `scripts/table_ablation.sh --help` for the options.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/table_common.sh
source scripts/table_common.sh

TABLE_SCRIPT=table_ablation.sh
TABLE_NAME=table_ablation
TABLE_TITLE="Ablation"
TABLE_ABOUT="The paper's ablation at vision W4A8 / LLM W4A8, rotation + GPTQ throughout: static per-tensor
activations with one scale (v4_static), + MSQ (v4_msq), + AIFS (v4_msq_aifs), + RMS (v4_mquant, MQuant), and
+ the attention-sink scale set, not in the paper (v4_mquant_sink); each on OCRBench, TextVQA_VAL, DocVQA_VAL and
MME with the reference repo's sample counts. v4_static and v4_mquant are the main table's runs (same folders)."
ALL_SETTINGS="v4_static v4_msq v4_msq_aifs v4_mquant v4_mquant_sink"
TINY_SETTINGS="v4_static v4_mquant v4_mquant_sink"

table_run "$@"
