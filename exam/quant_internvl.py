"""Quantize InternVL2 (1B / 2B / 8B; our own modelling code, loaded from the original checkpoint folder)
and optionally evaluate it. ``--model_path tiny`` / ``tiny-qwen2`` build tiny random checkpoints."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exam.common import main  # noqa: E402

if __name__ == "__main__":
    main("internvl2", prog="quant_internvl.py")
