"""The QWen language model of Qwen-VL-Chat, without remote code.

Parameter names match the original keys: ``transformer.wte``, ``transformer.h.N.{ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.{w1, w2, c_proj}}``, ``transformer.ln_f`` and ``lm_head``. ``c_attn`` packs
[Q | K | V] (heads contiguous inside each) and has a bias; the MLP is ``c_proj(w1(x) * silu(w2(x)))``, so
``w2`` is the gate and ``w1`` the up projection. Past ``seq_length`` (2048) tokens the original stretches
RoPE by dynamic NTK (the factor fixed at prefill from the prompt length) and scales each query at position
j by log(j+1) / log(seq_length) (logn attention); both are reproduced, and both are inactive on
single-image VQA prompts (~300 tokens).

The decoder follows transformers' calling convention, which the quantization pipeline relies on:
``inputs_embeds``, ``position_ids``, a 2-D padding mask or a 4-D bool mask (True = may attend), a
:class:`transformers.DynamicCache`, and an output with ``last_hidden_state``. The vision tower is a child
of this module (its keys are ``transformer.visual.*``) but runs in :class:`~.modeling.QWenLMHeadModel`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from fake_quant.aifs import attention as aifs_attention

from ..layers import CastBackRMSNorm, apply_rope, attention_mask_or_causal, rope_tables
from .config import QWenConfig
from .vision import VisionTransformer


def ntk_alpha(seq_len: int, seq_length: int) -> float:
    """The original's dynamic-NTK factor for a prompt of ``seq_len`` tokens: 1 up to ``seq_length``, then
    3, 7, 15 ... per doubling."""
    return max(2 ** math.ceil(math.log(seq_len / seq_length, 2) + 1) - 1, 1)


class QWenAttention(nn.Module):
    def __init__(self, cfg: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x, attention_mask, position_embeddings, logn=None, past_key_values=None):
        b, s, _ = x.shape
        q, k, v = (t.reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(x).chunk(3, dim=-1))
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # cached keys: after RoPE, before logn
        if logn is not None:
            q = q * logn[:, None, :, None]
        out = aifs_attention(q, k, v, attn_mask=attention_mask,  # F.sdpa, AIFS-aware
                     is_causal=attention_mask is None and q.shape[2] > 1)
        return self.c_proj(out.transpose(1, 2).reshape(b, s, -1))


class QWenMLP(nn.Module):
    def __init__(self, cfg: QWenConfig) -> None:
        super().__init__()
        bias = not cfg.no_bias
        self.w1 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=bias)   # up
        self.w2 = nn.Linear(cfg.hidden_size, cfg.mlp_width, bias=bias)   # gate
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, cfg: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = CastBackRMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg, layer_idx)
        self.ln_2 = CastBackRMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, logn=None,
                past_key_values=None, **unused):
        x = hidden_states
        x = x + self.attn(self.ln_1(x), attention_mask, position_embeddings, logn, past_key_values)
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    def __init__(self, cfg: QWenConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(QWenBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = CastBackRMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.visual = VisionTransformer(cfg.visual)
        self._ntk_alpha = 1.0  # fixed at prefill, reused by the decoding steps that follow (as the original)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def _inv_freq(self, alpha: float, device) -> torch.Tensor:
        d = self.config.head_dim
        base = self.config.rotary_emb_base * alpha ** (d / (d - 2))
        return 1.0 / (base ** (torch.arange(0, d, 2, device=device).float() / d))

    def _logn(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        n = self.config.seq_length
        if not self.config.use_logn_attn or int(position_ids.max()) + 1 <= n:
            return None
        j = position_ids.double() + 1
        return torch.where(j > n, torch.log(j) / math.log(n), torch.ones_like(j)).float().to(dtype)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache: bool = False, output_hidden_states: bool = False, **unused):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if not use_cache:
            past_key_values = None
        b, s, _ = x.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device).expand(b, -1)
        if past == 0:
            self._ntk_alpha = ntk_alpha(s, self.config.seq_length) if self.config.use_dynamic_ntk else 1.0
        mask = attention_mask_or_causal(attention_mask, b, s, past, x.device)
        rope = rope_tables(position_ids, self._inv_freq(self._ntk_alpha, x.device), x.dtype)
        logn = self._logn(position_ids, x.dtype)
        hidden = [x] if output_hidden_states else None
        for layer in self.h:
            x = layer(x, attention_mask=mask, position_embeddings=rope, logn=logn, past_key_values=past_key_values)
            if hidden is not None:
                hidden.append(x)
        x = self.ln_f(x)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)
