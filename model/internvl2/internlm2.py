"""InternLM2 / InternLM2.5 (the language model of InternVL2-2B, -8B and -26B), without remote code.

Parameter names match the original ``language_model.*`` keys: ``model.tok_embeddings``,
``model.layers.N.{attention_norm, attention.wqkv, attention.wo, ffn_norm, feed_forward.{w1, w3, w2}}``,
``model.norm`` and ``output``. ``wqkv`` packs grouped-query attention per KV head: its rows are
``num_key_value_heads`` groups of [G query heads; one key head; one value head] (G = heads / KV heads),
so query head ``j`` reads KV head ``j // G``.

The decoder follows the same calling convention as transformers' decoders, which is what the
quantization pipeline relies on: ``inputs_embeds``, ``position_ids``, a 2-D padding mask or a 4-D bool
mask (True = may attend), a :class:`transformers.DynamicCache`, and an output with ``last_hidden_state``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from fake_quant.aifs import attention as aifs_attention

from ..layers import CastBackRMSNorm as InternLM2RMSNorm
from ..layers import apply_rope, attention_mask_or_causal, rope_tables
from .config import InternLM2Config


class RotaryEmbedding(nn.Module):
    """RoPE on halves (``rotate_half``), with the config's ``rope_scaling``: ``linear`` divides positions by
    the factor; ``dynamic`` (NTK) raises the base once a sequence outgrows ``max_position_embeddings``
    (below that it is plain RoPE, which is where InternVL2's prompts live)."""

    def __init__(self, cfg: InternLM2Config) -> None:
        super().__init__()
        self.dim, self.base = cfg.head_dim, float(cfg.rope_theta)
        if self.dim % 2:
            raise ValueError(f"llm_config: head dim {self.dim} is odd; RoPE rotates halves of an even head dim")
        self.max_pos = cfg.max_position_embeddings
        scaling = cfg.rope_scaling or {}
        self.kind = scaling.get("type") or scaling.get("rope_type")
        self.factor = float(scaling.get("factor", 1.0))
        if self.kind not in (None, "default", "linear", "dynamic"):
            raise ValueError(f"llm_config.rope_scaling type {self.kind!r} is not supported (linear, dynamic)")

    def _inv_freq(self, seq_len: int, device) -> torch.Tensor:
        base = self.base
        if self.kind == "dynamic" and seq_len > self.max_pos:
            base = base * ((self.factor * seq_len / self.max_pos) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._inv_freq(int(position_ids.max()) + 1, position_ids.device)
        if self.kind == "linear":
            inv = inv / self.factor
        return rope_tables(position_ids, inv, dtype)


class InternLM2Attention(nn.Module):
    def __init__(self, cfg: InternLM2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"llm_config: {self.num_heads} heads cannot share {self.num_kv_heads} KV heads")
        self.groups = self.num_heads // self.num_kv_heads
        self.wqkv = nn.Linear(cfg.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.bias)

    def forward(self, hidden_states, attention_mask, position_embeddings, past_key_values=None):
        b, s, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states).reshape(b, s, self.num_kv_heads, self.groups + 2, self.head_dim)
        q = qkv[..., :self.groups, :].reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        k = k.repeat_interleave(self.groups, dim=1)
        v = v.repeat_interleave(self.groups, dim=1)
        out = aifs_attention(q, k, v, attn_mask=attention_mask,  # F.sdpa, AIFS-aware
                     is_causal=attention_mask is None and q.shape[2] > 1)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class InternLM2MLP(nn.Module):
    def __init__(self, cfg: InternLM2Config) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"llm_config.hidden_act {cfg.hidden_act!r} is not supported (silu)")
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)   # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)   # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)   # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, cfg: InternLM2Config, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = InternLM2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = InternLM2Attention(cfg, layer_idx)
        self.ffn_norm = InternLM2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = InternLM2MLP(cfg)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None, **unused):
        x = hidden_states
        x = x + self.attention(self.attention_norm(x), attention_mask, position_embeddings, past_key_values)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2Model(nn.Module):
    def __init__(self, cfg: InternLM2Config) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = InternLM2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache: bool = False, output_hidden_states: bool = False, **unused):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if not use_cache:
            past_key_values = None  # a cache is filled only when asked for
        b, s, _ = x.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device).expand(b, -1)
        mask = attention_mask_or_causal(attention_mask, b, s, past, x.device)
        rope = self.rotary(position_ids, x.dtype)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=rope, past_key_values=past_key_values)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        # the cache object is the caller's (it is filled in place); outputs do not carry it
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, cfg: InternLM2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def forward(self, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(**kwargs)
        return CausalLMOutputWithPast(logits=self.output(out.last_hidden_state))

