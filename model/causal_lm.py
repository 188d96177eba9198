"""A text-only decoder LM (Llama / Qwen2 / Mistral layout), for measuring quantization on a language
model alone (e.g. the MiniVLM's SmolLM2-135M). It has one stack (the LM) and no visual tokens."""
from __future__ import annotations

import torch
from torch import nn

from fake_quant.spec import StackSpec, get, join

from .base import Loaded, ModelAdapter, Sample, Segment
from .llava import decoder_stack
from .registry import register


@register
class CausalLMAdapter(ModelAdapter):
    name = "causal_lm"
    architectures = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

    def load(self, model_path: str, device: str, dtype: torch.dtype) -> Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        return Loaded(model=model, processor=AutoTokenizer.from_pretrained(model_path), path=model_path)

    def stacks(self, model: nn.Module) -> list[StackSpec]:
        return [decoder_stack(model, "model", ())]

    def segments(self, model: nn.Module) -> list[Segment]:
        return [Segment("llm", tuple(join("model", f"layers.{i}") for i in range(len(get(model, "model.layers")))))]

    def build_inputs(self, loaded: Loaded, sample: Sample, device: str) -> dict:
        if sample.images:
            raise ValueError("a text-only language model takes no images")
        enc = loaded.processor(sample.question, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    def visual_token_mask(self, loaded: Loaded, inputs: dict) -> torch.Tensor:
        return torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
