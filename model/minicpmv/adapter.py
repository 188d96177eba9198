"""The MiniCPM-V 2.6 adapter: layouts as data, plus loading, VLMEvalKit's per-dataset inputs and decoding.

Vision stack: SigLIP's pre-LN blocks (separate q / k / v / out projections, tanh-GELU MLP whose ``fc2`` reads
4304 = 1076 * 4 channels: an exact Hadamard), written by the patch convolution and the position table, read by
``post_layernorm`` -> the resampler's ``kv_proj``. Only norms read the stream, so the mean is baked out of its
writers and every LayerNorm becomes a weightless RMSNorm.

Connector: the resampler (64 learned queries, no query position; keys get the 2-D sin-cos table of the slice's
grid). ``kv_proj`` takes the tower rotation Q_v, ``proj`` writes the LLM stream in Q, and with
``--rotate_visual_cross_attn`` its attention gets the per-head V/O Hadamard. LLM stack: transformers' Qwen2
under ``llm.model``, untied ``llm.lm_head``. Visual tokens (MSQ, AIFS) are the 64 ``<unk>`` slots of every
``<image>`` and ``<slice>`` span.
"""
from __future__ import annotations

import math
import random

import torch
from torch import nn

from fake_quant.spec import AttentionSite, AttentionSpec, BlockSpec, Reader, StackSpec, Writer

from ..base import Loaded, ModelAdapter, Sample, Segment, to_device
from ..llava import decoder_stack
from ..registry import register

SHORT_ANSWER = "Answer the question using a single word or phrase."
OCR_COT = ("Read the following question carefully, solve it step by step, and then output the final answer in the "
           "format of \"Answer: single number or single word or phrase\".\n\n")
UPSIZE_AREA = 1344 * 1344  # VLMEvalKit enlarges smaller OCRBench images towards this many pixels


def vision_stack(model: nn.Module) -> StackSpec:
    v = model.config.vision
    return StackSpec(
        name="visual", hidden_size=v.hidden_size, blocks="vpm.encoder.layers",
        block=BlockSpec(
            attn_norm="layer_norm1",
            attn=AttentionSpec(num_heads=v.num_attention_heads, num_kv_heads=v.num_attention_heads,
                               head_dim=v.head_dim, q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                               o="self_attn.out_proj"),
            mlp_norm="layer_norm2", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2",
        ),
        norm_kind="layernorm",
        writers=(Writer("vpm.embeddings.patch_embedding", "conv"),
                 Writer("vpm.embeddings.position_embedding", "embedding")),
        final_norm="vpm.post_layernorm",
        readers=(Reader("resampler.kv_proj"),),
    )


def upsize(image, seed: int):
    """VLMEvalKit's OCRBench enlargement: a width drawn between w and w * sqrt(1344^2 / (w h)), the height kept in
    proportion. VLMEvalKit draws from one random stream seeded once, so its draws depend on the order rows are
    answered in; here each row draws from its own stream seeded by its index (reproducible on any subset)."""
    w, h = image.size
    if w * h >= UPSIZE_AREA:
        return image
    new_w = random.Random(seed).randint(w, int(w * math.sqrt(UPSIZE_AREA / (w * h))))
    return image.resize((new_w, int(new_w / w * h)))


@register
class MiniCPMVAdapter(ModelAdapter):
    name = "minicpmv"
    architectures = ("MiniCPMV",)
    default_checkpoint = "MiniCPM-V-2_6"
    beam_search = True

    def load(self, model_path: str, device: str, dtype: torch.dtype) -> Loaded:
        from .loading import load
        from .tiny import builtin_folder

        model, processor = load(builtin_folder() if model_path == "tiny" else model_path, device, dtype)
        return Loaded(model=model, processor=processor, path=model_path)

    def stacks(self, model: nn.Module) -> list[StackSpec]:
        return [vision_stack(model), decoder_stack(model, "llm.model", (Writer("resampler.proj"),), head="llm.lm_head")]

    def segments(self, model: nn.Module) -> list[Segment]:
        nv, nl = len(model.vpm.encoder.layers), len(model.llm.model.layers)
        return [
            Segment("visual", ("vpm.embeddings",)),
            Segment("visual", tuple(f"vpm.encoder.layers.{i}" for i in range(nv))),
            Segment("connector", ("resampler",)),
            Segment("llm", tuple(f"llm.model.layers.{i}" for i in range(nl))),
        ]

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        d = model.config.hidden_size
        return [AttentionSite("resampler.attn", AttentionSpec(num_heads=d // 128, num_kv_heads=d // 128, head_dim=128,
                                                             q="q_proj", k="k_proj", v="v_proj", o="out_proj"))]

    def prompt(self, dataset_name: str, row: dict) -> str:
        q = str(row["question"])
        return OCR_COT + q if "OCRBench" in dataset_name else q

    def build_inputs(self, loaded: Loaded, sample: Sample, device: str) -> dict:
        """VLMEvalKit's MiniCPM-V 2.6 inputs: the short-answer instruction first in the user turn for TextVQA /
        DocVQA (its "system prompt", which it passes as user text), OCRBench images enlarged."""
        dataset = sample.meta.get("dataset") or ""
        system = SHORT_ANSWER if any(k in dataset for k in ("TextVQA", "DocVQA")) else ""
        images = list(sample.images)
        if "OCRBench" in dataset:
            seed = int(sample.index) if str(sample.index).isdigit() else 0
            images = [upsize(im, seed) for im in images]
        inputs = loaded.processor(sample.question, images, system=system)
        return to_device(loaded, inputs, device)

    def visual_token_mask(self, loaded: Loaded, inputs: dict) -> torch.Tensor:
        return loaded.model.image_slots(inputs["input_ids"])

    def generate_kwargs(self, loaded: Loaded) -> dict:
        # VLMEvalKit decodes MiniCPM-V 2.6 with chat(sampling=False): beam search, 3 beams, repetition penalty 1.2
        return {"num_beams": 3, "repetition_penalty": 1.2}

    def decode(self, loaded: Loaded, token_ids: torch.Tensor) -> str:
        return loaded.processor.decode(token_ids[0])
