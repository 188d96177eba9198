#!/usr/bin/env bash
# The GPU side of --real_quant in one run (about 6-8 minutes on one H100 / H200):
#   1. the int_mm / fp8 layer and model tests on the GPU (MQUANT_TEST_DEVICE=cuda): realized = fake quant there;
#   2. bench/ttft.py --device cuda: the prefill table at Qwen2-VL-7B widths, 2 random decoder layers, 4k and 19k
#      visual tokens plus 50 text tokens (BF16 against int8 and FP8, static / MSQ / AIFS / dynamic).
# Output: OUT/tests.log, OUT/ttft.md, OUT/ttft.json (OUT defaults to outputs/gpu).
# Needs: a CUDA GPU (FP8 rows: compute capability 8.9 or newer), torch with CUDA, and the packages of
# requirements.txt (transformers 5.24) for the Python that runs it (PYTHON, default python3). Only transformers
# is version-sensitive here (huggingface-hub >= 1.31, tokenizers 0.23, safetensors 0.8 are its needs). On a
# machine with another transformers and no index to install from, bring its wheel along
# (`pip download --no-deps transformers==5.24.0 -d wheels` where there is one) and run this after
# `pip install --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu_realquant.sh: no CUDA GPU visible to torch')"
export PYTHONUNBUFFERED=1
set +e
MQUANT_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_realize_scaled_mm.py \
  tests/test_realize_models.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
set -e
"$PY" bench/ttft.py --device cuda --widths "${WIDTHS:-7B}" --layers "${LAYERS:-2}" --visual "${VISUAL:-4096,19044}" \
  --repeats "${REPEATS:-7}" --json "$OUT/ttft.json" | tee "$OUT/ttft.md"
exit "$tests"
