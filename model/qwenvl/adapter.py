"""The Qwen-VL-Chat adapter: layouts as data, plus loading and input building.

Vision stack: the ViT's pre-LN blocks (``attn.in_proj`` interleaved per head, exact-GELU MLP). The stream
starts at ``ln_pre``, a LayerNorm over the patch embedding plus positions, whose affine part cannot absorb a
rotation: it is a ``norm`` writer (a weightless LayerNorm + a linear writing the stream). The stream keeps
its mean (``keep_mean``) because its reader, the resampler's ``kv_proj``, reads the raw stream after the last
block, with no norm in between.

Connector: the resampler, one cross-attention from 256 learned queries to the ViT tokens. It bridges the
two rotations -- ``kv_proj`` reads the rotated ViT stream (Q_v), ``proj`` writes the rotated LLM stream (Q)
-- and with ``--rotate_visual_cross_attn`` its attention gets the per-head V/O Hadamard (an
:class:`~fake_quant.spec.AttentionSite`). ``--quant_cross_attention`` quantizes ``kv_proj``, the three
in-projections, ``out_proj`` and ``proj`` with the visual settings.

LLM stack: QWen (``attn.c_attn`` packed [Q | K | V], ``attn.c_proj``, ``mlp.w1`` / ``w2`` / ``c_proj``,
RMSNorms, untied ``lm_head``), written by ``wte`` and the resampler's ``proj``. Visual tokens (MSQ, AIFS) are
the 256 slots of each ``<img>...</img>`` span.
"""
from __future__ import annotations

import torch
from torch import nn

from fake_quant.spec import AttentionSite, AttentionSpec, BlockSpec, Reader, StackSpec, Writer

from ..base import Loaded, ModelAdapter, Sample, Segment, to_device
from ..registry import register

VIS = "transformer.visual"


def vision_stack(model: nn.Module) -> StackSpec:
    v = model.config.visual
    return StackSpec(
        name="visual", hidden_size=v.width, blocks=f"{VIS}.transformer.resblocks",
        block=BlockSpec(
            attn_norm="ln_1",
            attn=AttentionSpec(num_heads=v.heads, num_kv_heads=v.heads, head_dim=v.head_dim, qkv="attn.in_proj",
                               o="attn.out_proj", qkv_layout="interleaved"),
            mlp_norm="ln_2", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
        ),
        norm_kind="layernorm",
        writers=(Writer(f"{VIS}.ln_pre", "norm"),),
        final_norm=None,
        readers=(Reader(f"{VIS}.attn_pool.kv_proj"),),
        keep_mean=True,
    )


def llm_stack(model: nn.Module) -> StackSpec:
    c = model.config
    return StackSpec(
        name="llm", hidden_size=c.hidden_size, blocks="transformer.h",
        block=BlockSpec(
            attn_norm="ln_1",
            attn=AttentionSpec(num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads,
                               head_dim=c.head_dim, qkv="attn.c_attn", o="attn.c_proj"),
            mlp_norm="ln_2", mlp_in=("mlp.w1", "mlp.w2"), mlp_out="mlp.c_proj",
        ),
        norm_kind="rmsnorm",
        writers=(Writer("transformer.wte", "embedding"), Writer(f"{VIS}.proj")),
        final_norm="transformer.ln_f",
        readers=(Reader("lm_head"),),
    )


@register
class QwenVLAdapter(ModelAdapter):
    name = "qwenvl"
    architectures = ("QWenLMHeadModel",)
    default_checkpoint = "Qwen-VL-Chat"

    def load(self, model_path: str, device: str, dtype: torch.dtype) -> Loaded:
        from .loading import load
        from .tiny import builtin_folder

        model, processor = load(builtin_folder() if model_path == "tiny" else model_path, device, dtype)
        return Loaded(model=model, processor=processor, path=model_path)

    def stacks(self, model: nn.Module) -> list[StackSpec]:
        if isinstance(model.transformer.visual.attn_pool.kv_proj, nn.Identity):
            raise ValueError("Qwen-VL with visual.width == output_dim (no kv_proj) cannot carry the ViT rotation "
                             "into the resampler")
        return [vision_stack(model), llm_stack(model)]

    def segments(self, model: nn.Module) -> list[Segment]:
        nv, nl = model.config.visual.layers, model.config.num_hidden_layers
        return [
            Segment("visual", (f"{VIS}.conv1",)),
            Segment("visual", tuple(f"{VIS}.transformer.resblocks.{i}" for i in range(nv))),
            Segment("connector", (f"{VIS}.attn_pool", f"{VIS}.ln_post", f"{VIS}.proj")),
            Segment("llm", tuple(f"transformer.h.{i}" for i in range(nl))),
        ]

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        v = model.config.visual
        heads = v.resampler_heads
        return [AttentionSite(f"{VIS}.attn_pool.attn",
                              AttentionSpec(num_heads=heads, num_kv_heads=heads, head_dim=v.output_dim // heads,
                                            q="q_proj", k="k_proj", v="v_proj", o="out_proj"))]

    def build_inputs(self, loaded: Loaded, sample: Sample, device: str) -> dict:
        inputs = loaded.processor(sample.question, list(sample.images))
        return to_device(loaded, inputs, device)

    def visual_token_mask(self, loaded: Loaded, inputs: dict) -> torch.Tensor:
        return loaded.model.image_slots(inputs["input_ids"])

    def decode(self, loaded: Loaded, token_ids: torch.Tensor) -> str:
        return loaded.processor.decode(token_ids[0])
