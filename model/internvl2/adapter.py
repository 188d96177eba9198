"""The InternVL2 adapter: layouts as data, plus loading and input building.

Vision stack: InternViT's pre-LN blocks (packed ``attn.qkv``, LayerScale ``ls1`` / ``ls2``), written by the
patch convolution, the class token and the position table, and read -- after the pixel shuffle has
concatenated 2x2 neighbours -- by ``mlp1.0``, a LayerNorm over the whole 4096-wide concatenation. The
stream keeps its mean (``keep_mean``): that LayerNorm subtracts the mean over all four tokens together,
which baking each token's own mean out of the stream would not reproduce; fused, it becomes a centering
RMSNorm and the rotation Q_v enters ``mlp1.1`` once per 1024-wide chunk.

LLM stack: InternLM2 (``attention.wqkv`` packed per KV group, ``attention.wo``, ``feed_forward.w1/w3/w2``,
RMSNorms, untied ``output``) or Qwen2 (InternVL2-1B), written by the token embedding and ``mlp1.3``.
"""
from __future__ import annotations

import torch
from torch import nn

from fake_quant.spec import AttentionSpec, BlockSpec, Reader, StackSpec, Writer, get

from ..base import Loaded, ModelAdapter, Sample, Segment, to_device
from ..llava import decoder_stack
from ..registry import register

LLM = "language_model.model"

# VLMEvalKit's InternVL2 settings: tiles per image by dataset (6 otherwise) and the short-answer prompt
MAX_TILES = (("OCRBench", 24), ("InfoVQA", 24), ("HRBench", 24), ("DocVQA", 18), ("ChartQA", 12), ("MMMU", 12))
SHORT_ANSWER = "Answer the question using a single word or phrase."


def vision_stack(model: nn.Module) -> StackSpec:
    cfg = model.config
    v = cfg.vision
    return StackSpec(
        name="visual", hidden_size=v.hidden_size, blocks="vision_model.encoder.layers",
        block=BlockSpec(
            attn_norm="norm1",
            attn=AttentionSpec(num_heads=v.num_attention_heads, num_kv_heads=v.num_attention_heads,
                               head_dim=v.head_dim, qkv="attn.qkv", o="attn.proj"),
            mlp_norm="norm2", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", attn_scale="ls1", mlp_scale="ls2",
        ),
        norm_kind="layernorm" if v.norm_type == "layer_norm" else "rmsnorm",
        writers=(Writer("vision_model.embeddings.patch_embedding", "conv"),
                 Writer("vision_model.embeddings.class_embedding", "param"),
                 Writer("vision_model.embeddings.position_embedding", "param")),
        final_norm="mlp1.0",
        readers=(Reader("mlp1.1", chunks=cfg.shuffle_factor),),
        keep_mean=True,
    )


def internlm2_stack(model: nn.Module) -> StackSpec:
    c = model.config.internlm2()
    return StackSpec(
        name="llm", hidden_size=c.hidden_size, blocks=f"{LLM}.layers",
        block=BlockSpec(
            attn_norm="attention_norm",
            attn=AttentionSpec(num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                               head_dim=c.head_dim, qkv="attention.wqkv", o="attention.wo", qkv_layout="grouped"),
            mlp_norm="ffn_norm", mlp_in=("feed_forward.w1", "feed_forward.w3"), mlp_out="feed_forward.w2",
        ),
        norm_kind="rmsnorm",
        writers=(Writer(f"{LLM}.tok_embeddings", "embedding"), Writer("mlp1.3")),
        final_norm=f"{LLM}.norm",
        readers=(Reader("language_model.output"),),
        tied=(f"{LLM}.tok_embeddings", "language_model.output")
        if get(model, "language_model.output").weight is get(model, f"{LLM}.tok_embeddings").weight else None,
    )


@register
class InternVL2Adapter(ModelAdapter):
    name = "internvl2"
    architectures = ("InternVLChatModel",)
    builtin_models = ("tiny", "tiny-qwen2")
    default_checkpoint = "InternVL2-8B"

    def load(self, model_path: str, device: str, dtype: torch.dtype) -> Loaded:
        from .loading import load
        from .tiny import builtin_folder

        folder = {"tiny": "internlm2", "tiny-qwen2": "qwen2"}.get(model_path)
        model, processor = load(builtin_folder(folder) if folder else model_path, device, dtype)
        return Loaded(model=model, processor=processor, path=model_path)

    def stacks(self, model: nn.Module) -> list[StackSpec]:
        llm = (internlm2_stack(model) if model.config.llm_kind == "internlm2"
               else decoder_stack(model, LLM, (Writer("mlp1.3"),), head="language_model.lm_head"))
        return [vision_stack(model), llm]

    def segments(self, model: nn.Module) -> list[Segment]:
        nv = len(model.vision_model.encoder.layers)
        nl = len(get(model, f"{LLM}.layers"))
        return [
            Segment("visual", ("vision_model.embeddings",)),
            Segment("visual", tuple(f"vision_model.encoder.layers.{i}" for i in range(nv))),
            Segment("connector", ("mlp1",)),
            Segment("llm", tuple(f"{LLM}.layers.{i}" for i in range(nl))),
        ]

    @staticmethod
    def max_tiles(dataset: str | None) -> int | None:
        """Tiles per image for a benchmark (VLMEvalKit's choice); None: the checkpoint's max_dynamic_patch."""
        if dataset is None:
            return None
        return next((n for key, n in MAX_TILES if key in dataset), 6)

    def build_inputs(self, loaded: Loaded, sample: Sample, device: str) -> dict:
        inputs = loaded.processor(sample.question, sample.images, max_num=self.max_tiles(sample.meta.get("dataset")))
        return to_device(loaded, inputs, device)

    def prompt(self, dataset_name: str, row: dict) -> str:
        q = str(row["question"])
        if "MME" in dataset_name:
            return f"{q} {SHORT_ANSWER}"
        if any(k in dataset_name for k in ("OCRBench", "TextVQA", "DocVQA", "ChartQA", "InfoVQA")):
            return f"{q}\n{SHORT_ANSWER}"
        return super().prompt(dataset_name, row)

    def visual_token_mask(self, loaded: Loaded, inputs: dict) -> torch.Tensor:
        return inputs["input_ids"] == loaded.model.img_context_token_id

    def decode(self, loaded: Loaded, token_ids: torch.Tensor) -> str:
        return loaded.processor.decode(token_ids[0])
