"""Pieces shared by the decoders this project implements itself (InternLM2, QWen): the cast-back RMSNorm,
RoPE on halves, the 4-D attention mask and greedy decoding with a KV cache."""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


class CastBackRMSNorm(nn.Module):
    """RMSNorm whose statistics run in float32 and whose result is cast back to the input dtype *before* the
    scale is applied, as in the original InternLM2 / InternViT-6B / QWen checkpoints' code; with
    ``cast_before_scale=False`` the scale is applied in float32 and the product cast back (GLM-4's code)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, cast_before_scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.cast_before_scale = cast_before_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if not self.cast_before_scale:
            return (self.weight * xf).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: [b, heads, s, d]; cos / sin: [b, s, d]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def rope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[b, s, dim]`` for NeoX-style RoPE, angles in float32 as the original tables."""
    freqs = position_ids.float()[..., None] * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_mask_4d(mask: torch.Tensor | None, batch: int, q_len: int, past: int, device) -> torch.Tensor:
    """Bool ``[b, 1, q, past + q]`` (True = may attend) from a 2-D padding mask over all keys (1 = real
    token) or None: causal, padding keys hidden. Every query may attend its own key, so the rows of
    padding tokens stay finite. A 4-D bool mask (AIFS's permuted causal mask) is returned as given."""
    if mask is not None and mask.dim() == 4:
        if mask.dtype != torch.bool:
            raise ValueError("a 4-D attention_mask must be bool (True = may attend)")
        return mask
    total = past + q_len
    qpos = torch.arange(past, total, device=device)[:, None]
    kpos = torch.arange(total, device=device)[None, :]
    allowed = (kpos <= qpos)[None, None].expand(batch, 1, q_len, total)
    if mask is not None:
        if mask.shape != (batch, total):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {(batch, total)} "
                             "(batch, cached + new tokens)")
        allowed = allowed & mask.bool()[:, None, None, :]
    return allowed | (kpos == qpos)[None, None]


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, eos: tuple[int, ...], attention_mask=None,
                    max_new_tokens: int = 32, pad_token_id: int | None = None, **prefill) -> torch.Tensor:
    """Greedy decoding with a KV cache through ``model(input_ids=..., attention_mask=..., position_ids=...,
    past_key_values=..., use_cache=True, **prefill)`` (``prefill``: e.g. ``pixel_values``, given to the
    first step only). Returns the prompt followed by the new tokens, like transformers' ``generate``;
    rows of a batch that finished are padded with ``pad_token_id`` (default: the first stop id)."""
    from transformers import DynamicCache

    stop = torch.tensor(list(eos), device=input_ids.device)
    pad = int(pad_token_id if pad_token_id is not None else stop[0])
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                **prefill)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids


@functools.lru_cache(maxsize=None)
def cache_kwarg(decoder_class: type) -> str:
    """A transformers decoder's name for the KV cache (transformers 5.24 renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"
