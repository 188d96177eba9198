#!/usr/bin/env bash
# Check our FP InternVL2 against the checkpoint's own remote code (see docs/internvl.md).
#   scripts/check_internvl_fp.sh /path/to/InternVL2-8B image.jpg [question]
# OURS_PYTHON: this project's Python (default .venv/bin/python);
# REF_PYTHON: a Python whose transformers runs the checkpoint's remote code (4.37-4.45, with timm and einops).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/check_internvl_fp.sh MODEL_FOLDER IMAGE [QUESTION]}
IMAGE=${2:?usage: scripts/check_internvl_fp.sh MODEL_FOLDER IMAGE [QUESTION]}
QUESTION=${3:-Describe the image in one sentence.}
OURS_PYTHON=${OURS_PYTHON:-.venv/bin/python}
REF_PYTHON=${REF_PYTHON:?set REF_PYTHON to a Python that can run the checkpoint remote code}
WORK=${WORK:-outputs/check_internvl_fp}
"$OURS_PYTHON" scripts/check_internvl_fp.py ours --model_path "$MODEL" --image "$IMAGE" --question "$QUESTION" --work "$WORK"
"$REF_PYTHON" scripts/check_internvl_fp.py reference --model_path "$MODEL" --work "$WORK"
"$OURS_PYTHON" scripts/check_internvl_fp.py compare --work "$WORK"
