"""MiniCPM-V 2.6 (SigLIP-so400m NaViT tower, 64-query resampler, Qwen2-7B) with our own modelling code."""
