"""Quantize Qwen2-VL (or Qwen2.5-VL: chosen from the checkpoint's config.json) with MQuant.

    python exam/quant_qwen2vl.py --model_path tiny --rotate --rotate_visual_clip --rotate_llm ... --quant ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exam.common import main  # noqa: E402

if __name__ == "__main__":
    main("qwen2vl")
