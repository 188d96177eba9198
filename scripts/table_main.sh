#!/usr/bin/env bash
# The paper's main table for one model family: FP, then vision W8A8 / LLM W4A8 and vision W4A8 / LLM W4A8, each as
# RTN, GPTQ, rotation + GPTQ with dynamic per-token activations, static with one scale, and MQuant (static,
# MSQ + AIFS + RMS), on OCRBench, TextVQA_VAL, DocVQA_VAL and MME. `scripts/table_main.sh --help` for the options.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/table_common.sh
source scripts/table_common.sh

TABLE_SCRIPT=table_main.sh
TABLE_NAME=table_main
TABLE_TITLE="Main table"
TABLE_ABOUT="The paper's main table: FP, and for vision W8A8 / LLM W4A8 (v8_*) and vision W4A8 / LLM W4A8 (v4_*):
RTN, GPTQ (both with dynamic per-token activations), rotation + GPTQ with dynamic per-token activations,
rotation + GPTQ with static per-tensor activations and one scale, and MQuant (static, MSQ + AIFS + RMS);
each on OCRBench, TextVQA_VAL, DocVQA_VAL and MME with the reference repo's sample counts."
ALL_SETTINGS="fp v8_rtn v8_gptq v8_dynamic v8_static v8_mquant v4_rtn v4_gptq v4_dynamic v4_static v4_mquant"
TINY_SETTINGS="fp v4_rtn v4_mquant"

table_run "$@"
