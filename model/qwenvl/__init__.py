"""Qwen-VL-Chat (OpenCLIP-bigG ViT + resampler + Qwen-7B decoder), our own modelling code without remote code."""
