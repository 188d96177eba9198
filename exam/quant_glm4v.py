"""Quantize GLM-4V-9B (our own modelling code, loaded from the original checkpoint folder) and optionally evaluate
it. ``--model_path tiny`` builds a tiny random checkpoint in the original format."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exam.common import main  # noqa: E402

if __name__ == "__main__":
    main("glm4v", prog="quant_glm4v.py")
