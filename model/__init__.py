"""Model adapters: one per MLLM family, described as data plus a few hooks."""
