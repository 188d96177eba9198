"""Quantize MiniCPM-V 2.6 (our own modelling code, loaded from the original checkpoint folder) and optionally
evaluate it. ``--model_path tiny`` builds a tiny random checkpoint in the original format."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exam.common import main  # noqa: E402

if __name__ == "__main__":
    main("minicpmv", prog="quant_minicpmv.py")
