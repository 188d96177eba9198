"""The GLM-4 decoder of GLM-4V, without remote code.

Parameter names match the original keys under ``transformer.encoder``: ``layers.N.{input_layernorm,
self_attention.{query_key_value, dense}, post_attention_layernorm, mlp.{dense_h_to_4h, dense_4h_to_h}}`` and
``final_layernorm``. ``query_key_value`` packs [Q (32 heads) | K (2 groups) | V (2 groups)] rows, heads contiguous,
with a bias; KV group g serves query heads ``g * 16 .. g * 16 + 15``. ``dense_h_to_4h`` packs [gate | up] and the
MLP is ``dense_4h_to_h(silu(gate) * up)``. RMSNorms apply their scale in float32 before casting back.

RoPE is the original's ``original_rope`` variant: only the first half of each head (64 of 128 dims) is rotated,
in *interleaved* pairs (x[2i], x[2i+1]) by angle pos * base^(-2i/64), base 10000 * rope_ratio; the cos / sin table
is float32, cast to the model dtype for bf16 / fp16 as the original does. Angles come from the position ids given
(the image's 1600 tokens share one), never from the stored ``inv_freq`` buffer.

We write the decoder ourselves rather than load transformers' ``GlmModel`` with renamed keys: the packed
``query_key_value`` / ``dense_h_to_4h`` stay one layer each as in the checkpoint (and in dumps), the RMSNorm and
RoPE numerics follow the original in bf16, and transformers' ``GlmForCausalLM`` stays an independent reference for
the tests. It follows transformers' calling convention, which the quantization pipeline relies on:
``inputs_embeds``, ``position_ids``, a 2-D padding mask or a 4-D bool mask (True = may attend), a
:class:`transformers.DynamicCache`, and an output with ``last_hidden_state``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from fake_quant.aifs import attention as aifs_attention

from ..layers import CastBackRMSNorm, attention_mask_or_causal
from .config import ChatGLMConfig


def rope_tables(position_ids: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[b, s, rotary_dim // 2]``: one angle per interleaved pair, float32 angles."""
    theta = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=position_ids.device)
                            / rotary_dim))
    angles = position_ids.float()[..., None] * theta
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [b, heads, s, d]: pairs (2i, 2i+1) of the first ``2 * cos.shape[-1]`` dims rotated, the rest passed."""
    rot = 2 * cos.shape[-1]
    pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None], sin[:, None]
    rotated = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv, self.head_dim = cfg.num_attention_heads, cfg.num_kv_heads, cfg.kv_channels
        self.query_key_value = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.add_bias_linear or cfg.add_qkv_bias)
        self.dense = nn.Linear(cfg.projection_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x, attention_mask, position_embeddings, past_key_values=None):
        b, s, _ = x.shape
        hd, kv = self.head_dim, self.num_kv
        q, k, v = self.query_key_value(x).split([self.num_heads * hd, kv * hd, kv * hd], dim=-1)
        q = q.reshape(b, s, self.num_heads, hd).transpose(1, 2)
        k = k.reshape(b, s, kv, hd).transpose(1, 2)
        v = v.reshape(b, s, kv, hd).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # the cache holds the KV groups, not 32 heads
        group = self.num_heads // kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = aifs_attention(q, k, v, attn_mask=attention_mask,  # F.sdpa, AIFS-aware
                     is_causal=attention_mask is None and q.shape[2] > 1)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=cfg.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


def _norm(cfg: ChatGLMConfig) -> CastBackRMSNorm:
    return CastBackRMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, cast_before_scale=False)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = _norm(cfg)
        self.self_attention = SelfAttention(cfg, layer_idx)
        self.post_attention_layernorm = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None, **unused):
        x = hidden_states
        x = x + self.self_attention(self.input_layernorm(x), attention_mask, position_embeddings, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


class GLMTransformer(nn.Module):
    """The decoder (``transformer.encoder`` in the checkpoint): blocks and the final norm, fed embeddings."""

    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(GLMBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = _norm(cfg)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = False, output_hidden_states: bool = False, **unused) -> BaseModelOutputWithPast:
        x = inputs_embeds
        if not use_cache:
            past_key_values = None
        b, s, _ = x.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device).expand(b, -1)
        mask = attention_mask_or_causal(attention_mask, b, s, past, x.device)
        rope = rope_tables(position_ids, self.config.rotary_dim, 10000.0 * self.config.rope_ratio, x.dtype)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=rope, past_key_values=past_key_values)
            if hidden is not None:
                hidden.append(x)
        x = self.final_layernorm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)
