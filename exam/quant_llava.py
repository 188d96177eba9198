"""Quantize a LLaVA-layout model (DINOv2 tower, MLP projector, Llama-layout LM) with MQuant.

    python exam/quant_llava.py --model_path tiny --rotate --rotate_visual_clip --rotate_llm ... --quant ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exam.common import main  # noqa: E402

if __name__ == "__main__":
    main("llava")
