"""Qwen2-VL and Qwen2.5-VL: layouts as data, plus loading and input building.

transformers 5.x nests the towers as ``model.visual`` / ``model.language_model``; 4.4x had
``visual`` / ``model`` at the top. Paths are resolved against the loaded model.

Qwen2-VL: LayerNorm ViT with a plain MLP (fc1/fc2); Qwen2.5-VL: RMSNorm ViT with a gated MLP
(gate/up/down). Both: Conv3d patch embedding, packed qkv, a merger whose ``ln_q`` normalizes
each patch before 2x2 neighbours are concatenated, and a Qwen2 LLM with M-RoPE.
"""
from __future__ import annotations

import torch
from torch import nn

from fake_quant.spec import AttentionSpec, BlockSpec, Reader, StackSpec, Writer, first_existing, get, join

from . import tiny
from .base import Loaded, ModelAdapter, Sample, Segment
from .registry import register

VISUAL_PATHS = ("model.visual", "visual")
LLM_PATHS = ("model.language_model", "model")


def _llm_path(model: nn.Module) -> str:
    for p in LLM_PATHS:
        try:
            get(model, join(p, "layers"))
            return p
        except AttributeError:
            continue
    raise ValueError(f"cannot find the language model's layers under any of {LLM_PATHS}")


def stacks(model: nn.Module) -> list[StackSpec]:
    cfg = model.config
    vcfg, tcfg = cfg.vision_config, getattr(cfg, "text_config", cfg)
    vis = first_existing(model, VISUAL_PATHS)
    llm = _llm_path(model)

    vblock0 = get(model, f"{vis}.blocks.0")
    vdim = vblock0.attn.qkv.in_features
    vheads = vcfg.num_heads
    merge = vcfg.spatial_merge_size ** 2
    gated = hasattr(vblock0.mlp, "gate_proj")
    vnorm = "rmsnorm" if "RMSNorm" in type(vblock0.norm1).__name__ else "layernorm"
    visual = StackSpec(
        name="visual",
        hidden_size=vdim,
        blocks=f"{vis}.blocks",
        block=BlockSpec(
            attn_norm="norm1",
            attn=AttentionSpec(num_heads=vheads, num_kv_heads=vheads, head_dim=vdim // vheads,
                               qkv="attn.qkv", o="attn.proj"),
            mlp_norm="norm2",
            mlp_in=("mlp.gate_proj", "mlp.up_proj") if gated else ("mlp.fc1",),
            mlp_out="mlp.down_proj" if gated else "mlp.fc2",
        ),
        norm_kind=vnorm,
        writers=(Writer(f"{vis}.patch_embed.proj", "conv"),),
        final_norm=f"{vis}.merger.ln_q",
        readers=(Reader(f"{vis}.merger.mlp.0", chunks=merge),),
    )

    heads, kv, hidden = tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.hidden_size
    emb = join(llm, "embed_tokens")
    head = "lm_head"
    tied = (emb, head) if get(model, head).weight is get(model, emb).weight else None
    language = StackSpec(
        name="llm",
        hidden_size=hidden,
        blocks=join(llm, "layers"),
        block=BlockSpec(
            attn_norm="input_layernorm",
            attn=AttentionSpec(num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                               q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                               o="self_attn.o_proj"),
            mlp_norm="post_attention_layernorm",
            mlp_in=("mlp.gate_proj", "mlp.up_proj"),
            mlp_out="mlp.down_proj",
        ),
        norm_kind="rmsnorm",
        writers=(Writer(emb, "embedding"), Writer(f"{vis}.merger.mlp.2")),
        final_norm=join(llm, "norm"),
        readers=(Reader(head),),
        tied=tied,
    )
    return [visual, language]


@register
class Qwen2VLAdapter(ModelAdapter):
    name = "qwen2vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    siblings = ("qwen2_5vl",)
    default_checkpoint = "Qwen2-VL-7B-Instruct"

    def _model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def _tiny(self, seed: int = 0) -> nn.Module:
        return tiny.qwen2vl_model(seed=seed)

    def load(self, model_path: str, device: str, dtype: torch.dtype) -> Loaded:
        if model_path == "tiny":
            model = self._tiny()
            processor = tiny.TinyQwenProcessor()
        else:
            from transformers import AutoProcessor

            model = self._model_class().from_pretrained(model_path, dtype=dtype).eval()
            processor = AutoProcessor.from_pretrained(model_path)
        model = model.to(device=device, dtype=dtype).eval()
        return Loaded(model=model, processor=processor, path=model_path)

    def stacks(self, model: nn.Module) -> list[StackSpec]:
        return stacks(model)

    def segments(self, model: nn.Module) -> list[Segment]:
        vis = first_existing(model, VISUAL_PATHS)
        llm = _llm_path(model)
        nv = len(get(model, f"{vis}.blocks"))
        nl = len(get(model, join(llm, "layers")))
        return [
            Segment("visual", (f"{vis}.patch_embed",)),
            Segment("visual", tuple(f"{vis}.blocks.{i}" for i in range(nv))),
            Segment("connector", (f"{vis}.merger",)),
            Segment("llm", tuple(join(llm, f"layers.{i}") for i in range(nl))),
        ]

    # VLMEvalKit's Qwen2-VL settings: a custom prompt for VQA datasets, and the image pixel budget
    # (OCRBench with a lower minimum). The tiny processor keeps its own small budget.
    CUSTOM_PROMPT = True
    VQA_PROMPT_SUFFIX = "\nPlease try to answer the question with short words or phrases if possible."

    def prompt(self, dataset_name: str, row: dict) -> str:
        if self.CUSTOM_PROMPT and any(k in dataset_name for k in ("OCRBench", "TextVQA", "DocVQA")):
            return str(row["question"]) + self.VQA_PROMPT_SUFFIX
        return super().prompt(dataset_name, row)

    @staticmethod
    def pixel_budget(dataset_name: str | None) -> dict | None:
        if dataset_name is None:
            return None
        lo = 10 * 10 * 28 * 28 if dataset_name == "OCRBench" else 1280 * 28 * 28
        return {"shortest_edge": lo, "longest_edge": 16384 * 28 * 28}

    def processor_kwargs(self, loaded: Loaded, sample: Sample) -> dict:
        budget = self.pixel_budget(sample.meta.get("dataset"))
        if budget is None or isinstance(loaded.processor, tiny.TinyQwenProcessor) or not sample.images:
            return {}
        return {"size": budget}

    def complete_inputs(self, loaded: Loaded, inputs: dict) -> dict:
        if "mm_token_type_ids" not in inputs:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == loaded.model.config.image_token_id).int()
        return inputs

    def visual_token_mask(self, loaded: Loaded, inputs: dict) -> torch.Tensor:
        cfg = loaded.model.config
        ids = inputs["input_ids"]
        return (ids == cfg.image_token_id) | (ids == cfg.video_token_id)


@register
class Qwen25VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    siblings = ("qwen2vl",)
    default_checkpoint = "Qwen2.5-VL-7B-Instruct"
    CUSTOM_PROMPT = False  # VLMEvalKit evaluates Qwen2.5-VL with the datasets' own prompts

    def _model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def _tiny(self, seed: int = 0) -> nn.Module:
        return tiny.qwen25vl_model(seed=seed)
