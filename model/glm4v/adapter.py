"""The GLM-4V adapter: layouts as data, plus loading and input building.

Vision stack: EVA2-CLIP's blocks have their LayerNorms on the branch *outputs* (``h = x + LN(attn(x))``), so the
stack declares ``branch_output_norms``: its norms stay, no residual rotation is possible, and
``--rotate_visual_clip`` applies what stays exact -- the per-head V/O Hadamard (``query_key_value`` blocked,
16 heads of 112), the online Hadamard before ``fc2`` with ``--online_visual_hadamard``, and with
``--online_visual_input_hadamard`` before ``query_key_value`` and ``fc1`` too.

Connector: the 2x2 stride-2 ``conv`` (a linear over 2x2 patches once quantized) and the GLU ``linear_proj``,
quantized with ``--quant_cross_attention``. It has no attention.

LLM stack: GLM-4 (``self_attention.query_key_value`` packed [Q | K | V] with 2 KV groups, ``self_attention.dense``,
``mlp.dense_h_to_4h`` packed [gate | up], ``mlp.dense_4h_to_h``, RMSNorms, untied ``output_layer``), written by the
word embedding, the GLU's ``dense_4h_to_h`` and the begin / end-of-image vectors. Visual tokens (MSQ, AIFS) are the
image's 1600 features in the merged sequence; boi / eoi count as text.
"""
from __future__ import annotations

import torch
from torch import nn

from fake_quant.spec import AttentionSpec, BlockSpec, Reader, StackSpec, Writer

from ..base import Loaded, ModelAdapter, Sample, Segment, to_device
from ..registry import register
from .config import ARCHITECTURE

VIS = "transformer.vision"
SHORT_ANSWER = "\nShort Answer."  # VLMEvalKit's GLM4v, for multiple-choice and yes / no datasets


def vision_stack(model: nn.Module) -> StackSpec:
    v = model.config.vision
    return StackSpec(
        name="visual", hidden_size=v.hidden_size, blocks=f"{VIS}.transformer.layers",
        block=BlockSpec(
            attn_norm="input_layernorm",
            attn=AttentionSpec(num_heads=v.num_heads, num_kv_heads=v.num_heads, head_dim=v.head_dim,
                               qkv="attention.query_key_value", o="attention.dense"),
            mlp_norm="post_attention_layernorm", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2",
        ),
        norm_kind="layernorm",
        writers=(Writer(f"{VIS}.patch_embedding.proj", "conv"), Writer(f"{VIS}.patch_embedding.cls_embedding", "param"),
                 Writer(f"{VIS}.patch_embedding.position_embedding", "embedding")),
        final_norm=None,
        readers=(),  # the conv reads the raw stream; with no residual rotation it needs nothing
        branch_output_norms=True,
    )


def llm_stack(model: nn.Module) -> StackSpec:
    c = model.config
    return StackSpec(
        name="llm", hidden_size=c.hidden_size, blocks="transformer.encoder.layers",
        block=BlockSpec(
            attn_norm="input_layernorm",
            attn=AttentionSpec(num_heads=c.num_attention_heads, num_kv_heads=c.num_kv_heads, head_dim=c.kv_channels,
                               qkv="self_attention.query_key_value", o="self_attention.dense"),
            mlp_norm="post_attention_layernorm", mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
        ),
        norm_kind="rmsnorm",
        writers=(Writer("transformer.embedding.word_embeddings", "embedding"),
                 Writer(f"{VIS}.linear_proj.dense_4h_to_h"), Writer(f"{VIS}.boi", "param"), Writer(f"{VIS}.eoi", "param")),
        final_norm="transformer.encoder.final_layernorm",
        readers=(Reader("transformer.output_layer"),),
    )


@register
class GLM4VAdapter(ModelAdapter):
    name = "glm4v"
    architectures = (ARCHITECTURE,)
    default_checkpoint = "glm-4v-9b"

    @classmethod
    def matches(cls, config: dict) -> bool:
        # text-only GLM-4 / ChatGLM checkpoints share the architecture name
        return super().matches(config) and isinstance(config.get("vision_config"), dict)

    def load(self, model_path: str, device: str, dtype: torch.dtype) -> Loaded:
        from .loading import load
        from .tiny import builtin_folder

        model, processor = load(builtin_folder() if model_path == "tiny" else model_path, device, dtype)
        return Loaded(model=model, processor=processor, path=model_path)

    def stacks(self, model: nn.Module) -> list[StackSpec]:
        return [vision_stack(model), llm_stack(model)]

    def segments(self, model: nn.Module) -> list[Segment]:
        nv, nl = model.config.vision.num_hidden_layers, model.config.num_layers
        return [
            Segment("visual", (f"{VIS}.patch_embedding",)),
            Segment("visual", tuple(f"{VIS}.transformer.layers.{i}" for i in range(nv))),
            # the tower's output is reshaped to a grid before the conv, and the conv's flattened before the
            # GLU: two segments, each capturing its own inputs
            Segment("connector", (f"{VIS}.conv",)),
            Segment("connector", (f"{VIS}.linear_proj",)),
            Segment("llm", tuple(f"transformer.encoder.layers.{i}" for i in range(nl))),
        ]

    def build_inputs(self, loaded: Loaded, sample: Sample, device: str) -> dict:
        inputs = loaded.processor(sample.question, list(sample.images))
        return to_device(loaded, inputs, device)

    def prompt(self, dataset_name: str, row: dict) -> str:
        """VLMEvalKit's GLM4v: the dataset's own prompt, plus "\\nShort Answer." for multiple-choice and yes / no
        datasets (MME among them)."""
        from evaluation.eval import dataset_prompt

        q = dataset_prompt(dataset_name, row)
        if _yes_no_or_choice(dataset_name, row):
            return q + SHORT_ANSWER
        return q

    def visual_token_mask(self, loaded: Loaded, inputs: dict) -> torch.Tensor:
        ids = inputs["input_ids"]
        if inputs.get("pixel_values") is None:
            return torch.zeros_like(ids, dtype=torch.bool)
        return loaded.model.image_token_mask(ids)

    def decode(self, loaded: Loaded, token_ids: torch.Tensor) -> str:
        return loaded.processor.decode(token_ids[0])


def _yes_no_or_choice(dataset_name: str, row: dict) -> bool:
    """VLMEvalKit's DATASET_TYPE in ('MCQ', 'Y/N') for the datasets this project reads: MME and the other yes / no
    sets, and any row with lettered options."""
    if any(k in dataset_name for k in ("MME", "HallusionBench", "POPE", "AMBER", "SynthBench_YN")):
        return True
    return "A" in row and "B" in row
