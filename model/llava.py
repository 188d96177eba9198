"""LLaVA-layout models (``LlavaForConditionalGeneration``): a vision tower, a 2-layer MLP projector and a
decoder LM (Llama / Qwen2 / Mistral layout). Serves MiniVLM and llava-hf checkpoints with a DINOv2 tower.

The projector reads hidden states of the vision tower itself (``vision_feature_layer``: one layer, or several
concatenated), not a norm's output, so the tower's LayerNorms keep the stream's mean (``keep_mean``) instead of
baking it out. Every hidden state is the residual stream, so a residual rotation turns each concatenated copy
alike: the projector is a reader of ``len(vision_feature_layer)`` chunks.
"""
from __future__ import annotations

import torch
from torch import nn

from fake_quant.spec import AttentionSpec, BlockSpec, Reader, StackSpec, Writer, first_existing, get, join

from . import tiny
from .base import Loaded, ModelAdapter, Segment
from .registry import register

TOWER = ("model.vision_tower", "vision_tower")
PROJECTOR = ("model.multi_modal_projector", "multi_modal_projector")
LLM = ("model.language_model", "language_model.model")


def dinov2_stack(model: nn.Module, tower: str, readers: tuple[Reader, ...], final_norm: str | None = None,
                 keep_mean: bool = True) -> StackSpec:
    """A transformers ``Dinov2Model`` at ``tower`` (pre-LN blocks with LayerScale, class token, position table),
    read by ``readers`` -- after ``final_norm`` if given, else straight from the residual stream."""
    cfg = get(model, tower).config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    e = f"{tower}.embeddings"
    return StackSpec(
        name="visual", hidden_size=d, blocks=f"{tower}.encoder.layer",
        block=BlockSpec(
            attn_norm="norm1",
            attn=AttentionSpec(num_heads=heads, num_kv_heads=heads, head_dim=d // heads, q="attention.q_proj",
                               k="attention.k_proj", v="attention.v_proj", o="attention.o_proj"),
            mlp_norm="norm2", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2",
            attn_scale="layer_scale1", mlp_scale="layer_scale2",
        ),
        norm_kind="layernorm",
        writers=(Writer(f"{e}.patch_embeddings.projection", "conv"), Writer(f"{e}.cls_token", "param"),
                 Writer(f"{e}.mask_token", "param"), Writer(f"{e}.position_embeddings", "param")),
        final_norm=final_norm,
        readers=readers,
        keep_mean=keep_mean,
    )


def decoder_stack(model: nn.Module, llm: str, extra_writers: tuple[Writer, ...], head: str = "lm_head") -> StackSpec:
    """A Llama-layout decoder (q/k/v/o, gate/up/down, input/post-attention RMSNorm, final norm) read by ``head``."""
    cfg = get(model, llm).config
    heads, kv, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    emb = join(llm, "embed_tokens")
    return StackSpec(
        name="llm", hidden_size=hidden, blocks=join(llm, "layers"),
        block=BlockSpec(
            attn_norm="input_layernorm",
            attn=AttentionSpec(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, q="self_attn.q_proj",
                               k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj"),
            mlp_norm="post_attention_layernorm", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
        ),
        norm_kind="rmsnorm",
        writers=(Writer(emb, "embedding"), *extra_writers),
        final_norm=join(llm, "norm"),
        readers=(Reader(head),),
        tied=(emb, head) if get(model, head).weight is get(model, emb).weight else None,
    )


@register
class LlavaAdapter(ModelAdapter):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    builtin_models = ("tiny", "minivlm")

    def load(self, model_path: str, device: str, dtype: torch.dtype) -> Loaded:
        if model_path == "tiny":
            model, processor = tiny.llava_model(), tiny.TinyLlavaProcessor()
        elif model_path == "minivlm":
            from .minivlm.build import build

            model, processor = build()
        else:
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
            processor = AutoProcessor.from_pretrained(model_path)
        self._check(model)
        return Loaded(model=model.to(device=device, dtype=dtype).eval(), processor=processor, path=model_path)

    @staticmethod
    def _check(model: nn.Module) -> None:
        tower = get(model, first_existing(model, TOWER))
        if type(tower).__name__ != "Dinov2Model":
            raise ValueError(f"LLaVA with a {type(tower).__name__} vision tower is not supported yet (DINOv2 towers are)")

    def stacks(self, model: nn.Module) -> list[StackSpec]:
        tower, proj, llm = (first_existing(model, p) for p in (TOWER, PROJECTOR, LLM))
        layers = model.config.vision_feature_layer
        chunks = 1 if isinstance(layers, int) else len(layers)
        return [dinov2_stack(model, tower, (Reader(f"{proj}.linear_1", chunks),)),
                decoder_stack(model, llm, (Writer(f"{proj}.linear_2"),))]

    def segments(self, model: nn.Module) -> list[Segment]:
        tower, proj, llm = (first_existing(model, p) for p in (TOWER, PROJECTOR, LLM))
        nv, nl = len(get(model, f"{tower}.encoder.layer")), len(get(model, join(llm, "layers")))
        return [
            Segment("visual", (f"{tower}.embeddings.patch_embeddings",)),
            Segment("visual", tuple(f"{tower}.encoder.layer.{i}" for i in range(nv))),
            Segment("connector", (proj,)),
            Segment("llm", tuple(join(llm, f"layers.{i}") for i in range(nl))),
        ]

    def visual_token_mask(self, loaded: Loaded, inputs: dict) -> torch.Tensor:
        return inputs["input_ids"] == loaded.model.config.image_token_id
