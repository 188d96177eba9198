#!/usr/bin/env bash
# Check our FP GLM-4V against the checkpoint's own remote code (see scripts/check_glm4v_fp.py and docs/glm4v.md).
#   scripts/check_glm4v_fp.sh /path/to/glm-4v-9b image.jpg [question]
# OURS_PYTHON: this project's Python (default .venv/bin/python);
# REF_PYTHON: a Python whose transformers runs the checkpoint's remote code (transformers 4.44-4.48 with torchvision,
#   tiktoken and accelerate);
# WORK: where the steps leave their files (default outputs/check_glm4v_fp);
# DTYPE: bfloat16 (default), float16 or float32 (the strictest check); the reference step takes the same.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/check_glm4v_fp.sh MODEL_FOLDER IMAGE [QUESTION]}
IMAGE=${2:?usage: scripts/check_glm4v_fp.sh MODEL_FOLDER IMAGE [QUESTION]}
QUESTION=${3:-Describe the image in one sentence.}
OURS_PYTHON=${OURS_PYTHON:-.venv/bin/python}
REF_PYTHON=${REF_PYTHON:?set REF_PYTHON to a Python that runs the glm-4v-9b remote code (packages: see this script header)}
WORK=${WORK:-outputs/check_glm4v_fp}
DTYPE=${DTYPE:-bfloat16}
"$OURS_PYTHON" scripts/check_glm4v_fp.py ours --model_path "$MODEL" --image "$IMAGE" --question "$QUESTION" \
    --work "$WORK" --dtype "$DTYPE"
"$REF_PYTHON" scripts/check_glm4v_fp.py reference --model_path "$MODEL" --work "$WORK"
"$OURS_PYTHON" scripts/check_glm4v_fp.py compare --work "$WORK"
