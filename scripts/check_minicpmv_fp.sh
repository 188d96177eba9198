#!/usr/bin/env bash
# Check our FP MiniCPM-V 2.6 against the checkpoint's own remote code (see scripts/check_minicpmv_fp.py).
#   scripts/check_minicpmv_fp.sh /path/to/MiniCPM-V-2_6 image.jpg [question]
# OURS_PYTHON: this project's Python (default .venv/bin/python);
# REF_PYTHON: a Python whose transformers runs the checkpoint's remote code (transformers 4.40-4.45 with torch,
#   torchvision, numpy < 2 and Pillow; accelerate optional);
# WORK: where the steps leave their files (default outputs/check_minicpmv_fp);
# DTYPE: bfloat16 (default), float16 or float32 (the strictest check); the reference step takes the same.
# Extra arguments for the ours step (e.g. --greedy, --max_new_tokens 64) go in OURS_ARGS; the reference follows.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/check_minicpmv_fp.sh MODEL_FOLDER IMAGE [QUESTION]}
IMAGE=${2:?usage: scripts/check_minicpmv_fp.sh MODEL_FOLDER IMAGE [QUESTION]}
QUESTION=${3:-Describe the image in one sentence.}
OURS_PYTHON=${OURS_PYTHON:-.venv/bin/python}
REF_PYTHON=${REF_PYTHON:?set REF_PYTHON to a Python that runs the MiniCPM-V-2_6 remote code (packages: see the header)}
WORK=${WORK:-outputs/check_minicpmv_fp}
DTYPE=${DTYPE:-bfloat16}
read -r -a EXTRA <<< "${OURS_ARGS:-}"
"$OURS_PYTHON" scripts/check_minicpmv_fp.py ours --model_path "$MODEL" --image "$IMAGE" --question "$QUESTION" \
    --work "$WORK" --dtype "$DTYPE" "${EXTRA[@]}"
"$REF_PYTHON" scripts/check_minicpmv_fp.py reference --model_path "$MODEL" --work "$WORK"
"$OURS_PYTHON" scripts/check_minicpmv_fp.py compare --work "$WORK"
