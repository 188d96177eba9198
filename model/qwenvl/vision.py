"""Qwen-VL's vision tower: an OpenCLIP-bigG-style ViT and the 256-query cross-attention resampler.

Parameter names match the original ``transformer.visual.*`` keys, except the resampler's packed attention
in-projection and ``proj``, which the loader maps (:mod:`model.resampler`).

The ViT blocks keep their packed ``attn.in_proj`` whose rows are interleaved per head: row
``h * 3 * head_dim + j * head_dim + d`` is component j (q, k, v) of head h.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..resampler import ResamplerAttention
from .config import VisualConfig

EPS = 1e-6  # every norm of the tower (the original builds them with partial(LayerNorm, eps=1e-6))


def get_abs_pos(table: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """A square position table ``[L, C]`` resized to ``tgt_len`` positions: bicubic in float32 (align_corners
    off) when the grids differ, as the original does on every call."""
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(tgt_len)
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class VisualAttention(nn.Module):
    """Self-attention with the per-head interleaved ``in_proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.in_proj(x).reshape(b, s, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=EPS)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=EPS)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x: torch.Tensor, **unused) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: VisualConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_width)
                                       for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    """One cross-attention layer from 256 learned queries to the ViT tokens (no MLP). Queries get the stored
    16x16 sin-cos table as it is, keys the same table resized to the ViT grid, values no position."""

    def __init__(self, cfg: VisualConfig) -> None:
        super().__init__()
        d = cfg.output_dim
        self.query = nn.Parameter(torch.zeros(cfg.n_queries, d))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.n_queries, d), requires_grad=False)
        self.kv_proj = nn.Linear(cfg.width, d, bias=False) if cfg.width != d else nn.Identity()
        self.attn = ResamplerAttention(d, cfg.resampler_heads)
        self.ln_q = nn.LayerNorm(d, eps=EPS)
        self.ln_kv = nn.LayerNorm(d, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos_k = get_abs_pos(self.pos_embed, x.shape[1])
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        return self.attn(q, kv + pos_k, kv)


class VisionTransformer(nn.Module):
    """``[n, 3, S, S]`` pixels -> ``[n, 256, output_dim]`` features for the LLM."""

    def __init__(self, cfg: VisualConfig) -> None:
        super().__init__()
        self.config = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(256, w))  # 16x16, resized to the grid
        self.ln_pre = nn.LayerNorm(w, eps=EPS)
        self.transformer = TransformerBlock(cfg)
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=EPS)
        self.proj = nn.Linear(cfg.output_dim, cfg.output_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        x = x + get_abs_pos(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        return self.proj(self.ln_post(self.attn_pool(x)))
