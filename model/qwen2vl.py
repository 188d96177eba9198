"""Qwen2-VL / Qwen2.5-VL layout as data: where the vision blocks, the merger and the LLM layers are.

transformers 5.x nests the towers as ``model.visual`` / ``model.language_model``; 4.4x had
``visual`` / ``model`` at the top. Paths are resolved against the loaded model.
"""
from __future__ import annotations

from torch import nn

from fake_quant.spec import AttentionSpec, BlockSpec, Reader, StackSpec, Writer, first_existing, get, join

VISUAL_PATHS = ("model.visual", "visual")
LLM_PATHS = ("model.language_model", "model")


def _cfg(config, name):
    return getattr(config, name)


def stacks(model: nn.Module) -> list[StackSpec]:
    cfg = model.config
    vcfg, tcfg = cfg.vision_config, getattr(cfg, "text_config", cfg)
    vis = first_existing(model, VISUAL_PATHS)
    llm = first_existing(model, tuple(p for p in LLM_PATHS if _has_layers(model, p)))

    vdim = vcfg.embed_dim if hasattr(vcfg, "embed_dim") else vcfg.hidden_size
    vheads = vcfg.num_heads
    merge = vcfg.spatial_merge_size ** 2
    vblock0 = get(model, f"{vis}.blocks.0")
    gated = hasattr(vblock0.mlp, "gate_proj")  # Qwen2.5-VL: SwiGLU vision MLP and RMSNorm
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

    heads, kv = tcfg.num_attention_heads, tcfg.num_key_value_heads
    hidden = tcfg.hidden_size
    head = "lm_head"
    emb = join(llm, "embed_tokens")
    tied = None
    if get(model, head).weight is get(model, emb).weight:
        tied = (emb, head)
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


def _has_layers(model: nn.Module, path: str) -> bool:
    try:
        get(model, join(path, "layers"))
        return True
    except AttributeError:
        return False
