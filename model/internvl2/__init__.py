"""InternVL2 (InternViT + pixel shuffle + mlp1 + InternLM2 / Qwen2), our own modelling code loadable from
the original checkpoint folders; the quantization adapter is :mod:`model.internvl2.adapter`."""
