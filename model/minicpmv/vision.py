"""MiniCPM-V 2.6's vision tower: SigLIP-so400m run NaViT-style over packed slices, and the 64-query resampler.

Slices of any size (sides multiples of 14) enter as *strips*: each slice's 14x14 patches, row-major, side by side
in a ``[3, 14, L * 14]`` tensor, right-padded with zeros to the longest slice of the batch; ``tgt_sizes`` gives each
slice's (rows, cols) in patches. Positions come from a 70x70 table indexed by the original's bucketing of
fractional patch coordinates (:func:`position_ids`), and padded patches are hidden from attention as keys.

Parameter names match the original keys (``vpm.embeddings.patch_embedding``, ``vpm.embeddings.position_embedding``,
``vpm.encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}``,
``vpm.post_layernorm``; ``resampler.*``, whose packed attention in-projection and ``proj`` the loader maps, see
:mod:`model.resampler`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..resampler import ResamplerAttention, sincos_2d
from .config import MiniCPMVConfig, VisionConfig


def position_ids(tgt_sizes: torch.Tensor, length: int, per_side: int) -> torch.Tensor:
    """Long ``[slices, length]``: each patch's row in the ``per_side``^2 position table, by the original recipe --
    fractional coordinates ``arange(0, 1 - 1e-6, 1 / n)`` with a float32 step, bucketed against the float32
    boundaries ``arange(1 / per_side, 1, 1 / per_side)`` (``right=True``). The plain formula floor(k * per_side / n)
    differs for some n (25, 49, 50, 55, 58 ...): float rounding is part of the trained model. Padding: row 0."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)
    out = torch.zeros(tgt_sizes.shape[0], length, dtype=torch.long)
    for i, (nh, nw) in enumerate(tgt_sizes.to(torch.int32).cpu()):
        rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / nh), boundaries, right=True)
        cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / nw), boundaries, right=True)
        ids = (rows[:, None] * per_side + cols).flatten()
        out[i, :ids.numel()] = ids
    return out


def patch_counts(tgt_sizes: torch.Tensor) -> torch.Tensor:
    return (tgt_sizes[:, 0] * tgt_sizes[:, 1]).long()


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.per_side = cfg.patches_per_side
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(self.per_side ** 2, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        pos = position_ids(tgt_sizes, x.shape[1], self.per_side).to(x.device)
        return x + self.position_embedding(pos)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **unused) -> torch.Tensor:
        x = hidden_states
        x = x + self.self_attn(self.layer_norm1(x), attention_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(layers))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask)
        return x


class SiglipVisionTower(nn.Module):
    """``[slices, 3, 14, L * 14]`` strips + ``tgt_sizes`` -> ``[slices, L, hidden]`` (after ``post_layernorm``)."""

    def __init__(self, cfg: VisionConfig, layers: int) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg, layers)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values, tgt_sizes)
        n = patch_counts(tgt_sizes).to(x.device)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < n[:, None]
        mask = None if bool(valid.all()) else valid[:, None, None, :]  # padded patches are never attended to
        return self.post_layernorm(self.encoder(x, mask))


class Resampler(nn.Module):
    """64 learned queries (no position) cross-attending to one slice's tower tokens: keys get the 2-D sin-cos
    table cut to the slice's (rows, cols), values no position; padded patches are masked keys. Then ``ln_post``
    and ``proj``."""

    def __init__(self, cfg: MiniCPMVConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.embed_dim = d
        self.query = nn.Parameter(torch.zeros(cfg.query_num, d))
        self.kv_proj = nn.Linear(cfg.vision.hidden_size, d, bias=False)
        self.attn = ResamplerAttention(d, d // 128)
        self.ln_q = nn.LayerNorm(d, eps=1e-6)
        self.ln_kv = nn.LayerNorm(d, eps=1e-6)
        self.ln_post = nn.LayerNorm(d, eps=1e-6)
        self.proj = nn.Linear(d, d, bias=False)
        self._table: torch.Tensor | None = None  # [side, side, d], float32, grown on demand (not in the checkpoint)

    def _positions(self, side: int) -> torch.Tensor:
        if self._table is None or self._table.shape[0] < side:
            self._table = sincos_2d(self.embed_dim, side, side).reshape(side, side, -1)
        return self._table

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        sizes = tgt_sizes.long().cpu()
        table = self._positions(max(70, int(sizes.max())))
        b, length, _ = x.shape
        pos = torch.zeros(b, length, self.embed_dim)
        for i, (h, w) in enumerate(sizes.tolist()):
            pos[i, :h * w] = table[:h, :w].reshape(h * w, -1)
        pad = torch.arange(length)[None, :] >= (sizes[:, 0] * sizes[:, 1])[:, None]
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).expand(b, -1, -1)
        out = self.attn(q, kv + pos.to(kv.device, kv.dtype), kv, key_padding_mask=pad.to(kv.device))
        return self.proj(self.ln_post(out))
